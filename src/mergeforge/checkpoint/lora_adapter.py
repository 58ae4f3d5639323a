"""LoRA adapters read as updates: each adapted module's ΔW with its own scale (``rank_pattern``,
``alpha_pattern``, rsLoRA), its embedding LoRAs and ``modules_to_save`` tensors.

Reading goes through :func:`mergeforge.checkpoint.peft.read_adapter` (which refuses DoRA and other
PEFT types). This lives with the checkpoint readers, below the engine, because a recipe's
``model+adapter`` reference (:mod:`mergeforge.checkpoint.adapted`) applies an adapter while the
model is read; :mod:`mergeforge.lora` builds extraction and merging on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeforge.checkpoint.peft import ADAPTER_CONFIG, PEFT_PREFIX, read_adapter, resolve_base
from mergeforge.errors import CheckpointError

# PEFT's tensor names below ``base_model.model.<module>.``: (factor, is an embedding).
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("down", False),
    ".lora_B.weight": ("up", False),
    ".lora_embedding_A": ("down", True),
    ".lora_embedding_B": ("up", True),
}


@dataclass(frozen=True)
class ModuleUpdate:
    """One adapted module: ΔW = ``scale * up @ down``; for an embedding (PEFT's
    ``lora_embedding_B`` [dim, r] and ``lora_embedding_A`` [r, vocab]) ΔE is its transpose."""

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    up: torch.Tensor  # lora_B [out, r]
    down: torch.Tensor  # lora_A [r, in]
    scale: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight it updates."""
        rows, cols = self.up.shape[0], self.down.shape[1]
        return (cols, rows) if self.embedding else (rows, cols)

    def delta(self) -> torch.Tensor:
        """The dense update of the module's weight, in float32."""
        return self.delta_rows(0, None)

    def delta_rows(self, start: int, stop: int | None) -> torch.Tensor:
        """Rows ``[start, stop)`` of :meth:`delta`, computed from those rows' factors alone, so a
        reader streaming row blocks never builds the whole update (an embedding's rows are
        columns of ``lora_embedding_A``)."""
        if self.embedding:
            return ((self.up.float() * self.scale) @ self.down[:, start:stop].float()).T
        return (self.up[start:stop].float() * self.scale) @ self.down.float()


@dataclass
class Adapter:
    """A PEFT LoRA folder, read: its updates by module, its ``modules_to_save`` tensors (by their
    name in the base model) and the base it was trained on."""

    folder: Path
    config: dict[str, Any]
    updates: dict[str, ModuleUpdate]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def base_name(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    def base_identity(self) -> str:
        """The base as a resolved path when it is on disk (so ``../base`` and its absolute path
        agree), else its name as written."""
        try:
            return str(resolve_base(self.folder, self.config).resolve())
        except CheckpointError:
            return self.base_name


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of the
    module path, dot-separated, as a regular expression."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


def module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """``alpha / r`` (``alpha / √r`` with rsLoRA) of one module, honouring the patterns."""
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_lora(folder: str | Path) -> Adapter:
    """Read a PEFT LoRA folder into per-module updates (errors name the file and tensor)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: adapter folder not found")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    config, state = read_adapter(folder)
    factors: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        path = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in _FACTOR_SUFFIXES if path.endswith(s)), None)
        if suffix is None:
            if ".lora_" in path:
                raise CheckpointError(f"{folder}: adapter tensor '{key}' is not a LoRA factor mergeforge knows")
            # PEFT's save_embedding_layers stores an adapted embedding's own weight as
            # '<module>.base_layer.weight': it stands for the model's '<module>.weight'.
            saved[path.replace(".base_layer.", ".")] = tensor
            continue
        side, embedding = _FACTOR_SUFFIXES[suffix]
        factors.setdefault((path.removesuffix(suffix), embedding), {})[side] = tensor
    updates: dict[str, ModuleUpdate] = {}
    for (module, embedding), pair in sorted(factors.items()):
        if set(pair) != {"up", "down"}:
            missing = "lora_B" if "up" not in pair else "lora_A"
            raise CheckpointError(f"{folder}: module '{module}' has no {missing} tensor")
        up, down = pair["up"], pair["down"]
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"{folder}: module '{module}': lora_B {tuple(up.shape)} and lora_A {tuple(down.shape)} do not multiply")
        declared = int(pattern_value(config.get("rank_pattern"), module, config.get("r", down.shape[0])))
        if declared != down.shape[0]:
            raise CheckpointError(f"{folder}: module '{module}' has rank {down.shape[0]} but {ADAPTER_CONFIG} says r = {declared}")
        updates[module] = ModuleUpdate(module, up, down, module_scale(config, module, declared), embedding)
    return Adapter(folder, config, updates, saved)
