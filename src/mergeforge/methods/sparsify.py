"""Masks shared by the task-vector family: magnitude top-k (TIES), Bernoulli drop (DARE),
outlier-trimmed magnitude (Model Breadcrumbs), rank-dependent drop (DELLA), and the rescale that
restores a masked vector's L1 norm (mergekit's ``rescale``).

Every function here takes and returns torch tensors; none does I/O or registers anything. The
NumPy side of the same masks is in :mod:`mergeforge.methods._task_vector_kernels`, whose exact
top-k and DARE draws these reuse, so both give the same masks.
"""

from __future__ import annotations

import numpy as np
import torch

from mergeforge.methods._task_vector_kernels import TopK, bernoulli_keep, outlier_counts
from mergeforge.methods.kernels import block_index, ranges


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries of largest ``values``; entries equal to the k-th
    largest are kept in order of position. Linear time (a selection, not a sort), and the same
    mask on every device."""
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if values.device.type == "cpu" and values.dtype == torch.float32:
        keys = values.reshape(-1).numpy()
        return torch.from_numpy(TopK(keys, k).mask(keys, 0)).view(values.shape)
    flat = values.reshape(-1)
    threshold = torch.kthvalue(flat, n - k + 1).values
    keep = flat > threshold
    equal = flat == threshold
    keep |= equal & (equal.cumsum(0) <= k - int(keep.sum()))
    return keep.view(values.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude (TIES' trim step)."""
    return topk_mask(delta.abs(), int(density * delta.numel()))


def bernoulli_mask(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE's drop step).

    The draws are NumPy's, per block of the flattened tensor, from ``seed`` and the block index,
    so a seed gives the same mask on every device and in the NumPy kernel."""
    n = delta.numel()
    keep = np.empty(n, dtype=bool)
    for start, stop in ranges(n):
        keep[start:stop] = bernoulli_keep(seed, block_index(start), stop - start, density)
    return torch.from_numpy(keep).view(delta.shape).to(delta.device)


def outlier_trimmed_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest magnitudes, then the smallest, so that ``density``
    remains (Model Breadcrumbs). When ``gamma + density > 1`` fewer large ones are dropped."""
    n = delta.numel()
    n_top, n_bottom = outlier_counts(n, density, gamma)
    magnitude = delta.abs()
    below_top = ~topk_mask(magnitude, n_top)
    above_bottom = topk_mask(magnitude, n - n_bottom)
    return below_top & above_bottom


def rank_probability_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DELLA's MagPrune: within each row, keep probability rises linearly with magnitude rank from
    ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    rows = rows.reshape(rows.shape[0], -1)
    # Each entry's rank in its row: the inverse of the sorting permutation, by one scatter (the
    # same ranks as sorting the permutation again, in linear time).
    order = rows.abs().argsort(dim=1)
    positions = torch.arange(rows.shape[1], dtype=torch.float32, device=delta.device).expand(rows.shape[0], -1)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=delta.device).scatter_(1, order, positions)
    del order
    width = max(rows.shape[1] - 1, 1)
    probability = (density - epsilon) + (ranks / width) * (2 * epsilon)
    draws = torch.rand(probability.shape, generator=generator, device=delta.device, dtype=torch.float32)
    return (draws < probability).reshape(delta.shape)


def apply_mask(delta: torch.Tensor, keep_mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """Zero the dropped entries; with ``rescale``, scale the rest so the L1 norm is unchanged
    (mergekit's rescale; equal to DARE's 1/density in expectation)."""
    kept = delta * keep_mask
    if not rescale:
        return kept
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)
