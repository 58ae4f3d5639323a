"""RAM: Reinforced Agent Merging, and its tensor-local RAM+ variant.

"Reinforced Agent Merging" (arXiv:2601.13572), as implemented by mergekit's ``ram`` and
``ramplus_tl``. An entry of a task vector counts as changed when its magnitude exceeds
``epsilon``. Entries changed by exactly one model are added in full (averaging would dilute
them); entries changed by several models are averaged over those models; unchanged entries keep
the base value.

RAM+ (tensor-local) additionally scales each model's unique entries by
``λᵢ = 1 + r·clip(ρᵢ, 0, α)``, with ``ρᵢ`` the ratio of the model's shared to unique changed
entries in this tensor, to make up for the signal that models sharing many entries lose.
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import BaseUse, Param, register_method

EPSILON = Param("epsilon", 1e-5, low=0.0, help="a task-vector entry counts as changed when |δ| > epsilon")


def changed_masks(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Task vectors, their changed-entry masks and, per entry, how many models changed it."""
    task_vectors = [tensor - base for tensor in tensors]
    changed = [task_vector.abs() > epsilon for task_vector in task_vectors]
    contributors = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for mask in changed:
        contributors += mask
    return task_vectors, changed, contributors


def merge_unique_and_shared(
    base: torch.Tensor,
    task_vectors: list[torch.Tensor],
    changed: list[torch.Tensor],
    contributors: torch.Tensor,
    unique_scales: list[float],
) -> torch.Tensor:
    """θ_base + Σᵢ δᵢ·changedᵢ·(unique·λᵢ + shared/count)."""
    unique = contributors == 1
    # 1/count on shared entries, 0 elsewhere (count ≥ 2 there, so no division by zero).
    shared_share = torch.where(contributors > 1, 1.0 / contributors.clamp(min=1).to(base.dtype), 0.0)
    merged = base.clone()
    for task_vector, mask, unique_scale in zip(task_vectors, changed, unique_scales, strict=True):
        entry_scale = torch.where(unique, unique_scale, shared_share) * mask
        merged.add_(task_vector * entry_scale)
    return merged


@register_method(
    "ram",
    params=[EPSILON],
    base=BaseUse.REQUIRED,
    min_models=1,
    elementwise=True,
    math="θ_base + Σᵢ δᵢ·[|δᵢ|>ε]·(1 if only model i changed the entry else 1/#models that changed it)",
    reference="Reinforced Agent Merging (arXiv:2601.13572); mergekit 'ram'",
    notes="Entries no model changes by more than epsilon keep the base value. Same rule for every tensor.",
)
def ram(tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    task_vectors, changed, contributors = changed_masks(tensors, base, epsilon)
    return merge_unique_and_shared(base, task_vectors, changed, contributors, [1.0] * len(tensors))


@register_method(
    "ramplus_tl",
    params=[
        Param("r", 0.1, low=0.0, help="strength of the boost for a model's unique entries"),
        Param("alpha", 0.2, low=0.0, help="cap on the shared/unique ratio ρ"),
        EPSILON,
    ],
    base=BaseUse.REQUIRED,
    min_models=1,
    math="as ram, with model i's unique entries scaled by 1 + r·clip(#sharedᵢ/#uniqueᵢ, 0, α) per tensor",
    reference="Reinforced Agent Merging, RAM+ (arXiv:2601.13572); mergekit 'ramplus_tl'",
    notes="The ratio is counted per tensor ('tensor-local'), so the method is not elementwise.",
)
def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    task_vectors, changed, contributors = changed_masks(tensors, base, epsilon)
    unique = contributors == 1
    unique_scales = []
    for mask in changed:
        unique_count = int((mask & unique).sum())
        shared_count = int(mask.sum()) - unique_count
        # mergekit divides by max(unique, epsilon); with no unique entries the scale is unused.
        ratio = shared_count / max(unique_count, epsilon) if (unique_count or epsilon > 0) else 0.0
        unique_scales.append(1.0 + r * min(max(ratio, 0.0), alpha))
    return merge_unique_and_shared(base, task_vectors, changed, contributors, unique_scales)
