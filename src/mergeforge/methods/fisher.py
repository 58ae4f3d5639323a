"""Fisher merging: a per-parameter average weighted by each model's Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022,
arXiv:2111.09832). Each model's parameters are weighted by the diagonal of its Fisher information,
measured on that model's calibration data (see :mod:`mergeforge.calibration.fisher`)::

    θ*[j] = Σ_i w_i F_i[j] θ_i[j] / Σ_i w_i F_i[j],    F_i[j] ← max(F_i[j], fisher_floor)

The floor (1e-6, as in the authors' code) keeps the ratio defined where every Fisher vanishes: there
the merge is the plain weighted average. Tensors without a Fisher (buffers that are not
parameters) are averaged with the weights ``w_i`` too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mergeforge.errors import MethodError
from mergeforge.methods.registry import Param, register_method

if TYPE_CHECKING:
    from mergeforge.calibration.context import CalibrationContext


def collect_fishers(context: CalibrationContext) -> dict[str, list[torch.Tensor]]:
    """Every input model's diagonal Fisher on its own calibration examples, by tensor name."""
    from mergeforge.calibration.fisher import diagonal_fisher

    per_model: list[dict[str, torch.Tensor]] = []
    total = sum(len(context.encoded(ref)) for ref in context.input_refs)
    with context.progress_bar(total, "fisher") as bar:
        for ref in context.input_refs:
            model = context.load_model(ref)
            per_model.append(diagonal_fisher(model, context.encoded(ref), context.device, bar))
            del model
    names = [name for name in per_model[0] if all(name in fishers for fishers in per_model)]
    return {name: [fishers[name] for fishers in per_model] for name in names}


@register_method(
    "fisher_merging",
    params=[
        Param("weight", 1.0, per_model=True, low=0, help="the model's weight λᵢ in the Fisher-weighted sum"),
        Param("fisher_floor", 1e-6, low=0, help="lower bound on every Fisher value, so the ratio stays defined"),
    ],
    math="Σ wᵢ·Fᵢ·θᵢ / Σ wᵢ·Fᵢ per parameter, Fᵢ = max(diagonal empirical Fisher of model i, floor)",
    citation="Fisher merging, Matena & Raffel 2022 (arXiv:2111.09832)",
    aliases=("fisher",),
    calibrate=collect_fishers,
    statistics_ignore_params=True,
    notes="Data-aware: needs a top-level 'calibration:' field; each model's Fisher comes from one backward pass per "
    "calibration example on the whole model. A per-model mapping in 'calibration.data' gives each model its own task data.",
)
def fisher_merging(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    fisher_floor: float,
    statistics: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    if sum(weight) <= 0:
        raise MethodError("fisher_merging: every model weight is zero; give at least one model a positive weight")
    if statistics is not None and len(statistics) != len(tensors):
        raise MethodError(f"fisher_merging: statistics for {len(statistics)} models, but {len(tensors)} inputs")
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for index, (tensor, model_weight) in enumerate(zip(tensors, weight)):
        if statistics is None:
            importance = torch.full_like(tensor, model_weight)
        else:
            fisher = statistics[index].to(device=tensor.device, dtype=tensor.dtype)
            if fisher.shape != tensor.shape:
                raise MethodError(f"fisher_merging: Fisher of shape {list(fisher.shape)} for a tensor of shape {list(tensor.shape)}")
            importance = fisher.clamp_min(fisher_floor) * model_weight
        numerator.addcmul_(importance, tensor)
        denominator.add_(importance)
    # Where only zero-weight models remain the denominator is 0; those entries cannot occur when
    # fisher_floor > 0 and some weight is positive, and with fisher_floor 0 they fall back to the mean.
    zero = denominator == 0
    if zero.any():
        numerator = torch.where(zero, torch.stack(tensors).mean(0), numerator)
        denominator = torch.where(zero, torch.ones_like(denominator), denominator)
    return numerator / denominator
