"""Consensus merging and TALL masks (Wang et al., ICML 2024, "Localizing Task Information for
Improved Model Merging and Compression", arXiv:2405.07813).

With task vectors τₜ and the multi-task vector τ_MTL = λ·Σₜ τₜ (task arithmetic), the TALL mask of
task t keeps the entries where the task's own update outweighs what the other tasks add there:

    mₜ = 1{ |τₜ| ≥ λₜ · |τ_MTL − τₜ| }        (λₜ = ``tall_lambda``)

- ``tall_mask`` writes θ_base + τ_MTL plus every mₜ (packed bits) beside it; task t's model is
  θ_base + mₜ ⊙ τ_MTL, rebuilt by ``mergeforge emr materialize``. The paper reports over 99% of
  single-task accuracy this way.
- ``consensus`` keeps only the entries at least k tasks find useful, dropping "selfish" weights
  (used by one task) and "catastrophic" ones (used by none): θ_base + λ·(1{Σₜ mₜ ≥ k} ⊙ Σₜ τₜ).
  k = 2 is the paper's choice; k = 0 is task arithmetic.

The paper picks λₜ per task on validation data from {0.2, …, 0.6}; data-free, the default here is
the middle of that grid. Every tensor, matrix or not, is merged this way.
"""

from __future__ import annotations

import torch

from mergeforge.methods import task_masks
from mergeforge.methods.registry import BaseUse, Param, register_method

TALL_LAMBDA = Param(
    "tall_lambda", 0.4, low=0.0, help="λₜ of the TALL masks: keep |τₜ| ≥ λₜ·|τ_MTL − τₜ| (the paper searches 0.2…0.6)"
)
REFERENCE = "Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression (ICML 2024, arXiv:2405.07813)"


def tall_masks(task_vectors: list[torch.Tensor], multi_task_vector: torch.Tensor, tall_lambda: float) -> list[torch.Tensor]:
    """mₜ = |τₜ| ≥ λₜ·|τ_MTL − τₜ| for every task."""
    return [task_vector.abs() >= (multi_task_vector - task_vector).abs_().mul_(tall_lambda) for task_vector in task_vectors]


@register_method(
    "consensus",
    params=[
        Param("k", 2, kind="int", low=0, help="keep entries whose TALL mask is on for at least k tasks (the paper's 2)"),
        TALL_LAMBDA,
        Param("lambda", 1.0, help="scale λ of the summed task vector, also used to form τ_MTL for the masks"),
    ],
    base=BaseUse.REQUIRED,
    math="mₜ = |τₜ| ≥ λₜ|τ_MTL − τₜ|, τ_MTL = λΣτₜ; θ_base + λ·1{Σₜ mₜ ≥ k} ⊙ Σₜ τₜ",
    citation=REFERENCE + " (Consensus Merging with task arithmetic)",
    elementwise=True,
    notes="k = 0 gives task arithmetic; k above the number of models gives the base.",
)
def consensus(tensors: list[torch.Tensor], base: torch.Tensor, *, k: int, tall_lambda: float, lambda_: float) -> torch.Tensor:
    task_vectors = [tensor - base for tensor in tensors]
    total = torch.zeros_like(base)
    for task_vector in task_vectors:
        total.add_(task_vector)
    votes = torch.zeros_like(base)
    for mask in tall_masks(task_vectors, total * lambda_, tall_lambda):
        votes.add_(mask.to(votes.dtype))
    return total.mul_(votes >= k).mul_(lambda_).add_(base)


@register_method(
    "tall_mask",
    params=[TALL_LAMBDA, Param("lambda", 1.0, help="scale λ of τ_MTL = λ·Σₜ τₜ (the merged multi-task vector)")],
    base=BaseUse.REQUIRED,
    math="writes θ_base + τ_MTL (τ_MTL = λΣτₜ) and masks mₜ = |τₜ| ≥ λₜ|τ_MTL − τₜ|; task t = θ_base + mₜ ⊙ τ_MTL",
    citation=REFERENCE + " (TALL masks)",
    extra_outputs=task_masks.side_shapes,
    notes="The output folder holds the multi-task model; `mergeforge emr materialize OUT --task N` rebuilds task N's model.",
)
def tall_mask(
    tensors: list[torch.Tensor], base: torch.Tensor, *, tall_lambda: float, lambda_: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    task_vectors = [tensor - base for tensor in tensors]
    multi_task_vector = torch.zeros_like(base)
    for task_vector in task_vectors:
        multi_task_vector.add_(task_vector)
    multi_task_vector.mul_(lambda_)
    masks = torch.stack(tall_masks(task_vectors, multi_task_vector, tall_lambda))
    side = {task_masks.MASKS: task_masks.pack(masks), task_masks.SCALES: torch.ones(len(tensors), dtype=torch.float32)}
    return multi_task_vector.add_(base), side
