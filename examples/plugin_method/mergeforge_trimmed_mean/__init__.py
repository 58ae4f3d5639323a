"""A mergeforge plugin: the coordinate-wise trimmed mean of the input models.

For every entry, sort the N models' values, drop the ``⌊trim·N⌋`` smallest and the as many
largest, and average the rest. It is the robust aggregator of Yin et al. 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates" (arXiv:1803.01498), used here so that
one fine-tune with an outlying value for a weight cannot drag the merge with it.

Importing this module registers the method; mergeforge imports it through the
``mergeforge.methods`` entry point declared in this package's ``pyproject.toml``.
"""

from __future__ import annotations

import math

import torch

from mergeforge.methods import BaseUse, Param, register_method


@register_method(
    "trimmed_mean",
    params=[
        Param(
            "trim",
            0.2,
            low=0.0,
            high=0.5,
            high_open=True,
            help="fraction of models dropped at each end, per entry",
        ),
    ],
    base=BaseUse.NONE,
    min_models=1,
    elementwise=True,  # entry i of the output depends only on entry i of the inputs
    math="mean of the values left after dropping the ⌊trim·N⌋ smallest and largest, per entry",
    citation="Yin et al. 2018, coordinate-wise trimmed mean (arXiv:1803.01498)",
    notes="Needs at least 1/trim models before anything is trimmed (5 models at trim 0.2).",
)
def trimmed_mean(tensors: list[torch.Tensor], base: torch.Tensor | None, *, trim: float) -> torch.Tensor:
    """``tensors`` are the models' versions of one tensor; ``trim`` arrives already validated."""
    dropped_each_side = math.floor(trim * len(tensors))
    stacked = torch.stack(tensors)
    if dropped_each_side == 0:
        return stacked.mean(dim=0)
    ordered = stacked.sort(dim=0).values
    return ordered[dropped_each_side : len(tensors) - dropped_each_side].mean(dim=0)
