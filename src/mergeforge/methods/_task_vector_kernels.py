"""The task-vector family's NumPy kernel (task arithmetic, TIES, DARE, Model Breadcrumbs) and the
masks it draws, block by block. Torch-free; see :mod:`mergeforge.methods.task_vectors` for the
family and its papers.

Exact top-k (TIES, Breadcrumbs) needs one threshold per task vector: it is found with a linear-time
selection on the magnitudes (:func:`select`), and entries equal to the threshold are kept in
order of position until exactly k are kept, so the result is exact, deterministic and independent
of thread count or device. DARE's random draws come from NumPy's SFC64, seeded per block from the
job's seed and the block index, so the same seed gives the same bytes on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergeforge.methods.kernels import Blocks, Source, block_index, held_blocks, ranges

# A sparsified merge passes over its task vectors two or three times (threshold or rescale, then
# merge); tensors whose task vectors and base fit in this many bytes of float32 are widened once
# and held, larger ones are re-read block by block on each pass.
CACHE_BYTES = 128 * 1024**2


# -- masks ------------------------------------------------------------------------------------


SAMPLE = 1 << 15  # entries of the random sample that brackets a selection


def select(values: np.ndarray, position: int) -> np.generic:
    """The value at ``position`` of ``values`` sorted ascending (flat; left unchanged)."""
    return select_counted(values, position)[0]


def select_counted(values: np.ndarray, position: int) -> tuple[np.generic, int, int]:
    """:func:`select`'s value, with how many entries are below it and how many equal it.

    Floyd and Rivest's sampling selection (CACM 1975): a sorted random sample brackets the
    answer within a few standard errors, one pass counts the entries below the bracket and
    gathers those inside it, and a partition of that small set finishes. When values repeat (the
    magnitudes of bf16 checkpoints' task vectors take a few thousand values), the sample's own
    estimate is checked first, since a long run of one value often holds the answer, and
    partitioning long runs is slow. Several times faster than ``np.partition`` of everything;
    when the bracket misses (an adversarial order), it partitions everything."""
    n = values.size
    if n > 4 * SAMPLE:
        sample = np.sort(values[np.random.default_rng(n).integers(0, n, SAMPLE)])  # fixed draws: deterministic
        at = position / n * sample.size
        guess = sample[min(sample.size - 1, int(at))]
        below = int(np.count_nonzero(values < guess))
        equal = int(np.count_nonzero(values == guess))
        if below <= position < below + equal:
            return guess, below, equal  # the usual case when values repeat: a long run of one value
        margin = 4.0 * np.sqrt(sample.size)
        low = sample[max(0, int(at - margin))]
        high = sample[min(sample.size - 1, int(at + margin) + 1)]
        below = int(np.count_nonzero(values < low))
        inside = values[(values >= low) & (values <= high)]
        if below <= position < below + inside.size:
            inside.partition(position - below)
            value = inside[position - below]  # every entry equal to it lies inside the bracket
            return value, below + int(np.count_nonzero(inside < value)), int(np.count_nonzero(inside == value))
    value = np.partition(values, position)[position]
    return value, int(np.count_nonzero(values < value)), int(np.count_nonzero(values == value))


class TopK:
    """Selects exactly ``k`` entries of largest ``keys`` (ties kept in order of position).

    Keys are non-negative float32 (magnitudes), left unchanged. Built from the whole key array once
    (a linear-time selection, :func:`select`, and the position of the last tie kept); :meth:`mask`
    then gives the mask of any block, from its keys and where it begins.
    """

    def __init__(self, keys: np.ndarray, k: int):
        n = keys.size
        self.keep_all = k >= n
        self.keep_none = k <= 0
        self.threshold = np.uint32(0)
        self.last_tie = -1  # position of the last entry equal to the threshold that is kept
        if self.keep_all or self.keep_none:
            return
        # Non-negative float32 values order as their bit patterns, and integer selection is faster.
        bits = keys.view(np.uint32)
        threshold, below, equal = select_counted(bits, n - k)
        self.threshold = np.uint32(threshold)
        ties = k - (n - below - equal)  # in [1, equal]: the first ``ties`` entries equal to the threshold are kept
        for start, stop in ranges(n):  # find the last of them, reading no further than it
            equal_here = bits[start:stop] == self.threshold
            found = int(np.count_nonzero(equal_here))
            if ties <= found:
                self.last_tie = start + int(np.flatnonzero(equal_here)[ties - 1])
                break
            ties -= found

    def mask(self, keys: np.ndarray, start: int) -> np.ndarray:
        """The keep mask of the block of keys that begins at element ``start``."""
        if self.keep_all:
            return np.ones(keys.shape, dtype=bool)
        if self.keep_none:
            return np.zeros(keys.shape, dtype=bool)
        keys = keys.view(np.uint32)
        if start + keys.size <= self.last_tie + 1:  # every tie in this block is kept
            return keys >= self.threshold
        keep = keys > self.threshold
        if start <= self.last_tie:
            head = self.last_tie + 1 - start
            keep[:head] |= keys[:head] == self.threshold
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
    for lo, hi in ranges(vector.size):
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
    """One task vector's keep mask: ``magnitude`` (TIES), ``bernoulli`` (DARE) or ``outliers``
    (Breadcrumbs: drop the top ``gamma`` and the smallest, keeping ``density``).

    Masks are asked for block by block, in order, within one pass (:meth:`start_pass`); a vector
    may be passed over more than once (rescale, then merge) and gets the same masks each time.
    With ``remember_draws``, DARE's masks are kept (1 bit an entry) by the first pass and reused,
    instead of drawn again.
    """

    def __init__(self, kind: str, vector: TaskVector, density: float, gamma: float = 0.0, seed: int = 0,
                 remember_draws: bool = False):
        self.kind = kind
        self.density = density
        self.seed = seed
        n = vector.size
        self.top: TopK | None = None  # outliers: the largest entries, dropped
        self.bottom: TopK | None = None  # the entries kept (before the top is dropped)
        self.draws: list[np.ndarray] | None = [] if kind == "bernoulli" and remember_draws else None
        if kind == "magnitude":
            self.bottom = TopK(magnitudes(vector), int(density * n))
        elif kind == "outliers":
            n_top, n_bottom = outlier_counts(n, density, gamma)
            keys = magnitudes(vector)
            self.top = TopK(keys, n_top)
            self.bottom = TopK(keys, n - n_bottom)
        elif kind != "bernoulli":
            raise ValueError(f"unknown sparsifier '{kind}'")

    def start_pass(self) -> MaskPass:
        return MaskPass(self)


class MaskPass:
    """One pass of a :class:`Sparsifier` over its vector's blocks, in order."""

    def __init__(self, sparsifier: Sparsifier):
        self.sparsifier = sparsifier

    def mask(self, delta: np.ndarray, start: int) -> np.ndarray:
        """The keep mask of the block of ``delta`` that begins at element ``start``."""
        sparsifier = self.sparsifier
        if sparsifier.kind == "bernoulli":
            index, draws = block_index(start), sparsifier.draws
            if draws is not None and index < len(draws):
                return np.unpackbits(draws[index], count=delta.size).view(bool)
            keep = bernoulli_keep(sparsifier.seed, index, delta.size, sparsifier.density)
            if draws is not None:
                draws.append(np.packbits(keep))
            return keep
        keys = np.abs(delta)
        assert sparsifier.bottom is not None
        keep = sparsifier.bottom.mask(keys, start)
        if sparsifier.top is not None:
            keep &= ~sparsifier.top.mask(keys, start)
        return keep


# -- the task-vector family ------------------------------------------------------------------


def task_vector_kernel(
    tensors: Sequence[Source],
    base: Source | None,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    lambda_: float,
    normalize: bool,
    rescale: bool,
    int8_mask: bool,
    gamma: Sequence[float] | None = None,
    seed: int = 0,
    sparsify: str | None,
    consensus: bool,
) -> Blocks:
    """θ_base + λ·merge(sparsify(θᵢ − θ_base)), the frame of every task-vector method.

    ``sparsify``: None, ``magnitude``, ``bernoulli`` or ``outliers``; a model with density 1 is not
    sparsified. ``rescale`` scales each kept task vector to its original L1 norm. ``consensus``
    keeps only entries whose sign agrees with sign(Σ wᵢδᵢ) and, with ``normalize``, divides by the
    agreeing weights (else by Σ wᵢ). ``int8_mask`` is accepted for mergekit recipes; masks are
    always compact here.
    """
    assert base is not None
    n = base.size
    kind = sparsify
    passes = kind is not None and any(d < 1 for d in density)
    base_whole = base.block(0, n) if passes and n * 4 * (len(tensors) + 1) <= CACHE_BYTES else None
    vectors = [TaskVector(tensor, base, base_whole) for tensor in tensors]
    sparsifiers: list[Sparsifier | None] = []
    for index, vector in enumerate(vectors):
        if kind is None or density[index] >= 1:
            sparsifiers.append(None)
            continue
        model_gamma = gamma[index] if gamma is not None else 0.0
        sparsifiers.append(Sparsifier(kind, vector, density[index], model_gamma, seed + index, remember_draws=rescale))
    scales = _rescale_factors(vectors, sparsifiers) if rescale else [1.0] * len(tensors)
    mask_passes = [s.start_pass() if s is not None else None for s in sparsifiers]
    weight_sum = float(sum(weight))
    plain_divisor = weight_sum if abs(weight_sum) >= 1e-8 else 1.0
    for lo, hi in ranges(n):
        base_block = base_whole[lo:hi] if base_whole is not None else base.block(lo, hi)
        weighted = []
        for vector, mask_pass, model_weight, scale in zip(vectors, mask_passes, weight, scales):
            delta = vector.block(lo, hi)
            if mask_pass is not None:
                delta *= mask_pass.mask(delta, lo).astype(np.float32)  # float x float: faster than x bool
                if scale != 1.0:
                    delta *= np.float32(scale)
            delta *= np.float32(model_weight)
            weighted.append(delta)
        merged = np.zeros(hi - lo, dtype=np.float32)
        # TIES' disjoint merge, inline: in a helper, its block-sized temporaries would be freed
        # together on return, glibc would give that memory back to the OS, and the next block's
        # allocations would fault their pages in again (measured: DARE 25% slower on a 32M-entry tensor).
        if consensus:
            total = weighted[0].copy()
            for delta in weighted[1:]:
                total += delta
            # +1 where the elected sign is positive (a zero sum counts as positive), else -1.
            elected_sign = (total >= 0).astype(np.float32)
            elected_sign *= 2
            elected_sign -= 1
            divisor = np.zeros(hi - lo, dtype=np.float32)
            for delta, model_weight in zip(weighted, weight):
                # δ agrees when δ·sign > 0 (exact: sign is ±1), applied as a 0/1 float factor:
                # NumPy's where= and np.where on booleans take slow scalar loops (10-20x slower).
                factor = ((delta * elected_sign) > 0).astype(np.float32)
                delta *= factor
                merged += delta
                factor *= np.float32(model_weight)
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


def task_vector_peak(numel: int, inputs: int, *, sparsify: str | None) -> int:
    """Bytes one worker holds for one tensor: blocks of the base, the sign-election sum, the merged
    block and the divisor beside one per input; task vectors widened once and held when they fit in
    :data:`CACHE_BYTES`; the magnitudes whose k-th largest is a top-k threshold (two copies for
    Breadcrumbs), or DARE's masks kept as bits between the rescale and merge passes."""
    peak = held_blocks(numel, 4 + inputs)
    cached = numel * 4 * (inputs + 1)
    if sparsify is not None and cached <= CACHE_BYTES:
        peak += cached
    if sparsify == "magnitude":
        peak += numel * 4
    elif sparsify == "outliers":
        peak += numel * 8
    elif sparsify == "bernoulli":
        peak += numel // 8 * inputs
    return peak


def _rescale_factors(vectors: Sequence[TaskVector], sparsifiers: Sequence[Sparsifier | None]) -> list[float]:
    """‖δᵢ‖₁ / ‖mask(δᵢ)‖₁ for each sparsified task vector (1 when either norm is ~0), from a pass
    of its own: magnitude masks come again from their thresholds, DARE's are remembered."""
    factors = []
    for vector, sparsifier in zip(vectors, sparsifiers):
        if sparsifier is None:
            factors.append(1.0)
            continue
        mask_pass = sparsifier.start_pass()
        before = after = 0.0
        for lo, hi in ranges(vector.size):
            delta = vector.block(lo, hi)
            magnitude = np.abs(delta)
            before += float(magnitude.sum(dtype=np.float64))
            magnitude *= mask_pass.mask(delta, lo).astype(np.float32)  # not boolean indexing: a slow gather
            after += float(magnitude.sum(dtype=np.float64))
        factors.append(before / after if before >= 1e-7 and after >= 1e-7 else 1.0)
    return factors
