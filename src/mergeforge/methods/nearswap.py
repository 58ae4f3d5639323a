"""NearSwap: take the other model's value where it is close to the base, keep the base where the
two are far apart.

From the QuartetAnemoi-70B model card (alchemonaut, Hugging Face, 2024), as implemented by
mergekit's ``nearswap``: per entry, ``w = clamp(t / max(|θ_base − θ₁|, 1e-6), 0, 1)`` and the
result is ``w·θ₁ + (1 − w)·θ_base``. Entries that differ by at most ``t`` are swapped in fully;
larger differences are damped in proportion to 1/|difference|. The 1e-6 floor on the difference
is mergekit's: with ``t < 1e-6`` even (near-)equal entries get ``w = t/1e-6 < 1``.
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import REQUIRED, BaseUse, Param, register_method


@register_method(
    "nearswap",
    params=[Param("t", REQUIRED, low=0.0, low_open=True, help="sameness threshold: differences up to t are swapped in fully")],
    base=BaseUse.REQUIRED,
    min_models=1,
    max_models=1,
    elementwise=True,
    math="w = clamp(t / max(|θ_base − θ₁|, 1e-6), 0, 1); w·θ₁ + (1−w)·θ_base",
    citation="alchemonaut, QuartetAnemoi-70B model card (2024); mergekit 'nearswap'",
    notes=(
        "Needs the base and exactly one other model. Elementwise, so every tensor kind is treated "
        "alike. Differences are floored at 1e-6 and the steps follow mergekit's order, so a 16-bit "
        "--math-dtype recipe rounds as mergekit 0.1.5 does."
    ),
)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    other = tensors[0]
    # mergekit's order of operations (t times the reciprocal of the floored difference, which is
    # what torch makes of a scalar divided by a tensor; the two products summed, not a lerp), so
    # that a 16-bit --math-dtype recipe rounds as mergekit does.
    swap_weight = torch.abs(base - other).clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    kept = (1 - swap_weight).mul_(base)
    return swap_weight.mul_(other).add_(kept)
