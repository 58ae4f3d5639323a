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


def changed_task_vectors(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Task vectors zeroed where unchanged (|δ| ≤ epsilon), so an entry is changed exactly where
    it is non-zero, and, per entry, how many models changed it."""
    task_vectors = []
    counter_dtype = torch.uint8 if len(tensors) < 256 else torch.int32
    contributors = torch.zeros(base.shape, dtype=counter_dtype, device=base.device)
    for tensor in tensors:
        task_vector = tensor - base
        mask = task_vector.abs() > epsilon
        task_vectors.append(task_vector.mul_(mask))
        contributors += mask
    return task_vectors, contributors


def merge_unique_and_shared(
    base: torch.Tensor,
    task_vectors: list[torch.Tensor],
    contributors: torch.Tensor,
    unique_scales: list[float],
) -> torch.Tensor:
    """θ_base + Σᵢ δᵢ·(λᵢ on entries only model i changed, 1/count on shared ones).

    The task vectors are already zero where unchanged, so the plain sum divided by the count is
    the shared average where count ≥ 2 and the single task vector where count = 1; the unique
    boost λᵢ − 1 is added on top for count = 1.
    """
    changed_sum = torch.zeros_like(base)
    for task_vector in task_vectors:
        changed_sum.add_(task_vector)
    merged = changed_sum.div_(contributors.clamp(min=1))
    if any(scale != 1.0 for scale in unique_scales):
        boost = torch.zeros_like(base)
        for task_vector, scale in zip(task_vectors, unique_scales, strict=True):
            boost.add_(task_vector, alpha=scale - 1.0)
        merged.add_(boost.mul_(contributors == 1))
    return merged.add_(base)


@register_method(
    "ram",
    params=[EPSILON],
    base=BaseUse.REQUIRED,
    min_models=1,
    elementwise=True,
    math="θ_base + Σᵢ δᵢ·[|δᵢ|>ε]·(1 if only model i changed the entry else 1/#models that changed it)",
    citation="Reinforced Agent Merging (arXiv:2601.13572); mergekit 'ram'",
    notes="Entries no model changes by more than epsilon keep the base value. Same rule for every tensor.",
)
def ram(tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    task_vectors, contributors = changed_task_vectors(tensors, base, epsilon)
    return merge_unique_and_shared(base, task_vectors, contributors, [1.0] * len(tensors))


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
    citation="Reinforced Agent Merging, RAM+ (arXiv:2601.13572); mergekit 'ramplus_tl'",
    notes=(
        "The ratio is counted per tensor ('tensor-local'), so the method is not elementwise. As in "
        "mergekit 0.1.5, ρ = #shared/max(#unique, epsilon) and λ are float32, and the boosted unique "
        "entries, the sum and the base are added in float32 (the shared averages in the task "
        "vectors' dtype): a bf16 --math-dtype recipe merge rounds as mergekit does."
    ),
)
def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    task_vectors, contributors = changed_task_vectors(tensors, base, epsilon)
    unique = contributors == 1
    shared = contributors > 1
    shared_counts = contributors.clamp(min=1)
    # mergekit 0.1.5 computes the λᵢ in float32 and multiplies the 16-bit task vectors by them,
    # which widens the unique part, the sum and the addition of the base to float32; the shared
    # part (δ/count) stays in the task vectors' dtype. The same here, so that a 16-bit
    # --math-dtype recipe rounds as mergekit does; float32 and float64 math are unchanged by it.
    wide = torch.promote_types(base.dtype, torch.float32)
    merged = torch.zeros(base.shape, dtype=wide, device=base.device)
    for task_vector in task_vectors:
        changed = task_vector != 0
        unique_count = int((changed & unique).sum())
        shared_count = int(changed.sum()) - unique_count
        # ρ = #shared / max(#unique, epsilon), clipped to [0, α], and λ = 1 + r·ρ, in float32
        # arithmetic as mergekit does it (with no unique entries λ multiplies nothing).
        ratio = torch.tensor(float(shared_count), dtype=wide) / torch.tensor(max(float(unique_count), epsilon), dtype=wide)
        if not torch.isfinite(ratio):  # epsilon = 0 and no unique entries: λ is unused
            ratio = torch.zeros((), dtype=wide)
        unique_scale = 1 + r * ratio.clamp(min=0.0, max=alpha)
        merged.add_((task_vector * unique).to(wide).mul_(unique_scale.to(base.device)))
        merged.add_(((task_vector * shared) / shared_counts).to(wide))
    return merged.add_(base).to(base.dtype)
