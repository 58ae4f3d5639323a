"""A mergeforge plugin: the coordinate-wise winsorized mean of the input models.

For every entry, sort the N models' values, replace the ``⌊trim·N⌋`` smallest by the next
smallest and the as many largest by the next largest, and average. Like the trimmed mean (a
built-in, ``trimmed_mean``) it bounds what one fine-tune with an outlying value can do to the
merge, while every model still counts in the average (Tukey 1962, "The Future of Data Analysis",
Ann. Math. Statist. 33(1); Yin et al. 2018, arXiv:1803.01498, for its use against outliers).

Importing this module registers the method; mergeforge imports it through the
``mergeforge.methods`` entry point declared in this package's ``pyproject.toml``.
"""

from __future__ import annotations

import math

import torch

from mergeforge.methods import BaseUse, Param, register_method


@register_method(
    "winsorized_mean",
    params=[
        Param(
            "trim",
            0.2,
            low=0.0,
            high=0.5,
            high_open=True,
            help="fraction of models clamped at each end, per entry",
        ),
    ],
    base=BaseUse.NONE,
    min_models=1,
    elementwise=True,  # entry i of the output depends only on entry i of the inputs
    math="mean of the values after clamping the ⌊trim·N⌋ smallest and largest to their neighbours, per entry",
    citation="Tukey 1962, winsorized mean (Ann. Math. Statist. 33(1))",
    notes="Needs at least 1/trim models before anything is clamped (5 models at trim 0.2).",
)
def winsorized_mean(tensors: list[torch.Tensor], base: torch.Tensor | None, *, trim: float) -> torch.Tensor:
    """``tensors`` are the models' versions of one tensor; ``trim`` arrives already validated."""
    clamped_each_side = math.floor(trim * len(tensors))
    stacked = torch.stack(tensors)
    if clamped_each_side == 0:
        return stacked.mean(dim=0)
    ordered = stacked.sort(dim=0).values
    low, high = ordered[clamped_each_side], ordered[len(tensors) - 1 - clamped_each_side]
    return torch.maximum(torch.minimum(stacked, high), low).mean(dim=0)
