"""Isotropic merging: Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", arXiv:2502.04959).

Iso-C sums the task matrices, Δ = Σᵢ Δᵢ = U Σ Vᵀ, and flattens the spectrum: every singular
value becomes their mean σ̄ = (1/r) Σⱼ σⱼ, giving σ̄ U Vᵀ. Directions that one task needs but the
sum under-weights then count as much as the dominant ones, which the paper shows improves the
alignment of each task with the merged matrix.

Iso-CTS keeps the top k singular directions of the sum (the common subspace, k ≈ f·r with
f = ``common_space_fraction``) and fills the remaining r − k with task-specific directions: for
each task, the top (r − k)/T singular directions of its task matrix projected off the common
subspace, Δᵢ − U_k U_kᵀ Δᵢ. The stacked singular vectors are made orthonormal (orthogonal
Procrustes), and the spectrum is flattened to the mean of all the kept singular values.

Both scale the result by α and add it to the base. Tensors that are not matrices get the mean
task vector, as in the paper's implementation. Large matrices take the Gram-matrix route of
:mod:`mergeforge.methods._spectral`; ``exact_svd: true`` uses full SVDs instead.
"""

from __future__ import annotations

import torch

from mergeforge.methods import _spectral
from mergeforge.methods.registry import BaseUse, Param, register_method
from mergeforge.methods.tsv import EXACT_SVD, mean_task_vector

ALPHA = Param("lambda", 1.0, help="scale α of the merged task vector (tuned on validation data in the paper)",
              scales_result=True)
COMMON_SPACE_FRACTION = Param(
    "common_space_fraction", 0.8, low=0.0, high=1.0, help="share of the rank kept from the summed task matrix (Iso-CTS)"
)
REFERENCE = "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging (ICML 2025, arXiv:2502.04959)"
FALLBACK = "Non-matrix tensors (norms, biases): mean task vector. Embeddings and output heads are merged as matrices."


def summed(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(task_vectors[0])
    for task_vector in task_vectors:
        total.add_(task_vector)
    return total


def isotropic_common(task_vectors: list[torch.Tensor], exact_svd: bool) -> torch.Tensor:
    """Iso-C for one weight matrix: σ̄ U Vᵀ of the summed task matrix."""
    polar, singular_values = _spectral.polar_and_singular_values(summed(task_vectors), exact_svd)
    return polar.mul_(singular_values.mean())


def split_rank(rank: int, fraction: float, tasks: int) -> tuple[int, int]:
    """(common directions, directions per task): the task-specific part is rounded to a multiple
    of the task count, so every task gets the same number of directions."""
    task_specific_total = round((rank - int(rank * fraction)) / tasks) * tasks
    task_specific_total = min(task_specific_total, rank - rank % tasks)
    return rank - task_specific_total, task_specific_total // tasks


def isotropic_common_and_task_specific(task_vectors: list[torch.Tensor], fraction: float, exact_svd: bool) -> torch.Tensor:
    """Iso-CTS for one weight matrix."""
    rank = min(task_vectors[0].shape)
    common, per_task = split_rank(rank, fraction, len(task_vectors))
    u, s, vh = _spectral.top_singular_triplets(summed(task_vectors), common, exact_svd)
    lefts, singular_values, rights_h = [u], [s], [vh]
    if per_task > 0:
        common_left = lefts[0]
        for task_vector in task_vectors:
            outside_common = task_vector - common_left @ (common_left.mT @ task_vector)
            task_u, task_s, task_vh = _spectral.top_singular_triplets(outside_common, per_task, exact_svd)
            lefts.append(task_u)
            singular_values.append(task_s)
            rights_h.append(task_vh)
    # Every kept direction gets the mean of all kept singular values.
    mean_value = torch.cat(singular_values).mean()
    flat = torch.ones(sum(part.shape[0] for part in rights_h), dtype=mean_value.dtype, device=mean_value.device)
    return _spectral.whitened_product(torch.cat(lefts, dim=1), flat.mul_(mean_value), torch.cat(rights_h, dim=0), exact_svd)


@register_method(
    "iso_c",
    float32_math=True,  # torch has no 16-bit SVD on the CPU
    params=[ALPHA, EXACT_SVD],
    base=BaseUse.REQUIRED,
    math="Σᵢ Δᵢ = U Σ Vᵀ; θ_base + α·σ̄ U Vᵀ with σ̄ the mean singular value",
    citation=REFERENCE,
    notes=FALLBACK,
)
def iso_c(tensors: list[torch.Tensor], base: torch.Tensor, *, lambda_: float, exact_svd: bool) -> torch.Tensor:
    task_vectors = [tensor - base for tensor in tensors]
    merged = isotropic_common(task_vectors, exact_svd) if base.ndim == 2 else mean_task_vector(task_vectors)
    return merged.mul_(lambda_).add_(base)


@register_method(
    "iso_cts",
    float32_math=True,  # torch has no 16-bit SVD on the CPU
    params=[ALPHA, COMMON_SPACE_FRACTION, EXACT_SVD],
    base=BaseUse.REQUIRED,
    math="top-k directions of Σᵢ Δᵢ plus each task's top (r−k)/T directions off them; orthogonalise; θ_base + α·σ̄ U Vᵀ",
    citation=REFERENCE,
    notes=FALLBACK + " common_space_fraction 1 gives Iso-C.",
)
def iso_cts(
    tensors: list[torch.Tensor], base: torch.Tensor, *, lambda_: float, common_space_fraction: float, exact_svd: bool
) -> torch.Tensor:
    task_vectors = [tensor - base for tensor in tensors]
    if base.ndim == 2:
        merged = isotropic_common_and_task_specific(task_vectors, common_space_fraction, exact_svd)
    else:
        merged = mean_task_vector(task_vectors)
    return merged.mul_(lambda_).add_(base)
