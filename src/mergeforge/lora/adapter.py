"""LoRA adapters written as PEFT folders: per-module updates with their scales folded into the
factors. Reading (:func:`read_lora`, :class:`ModuleUpdate`, rank and alpha patterns) lives in
:mod:`mergeforge.checkpoint.lora_adapter`, below the engine, so that a recipe's ``model+adapter``
reference can apply an adapter while streaming; it is re-exported here.

Writing goes through :func:`~mergeforge.checkpoint.peft.save_adapter`, then records per-module
ranks (each module's scale is folded into its factors, so every module has ``lora_alpha == r`` and
scale 1).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from mergeforge.checkpoint.lora_adapter import (
    Adapter,
    ModuleUpdate,
    module_scale,
    pattern_value,
    read_lora,
)
from mergeforge.checkpoint.peft import ADAPTER_CONFIG, PEFT_PREFIX, save_adapter

__all__ = ["Adapter", "ModuleUpdate", "module_scale", "pattern_value", "read_lora", "write_lora"]


def write_lora(folder: Path, updates: list[ModuleUpdate], base_model: str, *, saved: Mapping[str, torch.Tensor] | None = None,
               modules_to_save: list[str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write a PEFT LoRA folder: each update's scale folded into its ``lora_B``, the most common
    rank as ``r``, the others in ``rank_pattern`` (with equal ``alpha_pattern``, so every scale is 1),
    and ``saved`` tensors (names in the base model) under ``modules_to_save``."""
    state: dict[str, torch.Tensor] = {}
    for update in updates:
        up = (update.up.float() * update.scale).contiguous()
        down = update.down.float().contiguous()
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if update.embedding else ("lora_A.weight", "lora_B.weight")
        state[f"{PEFT_PREFIX}{update.name}.{a_key}"] = down if dtype is None else down.to(dtype)
        state[f"{PEFT_PREFIX}{update.name}.{b_key}"] = up if dtype is None else up.to(dtype)
    for name, tensor in (saved or {}).items():
        state[f"{PEFT_PREFIX}{name}"] = tensor.contiguous()
    ranks = Counter(update.rank for update in updates)
    rank = ranks.most_common(1)[0][0] if ranks else 1
    save_adapter(folder, state, rank, float(rank), [u.name for u in updates], base_model)
    pattern = {u.name: u.rank for u in updates if u.rank != rank}
    config_path = folder / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(rank_pattern=pattern, alpha_pattern={name: float(r) for name, r in pattern.items()},
                  modules_to_save=sorted(modules_to_save) if modules_to_save else None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
