"""Robust aggregators: the coordinate-wise median and trimmed mean of the inputs.

Both come from Byzantine-robust distributed learning (Yin et al. 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", arXiv:1803.01498): one input with an
outlying value for an entry (a diverged fine-tune, a federated client that sends a scaled or
corrupted update) cannot drag that entry of the result with it, which a weighted average lets it
do. They are translation-equivariant, median(θᵢ) = θ_base + median(θᵢ − θ_base), so they take no
base: merging client models is merging their updates from the global model (see
:mod:`mergeforge.federated`).
"""

from __future__ import annotations

import math

import torch

from mergeforge.methods.registry import BaseUse, Param, register_method

REFERENCE = "Yin et al. 2018, Byzantine-Robust Distributed Learning (arXiv:1803.01498)"


def sorted_inputs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The inputs stacked on a new first axis and sorted along it, entry by entry."""
    return torch.stack(tensors).sort(dim=0).values


@register_method(
    "median",
    base=BaseUse.NONE,
    math="θ[p] = median of θᵢ[p] (the mean of the two middle values when N is even)",
    citation=REFERENCE + " (coordinate-wise median)",
    elementwise=True,  # entry p of the output depends only on entry p of the inputs
    notes="The even-N median is NumPy's (mean of the two middle values), not torch.median's lower one.",
)
def median(tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    ordered = sorted_inputs(tensors)
    count = len(tensors)
    if count % 2:
        return ordered[count // 2].clone()
    return (ordered[count // 2 - 1] + ordered[count // 2]) / 2


def trimmed_count(trim: float, count: int) -> int:
    """How many values are dropped at each end: ⌊trim·N⌋ (scipy.stats.trim_mean's rule)."""
    return math.floor(trim * count)


@register_method(
    "trimmed_mean",
    params=[Param("trim", 0.2, low=0.0, high=0.5, high_open=True, help="fraction of inputs dropped at each end, per entry")],
    base=BaseUse.NONE,
    math="θ[p] = mean of θᵢ[p] after dropping the ⌊trim·N⌋ smallest and largest values",
    citation=REFERENCE + " (coordinate-wise trimmed mean)",
    elementwise=True,
    notes="Trims nothing below 1/trim inputs (5 at trim 0.2); trim 0 is the plain mean.",
)
def trimmed_mean(tensors: list[torch.Tensor], base: torch.Tensor | None, *, trim: float) -> torch.Tensor:
    dropped = trimmed_count(trim, len(tensors))
    if dropped == 0:
        return torch.stack(tensors).mean(dim=0)
    return sorted_inputs(tensors)[dropped: len(tensors) - dropped].mean(dim=0)
