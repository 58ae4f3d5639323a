"""The CPU math of the simplest and most used merge methods, in NumPy, block by block.

This is the one CPU implementation of these methods: the torch methods call it on CPU tensors
(zero-copy), and the torch-free fast path calls it on arrays read straight from disk, so both give
the same bytes. Inputs are flat arrays in their stored dtype (:class:`Source`); each kernel is a
generator of ``(start, float32 block)`` over the flattened output, so a caller holds one block of
temporaries (``BLOCK`` elements) rather than several copies of a large tensor.

- ``linear``: model soups, Wortsman et al. 2022 (arXiv:2203.05482).
- ``slerp``: Shoemake 1985, over the flattened tensors (mergekit's ``slerp``).
- Task arithmetic (arXiv:2212.04089), TIES (arXiv:2306.01708), DARE (arXiv:2311.03099) and Model
  Breadcrumbs (arXiv:2312.06795): ``task_vector_merge``.

Exact top-k (TIES, Breadcrumbs) needs one threshold per task vector: it is found with a linear-time
selection (``np.partition``) on the magnitudes, and entries equal to the threshold are kept in
order of position until exactly k are kept, so the result is exact, deterministic and independent
of thread count or device. DARE's random draws come from NumPy's SFC64, seeded per block from the
job's seed and the block index, so the same seed gives the same bytes on any device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mergeforge.fastpath.arrays import to_f32

BLOCK = 1 << 20  # elements per block: 4 MB of float32, a few times the L2 cache
# A sparsified merge passes over its task vectors two or three times (threshold or rescale, then
# merge); tensors whose task vectors and base fit in this many bytes of float32 are widened once
# and held, larger ones are re-read block by block on each pass.
CACHE_BYTES = 128 * 1024**2


@dataclass(frozen=True)
class Source:
    """One input tensor, flattened, in its stored dtype (``array`` is ``STORAGE[dtype]``)."""

    array: np.ndarray
    dtype: str

    @property
    def size(self) -> int:
        return self.array.size

    def block(self, start: int, stop: int) -> np.ndarray:
        """Float32 values of ``[start, stop)``, in new memory the caller may modify."""
        return to_f32(self.array[start:stop], self.dtype)


Blocks = Iterator[tuple[int, np.ndarray]]


def _ranges(size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, size, BLOCK):
        yield start, min(size, start + BLOCK)


# -- linear -----------------------------------------------------------------------------------


def linear(tensors: Sequence[Source], weights: Sequence[float], normalize: bool) -> Blocks:
    """Σ wᵢ·tᵢ, divided by Σ wᵢ when ``normalize`` (the caller checks Σ wᵢ ≠ 0)."""
    weight_sum = float(sum(weights))
    for start, stop in _ranges(tensors[0].size):
        total = tensors[0].block(start, stop)
        total *= np.float32(weights[0])
        for tensor, weight in zip(tensors[1:], weights[1:]):
            term = tensor.block(start, stop)
            term *= np.float32(weight)
            total += term
        if normalize:
            total /= np.float32(weight_sum)
        yield start, total


# -- slerp ------------------------------------------------------------------------------------


def slerp_scales(t: float, start: Source, end: Source, dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[float, float]:
    """The two coefficients of slerp (or of lerp when the tensors are nearly colinear)."""
    start_sq = end_sq = dot = 0.0
    for lo, hi in _ranges(start.size):
        a, b = start.block(lo, hi), end.block(lo, hi)
        start_sq += float(np.dot(a, a))
        end_sq += float(np.dot(b, b))
        dot += float(np.dot(a, b))
    start_norm, end_norm = math.sqrt(start_sq), math.sqrt(end_sq)
    cosine = dot / ((start_norm if start_norm > eps else 1.0) * (end_norm if end_norm > eps else 1.0))
    if abs(cosine) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cosine)))
    sin_theta = math.sin(theta)
    return math.sin(theta * (1 - t)) / sin_theta, math.sin(theta * t) / sin_theta


def slerp(t: float, start: Source, end: Source) -> Blocks:
    """Spherical interpolation between two flattened tensors; lerp when nearly colinear."""
    start_scale, end_scale = slerp_scales(t, start, end)
    for lo, hi in _ranges(start.size):
        a = start.block(lo, hi)
        a *= np.float32(start_scale)
        b = end.block(lo, hi)
        b *= np.float32(end_scale)
        a += b
        yield lo, a


# -- masks ------------------------------------------------------------------------------------


class TopK:
    """Selects exactly ``k`` entries of largest ``keys`` (ties kept in order of position).

    Keys are non-negative float32 (magnitudes). Built from the whole key array once (a linear-time
    selection); :meth:`mask` is then asked for consecutive blocks, in order.
    """

    def __init__(self, keys: np.ndarray, k: int):
        n = keys.size
        self.keep_all = k >= n
        self.keep_none = k <= 0
        self.threshold = np.uint32(0)
        self._equal_left = 0
        if self.keep_all or self.keep_none:
            return
        position = n - k
        # Non-negative float32 values order as their bit patterns, and integer selection is faster.
        bits = keys.view(np.uint32)
        bits.partition(position)  # in place: the caller's array is scratch
        self.threshold = bits[position]
        above = int(np.count_nonzero(bits[position + 1:] > self.threshold))
        self._equal_left = k - above

    def mask(self, keys: np.ndarray) -> np.ndarray:
        """Keep mask of the next block, given its keys (non-negative float32)."""
        if self.keep_all:
            return np.ones(keys.shape, dtype=bool)
        if self.keep_none:
            return np.zeros(keys.shape, dtype=bool)
        keys = keys.view(np.uint32)
        keep = keys > self.threshold
        if self._equal_left:
            equal = np.flatnonzero(keys == self.threshold)
            if equal.size:
                chosen = equal[: self._equal_left]
                keep[chosen] = True
                self._equal_left -= chosen.size
        return keep


class TaskVector:
    """δ = tensor − base, block by block. With ``base_whole`` (the base, widened), δ is computed
    once and held whole, so later passes neither read nor widen the inputs again."""

    def __init__(self, tensor: Source, base: Source, base_whole: np.ndarray | None = None):
        self.size = tensor.size
        self._tensor, self._base = tensor, base
        self._whole: np.ndarray | None = None
        if base_whole is not None:
            whole = tensor.block(0, self.size)
            whole -= base_whole
            self._whole = whole

    def block(self, start: int, stop: int) -> np.ndarray:
        """δ over ``[start, stop)``, in new memory the caller may modify."""
        if self._whole is not None:
            return self._whole[start:stop].copy()
        delta = self._tensor.block(start, stop)
        delta -= self._base.block(start, stop)
        return delta


def magnitudes(vector: TaskVector) -> np.ndarray:
    """|δ| for the whole tensor (the keys of a magnitude top-k)."""
    keys = np.empty(vector.size, dtype=np.float32)
    for lo, hi in _ranges(vector.size):
        np.abs(vector.block(lo, hi), out=keys[lo:hi])
    return keys


def bernoulli_keep(seed: int, block_index: int, count: int, density: float) -> np.ndarray:
    """DARE's keep mask for one block: each entry kept with probability ``density``.

    Draws are 32-bit integers from an SFC64 stream seeded by ``(seed, block_index)`` (two draws per
    64-bit output; about twice as fast as float draws); an entry is kept when its draw is below
    ``density·2³²``."""
    generator = np.random.SFC64(np.random.SeedSequence([seed, block_index]))
    draws = generator.random_raw((count + 1) // 2).view(np.uint32)[:count]
    return draws < np.uint32(min(int(density * 2**32), 2**32 - 1))


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs' cut: how many of ``n`` entries to drop from the top (the ``gamma``
    fraction of largest magnitudes) and from the bottom, so that ``density`` remains. When
    ``gamma + density > 1`` fewer large ones are dropped."""
    n_top = int(gamma * n)
    n_bottom = n - int(density * n) - n_top
    if n_bottom < 0:
        return n_top + n_bottom, 0
    return n_top, n_bottom


