"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, "Task Singular Vectors:
Reducing Task Interference in Model Merging", arXiv:2412.00081).

For each weight matrix, every task matrix Δᵢ = θᵢ − θ_base is compressed to its top k = ⌊r/T⌋
singular triplets (r = min(rows, cols), T tasks), so the T low-rank parts together fit in rank r.
Their singular vectors are concatenated, U = [U₁ … U_T], V = [V₁ … V_T], and decorrelated by
replacing each with its nearest orthogonal matrix (orthogonal Procrustes, U⊥ = P Qᵀ for
U = P S Qᵀ), which removes the interference between tasks' subspaces. The merged matrix is
U⊥ diag(Σ₁ … Σ_T) V⊥ᵀ, scaled by α (the paper uses α = 1 throughout) and added to the base.

Tensors that are not matrices (norms, biases) get the mean task vector, as in the paper's
implementation. Large matrices take the Gram-matrix route of :mod:`mergeforge.methods._spectral`;
``exact_svd: true`` uses full SVDs instead.
"""

from __future__ import annotations

import torch

from mergeforge.methods import _spectral
from mergeforge.methods.registry import BaseUse, Param, register_method

LAMBDA = Param("lambda", 1.0, help="scale α of the merged task vector (the paper uses 1.0)", scales_result=True)
EXACT_SVD = Param("exact_svd", False, kind="bool", help="full SVDs instead of the faster Gram-matrix route (see docs/methods.md)")


def mean_task_vector(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(task_vectors[0])
    for task_vector in task_vectors:
        total.add_(task_vector)
    return total.div_(len(task_vectors))


def task_singular_vectors_merge(task_vectors: list[torch.Tensor], exact_svd: bool) -> torch.Tensor:
    """TSV-M's merged task matrix for one weight matrix."""
    rank_per_task = max(1, min(task_vectors[0].shape) // len(task_vectors))
    lefts, singular_values, rights_h = [], [], []
    for task_vector in task_vectors:
        u, s, vh = _spectral.top_singular_triplets(task_vector, rank_per_task, exact_svd)
        lefts.append(u)
        singular_values.append(s)
        rights_h.append(vh)
    return _spectral.whitened_product(torch.cat(lefts, dim=1), torch.cat(singular_values), torch.cat(rights_h, dim=0), exact_svd)


@register_method(
    "tsv",
    float32_math=True,  # torch has no 16-bit SVD on the CPU
    params=[LAMBDA, EXACT_SVD],
    base=BaseUse.REQUIRED,
    math="per matrix: top ⌊r/T⌋ SVD triplets of each Δᵢ; U⊥, V⊥ = polar([U₁…U_T]), polar([V₁…V_T]); θ_base + α·U⊥ diag(Σ) V⊥ᵀ",
    citation="Gargiulo et al. 2025, Task Singular Vectors (TSV-M), CVPR 2025 (arXiv:2412.00081)",
    aliases=("tsv_m",),
    notes=(
        "Non-matrix tensors (norms, biases): mean task vector. Embeddings and output heads are matrices and "
        "are merged like any other. No weights: each task keeps an equal share of the rank."
    ),
)
def tsv(tensors: list[torch.Tensor], base: torch.Tensor, *, lambda_: float, exact_svd: bool) -> torch.Tensor:
    task_vectors = [tensor - base for tensor in tensors]
    if base.ndim == 2:
        merged = task_singular_vectors_merge(task_vectors, exact_svd)
    else:
        merged = mean_task_vector(task_vectors)
    return merged.mul_(lambda_).add_(base)
