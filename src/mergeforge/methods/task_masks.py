"""Per-task masks stored beside a merged checkpoint (EMR merging, TALL masks).

A method that keeps one binary mask and one scale per task returns them as side tensors
``<tensor>::task_masks`` (the masks packed eight to a byte, one row per task, in recipe order)
and ``<tensor>::task_scales`` (float32, one per task). A task's model is rebuilt from the merged
checkpoint, the base and these two tensors: θ_task = θ_base + scale_task · mask_task ⊙ (θ_merged − θ_base),
in memory by :func:`task_state` and on disk by ``mergeforge emr materialize``
(:mod:`mergeforge.engine.materialize`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mergeforge.methods.registry import SIDE_SEPARATOR

MASKS = "task_masks"
SCALES = "task_scales"
_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_length(numel: int) -> int:
    return (numel + 7) // 8


def side_shapes(shape: tuple[int, ...], n_models: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The ``extra_outputs`` of a per-task-mask method for a tensor of ``shape``."""
    return {MASKS: ((n_models, packed_length(math.prod(shape))), "U8"), SCALES: ((n_models,), "F32")}


def pack(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``(tasks, *shape)`` -> uint8 ``(tasks, ceil(numel / 8))``, bit j of byte i = entry 8i + j."""
    flat = masks.reshape(masks.shape[0], -1)
    padding = packed_length(flat.shape[1]) * 8 - flat.shape[1]
    if padding:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], padding)], dim=1)
    bits = flat.reshape(flat.shape[0], -1, 8).to(torch.uint8) * _BIT_VALUES.to(flat.device)
    return bits.sum(dim=2, dtype=torch.uint8)


def unpack(packed_row: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One task's packed mask back to a bool tensor of ``shape``."""
    numel = math.prod(shape)
    bits = packed_row.reshape(-1, 1).bitwise_and(_BIT_VALUES.to(packed_row.device)) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def task_tensor(merged: torch.Tensor, base: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, task: int) -> torch.Tensor:
    """Task ``task``'s tensor: θ_base + scale_task · mask_task ⊙ (θ_merged − θ_base), in the merged dtype."""
    base_float = base.to(torch.float32)
    unified = merged.to(torch.float32) - base_float
    keep = unpack(packed[task], tuple(merged.shape))
    return (base_float + unified.mul_(keep).mul_(float(scales[task]))).to(merged.dtype)


def task_state(merged: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], side: Mapping[str, torch.Tensor],
               task: int) -> dict[str, torch.Tensor]:
    """Task ``task``'s model (0-based, recipe order) of an EMR or TALL-mask merge, in memory:
    ``merged`` and ``side`` as :func:`mergeforge.merge_state_dicts` returns them (its
    ``side_outputs``). Tensors without masks are the merged ones."""
    state = {}
    for name, tensor in merged.items():
        packed, scales = side.get(name + SIDE_SEPARATOR + MASKS), side.get(name + SIDE_SEPARATOR + SCALES)
        state[name] = tensor if packed is None or scales is None else task_tensor(tensor, base[name], packed, scales, task)
    return state