class Sparsifier:
    """One task vector's keep mask, block by block: ``magnitude`` (TIES), ``bernoulli`` (DARE) or
    ``outliers`` (Breadcrumbs: drop the top ``gamma`` and the smallest, keeping ``density``)."""

    def __init__(self, kind: str, vector: TaskVector, density: float, gamma: float = 0.0, seed: int = 0):
        self.kind = kind
        self.density = density
        self.seed = seed
        n = vector.size
        self._top: TopK | None = None
        self._bottom: TopK | None = None
        self._packed: list[np.ndarray] | None = None  # DARE masks kept (1 bit each) by the rescale pass
        if kind == "magnitude":
            self._bottom = TopK(magnitudes(vector), int(density * n))
        elif kind == "outliers":
            n_top, n_bottom = outlier_counts(n, density, gamma)
            keys = magnitudes(vector)
            self._top = TopK(keys.copy(), n_top)
            self._bottom = TopK(keys, n - n_bottom)
        elif kind != "bernoulli":
            raise ValueError(f"unknown sparsifier '{kind}'")

    def mask(self, delta: np.ndarray, start: int) -> np.ndarray:
        if self.kind == "bernoulli":
            if self._packed is not None and start // BLOCK < len(self._packed):
                return np.unpackbits(self._packed[start // BLOCK], count=delta.size).view(bool)
            keep = bernoulli_keep(self.seed, start // BLOCK, delta.size, self.density)
            if self._packed is not None:
                self._packed.append(np.packbits(keep))  # drawn once, reused by the merge pass
            return keep
        keys = np.abs(delta)
        keep = self._bottom.mask(keys)  # type: ignore[union-attr]
        if self._top is not None:
            keep &= ~self._top.mask(keys)
        return keep


# -- the task-vector family ------------------------------------------------------------------


def task_vector_merge(
    tensors: Sequence[Source],
    base: Source,
    *,
    weights: Sequence[float],
    lambda_: float,
    normalize: bool,
    rescale: bool,
    sparsify: str | None,
    densities: Sequence[float],
    gammas: Sequence[float] | None = None,
    consensus: bool,
    seed: int = 0,
) -> Blocks:
    """θ_base + λ·merge(sparsify(θᵢ − θ_base)), the frame of every task-vector method.

    ``sparsify``: None, ``magnitude``, ``bernoulli`` or ``outliers``; a model with density 1 is not
    sparsified. ``rescale`` scales each kept task vector to its original L1 norm. ``consensus``
    keeps only entries whose sign agrees with sign(Σ wᵢδᵢ) and, with ``normalize``, divides by the
    agreeing weights (else by Σ wᵢ).
    """
    n = base.size
    passes = sparsify is not None and any(d < 1 for d in densities)
    base_whole = base.block(0, n) if passes and n * 4 * (len(tensors) + 1) <= CACHE_BYTES else None
    vectors = [TaskVector(tensor, base, base_whole) for tensor in tensors]
    sparsifiers: list[Sparsifier | None] = []
    for index, vector in enumerate(vectors):
        if sparsify is None or densities[index] >= 1:
            sparsifiers.append(None)
            continue
        gamma = gammas[index] if gammas is not None else 0.0
        sparsifiers.append(Sparsifier(sparsify, vector, densities[index], gamma, seed + index))
    scales = [1.0] * len(tensors)
    if rescale:
        scales = _rescale_factors(vectors, sparsifiers)
    weight_sum = float(sum(weights))
    plain_divisor = weight_sum if abs(weight_sum) >= 1e-8 else 1.0
    for lo, hi in _ranges(n):
        base_block = base_whole[lo:hi] if base_whole is not None else base.block(lo, hi)
        weighted = []
        for vector, sparsifier, weight, scale in zip(vectors, sparsifiers, weights, scales):
            delta = vector.block(lo, hi)
            if sparsifier is not None:
                delta *= sparsifier.mask(delta, lo).astype(np.float32)  # float x float: faster than x bool
                if scale != 1.0:
                    delta *= np.float32(scale)
            delta *= np.float32(weight)
            weighted.append(delta)
        merged = np.zeros(hi - lo, dtype=np.float32)
        if consensus:
            total = weighted[0].copy()
            for delta in weighted[1:]:
                total += delta
            # +1 where the elected sign is positive (a zero sum counts as positive), else -1.
            elected_sign = (total >= 0).astype(np.float32)
            elected_sign *= 2
            elected_sign -= 1
            divisor = np.zeros(hi - lo, dtype=np.float32)
            for delta, weight in zip(weighted, weights):
                # δ agrees when δ·sign > 0 (exact: sign is ±1), applied as a 0/1 float factor:
                # NumPy's where= and np.where on booleans take slow scalar loops (10-20x slower).
                factor = ((delta * elected_sign) > 0).astype(np.float32)
                delta *= factor
                merged += delta
                factor *= np.float32(weight)
                divisor += factor
            if normalize:
                divisor[divisor == 0] = 1
                merged /= divisor
        else:
            for delta in weighted:
                merged += delta
            if normalize:
                merged /= np.float32(plain_divisor)
        if lambda_ != 1.0:
            merged *= np.float32(lambda_)
        merged += base_block
        yield lo, merged


def _rescale_factors(vectors: Sequence[TaskVector], sparsifiers: Sequence[Sparsifier | None]) -> list[float]:
    """‖δᵢ‖₁ / ‖mask(δᵢ)‖₁ for each sparsified task vector (1 when either norm is ~0).

    Masks are drawn again in the merge pass: magnitude masks from their thresholds, DARE's from
    the same per-block seeds, so the kept entries are the same ones.
    """
    factors = []
    for vector, sparsifier in zip(vectors, sparsifiers):
        if sparsifier is None:
            factors.append(1.0)
            continue
        if sparsifier.kind == "bernoulli":
            sparsifier._packed = []
        probe = Sparsifier.__new__(Sparsifier)
        probe.__dict__.update(sparsifier.__dict__)
        probe._top = _copy_topk(sparsifier._top)
        probe._bottom = _copy_topk(sparsifier._bottom)
        before = after = 0.0
        for lo, hi in _ranges(vector.size):
            delta = vector.block(lo, hi)
            magnitude = np.abs(delta)
            before += float(magnitude.sum(dtype=np.float64))
            magnitude *= probe.mask(delta, lo).astype(np.float32)  # not boolean indexing: a slow gather
            after += float(magnitude.sum(dtype=np.float64))
        factors.append(before / after if before >= 1e-7 and after >= 1e-7 else 1.0)
    return factors


def _copy_topk(selector: TopK | None) -> TopK | None:
    if selector is None:
        return None
    copy = TopK.__new__(TopK)
    copy.__dict__.update(selector.__dict__)
    return copy


def collect(blocks: Blocks, size: int) -> np.ndarray:
    """All blocks of a kernel into one float32 array."""
    out = np.empty(size, dtype=np.float32)
    for start, block in blocks:
        out[start:start + block.size] = block
    return out
