"""Fast singular-value building blocks shared by the spectral methods (TSV-M, Iso-C, Iso-CTS).

The methods are written in terms of the SVD, but a full ``torch.linalg.svd`` of a 4096 x 14336
matrix costs about two CPU-minutes, and TSV-M needs six per tensor. The same quantities come
cheaper from the eigendecomposition of a Gram matrix on the short side (one matrix product plus a
symmetric eigensolve of the short side, exact in exact arithmetic):

- **Truncated SVDs** (TSV-M's per-task factors, Iso-CTS's task-specific directions): the top
  eigenvectors of ``A Aᵀ``; a randomized range finder (Halko, Martinsson & Tropp 2011,
  arXiv:0909.4061, Alg. 4.4, power iterations, fixed sketch seed) only for ranks that are a tiny
  share of the short side, since on the slowly decaying spectra of task matrices a sketch of a
  large rank misses the exact directions.
- **Full spectra** (Iso-C's flattened spectrum, Iso-CTS's common subspace): all eigenpairs of the
  Gram matrix, Iso-C's polar factor refined by one Newton-Schulz step.
- **Orthogonal polar factors** (the whitening of TSV-M and Iso-CTS): ``X (XᵀX)^(-1/2)``, and the
  two whitenings of a reassembly are folded into one small core matrix.

Matrices whose short side is at most :data:`EXACT_MAX_SIDE` always use ``torch.linalg.svd``
(fast at that size), as does every matrix when a method is asked for ``exact_svd``.
docs/methods.md reports the measured time and error of the fast route.
"""

from __future__ import annotations

import torch

# At or below this short side a full SVD costs seconds at most (1024 x 3584: about 2 s on one core).
EXACT_MAX_SIDE = 1024
# Extra sketch columns and power iterations of the randomized range finder (Halko et al. 2011).
OVERSAMPLE = 16
POWER_ITERATIONS = 2
# Sketch only ranks below 1/RANDOMIZED_MAX_SHARE of the short side; larger ones take the Gram route.
RANDOMIZED_MAX_SHARE = 64
# The sketch seed: fixed, so one input always gives one output.
SKETCH_SEED = 0x5EED
# Eigenvalues of a Gram matrix below GRAM_FLOOR·eps·λ_max are treated as that floor.
GRAM_FLOOR = 10.0


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)``, factored in the tall orientation: on CPU
    (MKL) a wide matrix takes several times longer than its transpose (measured: 28 s against 4 s
    for 1040 x 14336)."""
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = thin_svd(matrix.mT)
        return vh.mT, s, u.mT
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        # LAPACK's divide and conquer can fail on many repeated singular values (stacked orthonormal
        # blocks); in float64 it converges.
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def use_exact(matrix: torch.Tensor, exact: bool) -> bool:
    return exact or min(matrix.shape) <= EXACT_MAX_SIDE


def _sketch_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(SKETCH_SEED)


def randomized_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets ``(U, S, Vh)`` of ``matrix`` by a randomized range
    finder with :data:`POWER_ITERATIONS` power iterations, re-orthonormalised at every step."""
    rows, cols = matrix.shape
    width = min(rank + OVERSAMPLE, rows, cols)
    sketch = torch.randn(cols, width, generator=_sketch_generator(matrix.device), dtype=matrix.dtype, device=matrix.device)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        # Alternating QR keeps the small singular values from underflowing (Halko et al. Alg. 4.4).
        basis_right = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis_right).Q
    small_u, singular_values, vh = thin_svd(basis.mT @ matrix)
    return (basis @ small_u)[:, :rank], singular_values[:rank], vh[:rank]


