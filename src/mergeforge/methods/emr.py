"""EMR-merging: Elect, Mask & Rescale (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free
High-Performance Model Merging", arXiv:2405.17461).

- Elect a unified task vector: its sign is that of Σᵢ τᵢ, its magnitude at each entry the largest
  |τᵢ| among the tasks that agree with that sign: τ_uni = γ ⊙ maxᵢ(|τᵢ| ⊙ [τᵢγ > 0]).
- Mask: task i keeps the entries where it agrees with τ_uni, Mᵢ = [τᵢ ⊙ τ_uni > 0].
- Rescale: λᵢ = Σ|τᵢ| / Σ|Mᵢ ⊙ τ_uni|, so task i's modulated vector has its original mean magnitude.

Task i's model is θ_base + λᵢ · Mᵢ ⊙ τ_uni. There are no hyperparameters. The merged output folder
holds θ_base + τ_uni; the masks (one bit per entry per task) and rescalers are written beside it
under ``mergeforge_side/`` and ``mergeforge emr materialize`` rebuilds any task's model.

The paper (and its code) computes one rescaler per task over the whole model; the streaming
engine sees one tensor at a time, so here there is one rescaler per task and tensor, which matches
each tensor's magnitude at least as closely. Every tensor, matrix or not, is merged this way.
"""

from __future__ import annotations

import torch

from mergeforge.methods import task_masks
from mergeforge.methods.registry import BaseUse, register_method


def elect_mask_rescale(task_vectors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ_uni, masks Mᵢ stacked, rescalers λᵢ)."""
    total = torch.zeros_like(task_vectors[0])
    for task_vector in task_vectors:
        total.add_(task_vector)
    # The reference code elects -1 where the sum is exactly 0; those entries then keep only negative updates.
    elected_sign = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    del total
    masks = torch.stack([task_vector * elected_sign > 0 for task_vector in task_vectors])
    magnitude = torch.zeros_like(task_vectors[0])
    for task_vector, mask in zip(task_vectors, masks):
        torch.maximum(magnitude, task_vector.abs() * mask, out=magnitude)
    unified = magnitude.mul_(elected_sign)
    unified_magnitude = unified.abs()
    rescalers = torch.zeros(len(task_vectors), dtype=torch.float32)
    for index, (task_vector, mask) in enumerate(zip(task_vectors, masks)):
        kept = float((unified_magnitude * mask).sum())
        # A task that agrees nowhere keeps nothing: its rescaler does not matter; 0 says so.
        rescalers[index] = float(task_vector.abs().sum()) / kept if kept > 0 else 0.0
    return unified, masks, rescalers


@register_method(
    "emr",
    params=[],
    base=BaseUse.REQUIRED,
    math="τ_uni = sign(Στᵢ) ⊙ max over agreeing |τᵢ|; Mᵢ = [τᵢτ_uni > 0]; λᵢ = Σ|τᵢ|/Σ|Mᵢτ_uni|; task i = θ_base + λᵢMᵢ ⊙ τ_uni",
    citation="Huang et al. 2024, EMR-Merging (NeurIPS 2024, arXiv:2405.17461)",
    aliases=("emr_merging",),
    extra_outputs=task_masks.side_shapes,
    notes=(
        "Writes θ_base + τ_uni and, under mergeforge_side/, 1-bit masks and rescalers per task; "
        "`mergeforge emr materialize OUT --task N DEST` builds task N's model. Applies to every tensor."
    ),
)
def emr(tensors: list[torch.Tensor], base: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unified, masks, rescalers = elect_mask_rescale([tensor - base for tensor in tensors])
    side = {task_masks.MASKS: task_masks.pack(masks), task_masks.SCALES: rescalers}
    return unified.add_(base), side
