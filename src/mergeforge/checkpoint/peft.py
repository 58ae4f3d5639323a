"""PEFT's LoRA adapter folders (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685): writing one, reading one, and applying one to its base model.

An adapter folder holds what ``peft.PeftModel.from_pretrained`` reads:

- ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``, ...);
- ``adapter_model.safetensors`` with tensors named
  ``base_model.model.<module path>.lora_A.weight`` and ``....lora_B.weight``.

An adapted linear layer computes ``W x + (alpha / r) * B (A x)`` (``alpha / sqrt(r)`` with rsLoRA).
``peft`` itself is not needed to write or to apply these adapters. ``base_model_name_or_path`` may
be relative to the adapter folder (the zoo writes ``../base``): :func:`resolve_base` tries that
first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergeforge.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def save_adapter(
    folder: Path,
    state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    base_model: str,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT LoRA folder (errors name the file)."""
    from safetensors.torch import load_file

    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot read the adapter config ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise CheckpointError(f"{config_path}: DoRA and fan_in_fan_out adapters are not supported")
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing; an adapter folder needs its safetensors weights")
    return config, load_file(str(weights_path))


def merge_adapter(model: torch.nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor], source: Path) -> None:
    """Add ``(alpha / r) * B @ A`` to every adapted weight of ``model``, in place."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    modules = dict(model.named_modules())
    for key in sorted(state):
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        module = modules.get(path)
        if not isinstance(module, torch.nn.Linear) or b_key not in state:
            raise CheckpointError(f"{source}: adapter tensor {key} matches no linear layer of the base model (or lacks lora_B)")
        with torch.no_grad():
            delta = state[b_key].float() @ state[key].float() * scaling
            if delta.shape != module.weight.shape:
                raise CheckpointError(f"{source}: {key} gives an update of shape {tuple(delta.shape)} for a weight of {tuple(module.weight.shape)}")
            module.weight.add_(delta.to(module.weight.dtype))


def resolve_base(folder: Path, config: dict[str, Any]) -> Path:
    """The base model folder of an adapter: ``base_model_name_or_path`` relative to the adapter
    folder, else as given (relative to the working directory)."""
    name = config.get("base_model_name_or_path")
    if not name:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path; cannot tell which base to apply it to")
    for candidate in (folder / name, Path(name)):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{folder / ADAPTER_CONFIG}: base model '{name}' not found (looked beside the adapter and in the working directory)")


def load_adapter_model(folder: Path) -> Any:
    """The base model with the adapter merged in (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    config, state = read_adapter(folder)
    base = resolve_base(folder, config)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    merge_adapter(model, config, state, folder)
    return model.eval()