def top_singular_triplets(matrix: torch.Tensor, rank: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U[:, :rank], S[:rank], Vh[:rank])`` of ``matrix``: exact SVD for small matrices or when
    asked, else :func:`randomized_svd` when ``rank`` is a tiny part of the short side, else the
    Gram route. Task matrices have slowly decaying spectra, where a sketch of a large rank misses
    the exact directions (measured: 55% difference in TSV-M's result at rank r/4), while the Gram
    route costs little more and stays within float32 rounding of the full SVD."""
    short_side = min(matrix.shape)
    rank = min(rank, short_side)
    if use_exact(matrix, exact):
        u, s, vh = thin_svd(matrix)
        return u[:, :rank], s[:rank], vh[:rank]
    if rank + OVERSAMPLE <= short_side // RANDOMIZED_MAX_SHARE:
        return randomized_svd(matrix, rank)
    return gram_svd(matrix, rank)


def inverse_root(eigenvalues: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """λ^(-1/2) for the eigenvalues of a Gram matrix, with λ floored at GRAM_FLOOR·λ_max.

    A float32 Gram matrix knows its eigenvalues only to about eps·λ_max, so directions whose
    singular value is below about 1e-3 of the largest are noise; the floor makes them fade out
    smoothly instead of being amplified (or, for exact zeros, divided by zero).
    """
    largest = eigenvalues.max().clamp_min(torch.finfo(dtype).tiny)
    return eigenvalues.clamp_min(largest * GRAM_FLOOR * torch.finfo(dtype).eps).rsqrt()


def gram_svd(matrix: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``(U, S, Vh)`` of ``matrix`` through the eigendecomposition of its Gram matrix
    on the short side, singular values in descending order. Directions whose singular value is
    below float32's resolution of the Gram matrix are damped (see :func:`inverse_root`)."""
    transpose = matrix.shape[0] > matrix.shape[1]
    wide = matrix.mT if transpose else matrix  # rows <= cols
    # float32 throughout: float64 products and eigensolves cost 5-10x more on CPU; the error this
    # leaves is measured in docs/methods.md.
    eigenvalues, eigenvectors = torch.linalg.eigh(wide @ wide.mT)
    # Descending, and only the top ``rank``: the product for the other side costs rank rows.
    eigenvalues, eigenvectors = eigenvalues.flip(0)[:rank], eigenvectors.flip(1)[:, :rank]
    singular_values = eigenvalues.clamp_min(0).sqrt()
    left = eigenvectors
    right_h = (inverse_root(eigenvalues, matrix.dtype)[:, None] * left.mT) @ wide
    if transpose:
        return right_h.mT, singular_values, left.mT
    return left, singular_values, right_h


def svd(matrix: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``matrix``: ``torch.linalg.svd`` when small or asked, else :func:`gram_svd`."""
    if use_exact(matrix, exact):
        return thin_svd(matrix)
    return gram_svd(matrix)


def refine_polar(polar: torch.Tensor) -> torch.Tensor:
    """One Newton-Schulz step, X <- (3I - XXᵀ) X / 2 (on the short side): it squares the distance
    of X's singular values from 1, removing most of the float32 Gram route's error for two more
    matrix products."""
    wide = polar.shape[0] <= polar.shape[1]
    gram = polar @ polar.mT if wide else polar.mT @ polar
    correction = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device).mul_(1.5).sub_(gram, alpha=0.5)
    return correction @ polar if wide else polar @ correction


def polar_and_singular_values(matrix: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U Vᵀ, S)`` for ``matrix = U S Vᵀ``: the orthogonal polar factor and the singular values
    (Iso-C). The fast route refines the Gram route's polar factor with :func:`refine_polar`."""
    if use_exact(matrix, exact):
        u, s, vh = thin_svd(matrix)
        return u @ vh, s
    u, s, vh = gram_svd(matrix)
    return refine_polar(u @ vh), s


def inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """G^(-1/2) of a symmetric positive semi-definite Gram matrix (floored, see :func:`inverse_root`)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return (eigenvectors * inverse_root(eigenvalues, gram.dtype)) @ eigenvectors.mT


def orthogonal_polar_factor(matrix: torch.Tensor, exact: bool) -> torch.Tensor:
    """The matrix with orthonormal columns (or rows, if wide) nearest to ``matrix`` in Frobenius
    norm: ``P Qᵀ`` for ``matrix = P Σ Qᵀ`` (orthogonal Procrustes). This is the whitening step
    of TSV-M and Iso-CTS."""
    if use_exact(matrix, exact):
        p, _, qh = thin_svd(matrix)
        return p @ qh
    if matrix.shape[0] >= matrix.shape[1]:
        return matrix @ inverse_sqrt(matrix.mT @ matrix)  # X (XᵀX)^(-1/2)
    return inverse_sqrt(matrix @ matrix.mT) @ matrix


def whitened_product(left: torch.Tensor, singular_values: torch.Tensor, right_h: torch.Tensor, exact: bool) -> torch.Tensor:
    """polar(left) · diag(singular_values) · polar(right_h): TSV-M's and Iso-CTS's reassembly of
    stacked singular vectors. The fast route never forms the two polar factors: with
    polar(L) = L (LᵀL)^(-1/2) and polar(R) = (RRᵀ)^(-1/2) R it multiplies the small core
    (LᵀL)^(-1/2) diag(S) (RRᵀ)^(-1/2) between L and R, saving two large products."""
    inner = left.shape[1]
    if exact or min(left.shape) <= EXACT_MAX_SIDE or inner > left.shape[0] or inner > right_h.shape[1]:
        return (orthogonal_polar_factor(left, exact) * singular_values) @ orthogonal_polar_factor(right_h, exact)
    core = (inverse_sqrt(left.mT @ left) * singular_values) @ inverse_sqrt(right_h @ right_h.mT)
    return (left @ core) @ right_h
