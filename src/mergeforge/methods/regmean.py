"""RegMean: merge each linear layer by the closed-form solution of a regression on its inputs.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR 2023,
arXiv:2212.09849). For a linear layer y = W x with inputs X_i (one row per token) from model i's
calibration data, the merged weight minimises Σ_i ‖X_i W*ᵀ − X_i W_iᵀ‖², whose solution is

    W*ᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ,    G_i = X_iᵀ X_i.

The paper shrinks the off-diagonal entries of each Gram matrix, G̃_i = α G_i + (1 − α) diag(G_i),
which interpolates between this regression (α = 1) and a per-input-feature weighted average
(α = 0); α = 0.9 by default. Every other tensor (biases, norms, embeddings) is the plain average.
Linear layers are ``nn.Linear`` and GPT-2's ``Conv1D`` (whose weight is stored transposed).

Not in the paper: a ridge of 1e-6 · mean(diag Σ G̃_i) pulls directions that no calibration input
visits toward the plain average of the W_i, so the solve stays well-posed when a feature is never
active (it changes nothing measurable elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergeforge.errors import MethodError
from mergeforge.methods.registry import Param, register_method

if TYPE_CHECKING:
    from mergeforge.calibration.context import CalibrationContext

RIDGE = 1e-6


@dataclass(frozen=True)
class InputGrams:
    """One linear layer's statistics: each model's input Gram matrix, and which dimension of the
    weight meets the input (1 for ``nn.Linear``'s ``[out, in]``, 0 for GPT-2's ``Conv1D``)."""

    grams: list[torch.Tensor]
    input_dim: int = 1


def collect_grams(context: CalibrationContext) -> dict[str, InputGrams]:
    """Every input model's linear-layer input Gram matrices on its own calibration examples."""
    from mergeforge.calibration.gram import linear_input_grams, linear_layers

    per_model: list[dict[str, torch.Tensor]] = []
    input_dims: dict[str, int] = {}
    batches = {ref: context.batches(ref) for ref in context.input_refs}
    with context.progress_bar(sum(len(b) for b in batches.values()), "regmean") as bar:
        for ref in context.input_refs:
            model = context.load_model(ref)
            input_dims = {name: dim for name, (_, dim) in linear_layers(model).items()}
            per_model.append(linear_input_grams(model, batches[ref], bar))
            del model
    names = [name for name in per_model[0] if all(name in grams for grams in per_model)]
    return {name: InputGrams([grams[name] for grams in per_model], input_dims[name]) for name in names}


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G): the off-diagonal entries scaled by α."""
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1 - alpha)


@register_method(
    "regmean",
    params=[
        Param("alpha", 0.9, low=0, high=1,
              help="scale of the Gram matrices' off-diagonal entries (1: exact regression, 0: diagonal only)"),
    ],
    math="per linear layer W*ᵀ = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ, G̃ᵢ = α·XᵢᵀXᵢ + (1−α)·diag(XᵢᵀXᵢ); other tensors averaged",
    citation="RegMean, Jin et al. ICLR 2023 (arXiv:2212.09849)",
    calibrate=collect_grams,
    notes="Data-aware: needs a top-level 'calibration:' field; one forward pass per batch on each whole model records the "
    "inputs of every nn.Linear. A per-model mapping in 'calibration.data' gives each model its own task data.",
)
def regmean(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    alpha: float,
    statistics: InputGrams | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    if statistics is None or tensors[0].dim() != 2:
        return torch.stack(tensors).mean(0)
    if isinstance(statistics, InputGrams):
        if statistics.input_dim == 0:  # Conv1D stores [in, out]: solve for its transpose
            return regmean([t.T for t in tensors], None, alpha=alpha, statistics=statistics.grams).T.contiguous()
        statistics = statistics.grams
    if len(statistics) != len(tensors):
        raise MethodError(f"regmean: statistics for {len(statistics)} models, but {len(tensors)} inputs")
    in_features = tensors[0].shape[1]
    for gram in statistics:
        if tuple(gram.shape) != (in_features, in_features):
            raise MethodError(f"regmean: Gram matrix of shape {list(gram.shape)} for a weight of shape {list(tensors[0].shape)}")
    device = tensors[0].device
    # float64: Gram matrices of activations are badly conditioned.
    grams = [shrink_off_diagonal(gram.to(device=device, dtype=torch.float64), alpha) for gram in statistics]
    gram_sum = torch.stack(grams).sum(0)
    weighted = sum(gram @ tensor.to(torch.float64).T for gram, tensor in zip(grams, tensors))
    ridge = RIDGE * float(torch.diagonal(gram_sum).mean().clamp_min(1e-12))
    average = torch.stack(tensors).to(torch.float64).mean(0)
    merged_transposed = torch.linalg.solve(
        gram_sum + ridge * torch.eye(in_features, dtype=torch.float64, device=device), weighted + ridge * average.T
    )
    return merged_transposed.T.to(tensors[0].dtype).contiguous()
