"""MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual
Learning", arXiv:2407.06322).

For every parameter entry p, the merged task vector takes the entry of largest magnitude among
the task vectors, τ[p] = τₖ[p] with k = argmaxᵢ |τᵢ[p]|, and the model is θ_base + λ·τ. The paper
uses λ = 0.5 for every experiment (after sequential fine-tuning; it also applies to independently
fine-tuned models). Every tensor, matrix or not, is merged this way.
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import BaseUse, Param, register_method


@register_method(
    "magmax",
    params=[Param("lambda", 0.5, help="scale λ of the selected task vector (the paper's 0.5)", scales_result=True)],
    base=BaseUse.REQUIRED,
    math="τ[p] = τₖ[p], k = argmaxᵢ |τᵢ[p]|; θ_base + λ·τ",
    citation="Marczak et al. 2024, MagMax (ECCV 2024, arXiv:2407.06322)",
    elementwise=True,
    notes="Applies to every tensor. Ties go to the earlier model in the recipe.",
)
def magmax(tensors: list[torch.Tensor], base: torch.Tensor, *, lambda_: float) -> torch.Tensor:
    selected = tensors[0] - base
    selected_magnitude = selected.abs()
    for tensor in tensors[1:]:
        task_vector = tensor - base
        magnitude = task_vector.abs()
        larger = magnitude > selected_magnitude  # strict: the earlier model wins a tie
        selected = torch.where(larger, task_vector, selected)
        selected_magnitude = torch.where(larger, magnitude, selected_magnitude)
    return selected.mul_(lambda_).add_(base)
