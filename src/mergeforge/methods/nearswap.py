"""NearSwap: take the other model's value where it is close to the base, keep the base where the
two are far apart.

From the QuartetAnemoi-70B model card (alchemonaut, Hugging Face, 2024), as implemented by
mergekit's ``nearswap``: per entry, ``w = clamp(t / |θ_base − θ₁|, 0, 1)`` (1 where they are
equal) and the result is ``(1 − w)·θ_base + w·θ₁``. Entries that differ by at most ``t`` are
swapped in fully; larger differences are damped in proportion to 1/|difference|.
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
    math="w = clamp(t / |θ_base − θ₁|, 0, 1); (1−w)·θ_base + w·θ₁",
    citation="alchemonaut, QuartetAnemoi-70B model card (2024); mergekit 'nearswap'",
    notes="Needs the base and exactly one other model. Elementwise, so every tensor kind is treated alike.",
)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    other = tensors[0]
    # t/0 = inf for equal entries, which the clamp turns into a full swap (of an equal value).
    swap_weight = torch.abs(base - other).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    return torch.lerp(base, other, swap_weight)
