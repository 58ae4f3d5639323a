"""Task-vector statistics of models fine-tuned from one base, streamed tensor by tensor.

For each floating tensor that the base and every model hold with one shape, the task vectors are
τᵢ = θᵢ − θ_base, and the sums below accumulate in float64 (the inputs are read one tensor at a
time, so memory is one tensor times the number of models). Every statistic is defined once here,
and aggregated per layer and overall from the same sums:

- **cosine**: ⟨τᵢ, τⱼ⟩ / (‖τᵢ‖ ‖τⱼ‖) over the scope's entries taken as one flat vector (a
  tensor, the tensors of a layer, or the whole model), never a mean of per-tensor cosines;
- **relative norm**: ‖τᵢ‖ / ‖θ_base‖ over the scope;
- **TIES sign conflicts** at ``density``: each τᵢ trimmed to its ``density`` share of largest
  magnitudes (TIES' trim, :func:`mergeforge.methods.sparsify.magnitude_mask`); an entry kept by two
  or more models *conflicts* when their signs differ. Reported as the share of those entries;
- **DARE's rescale**: dropping each entry with probability p = 1 − ``density`` and rescaling by
  1/(1 − p) keeps τ in expectation with variance p/(1 − p)·τ² per entry, so the noise it adds to
  the weights is √(p/(1 − p))·‖τᵢ‖/‖θ_base‖ relative to them. That expected value is reported with
  the one measured on a real draw (:func:`mergeforge.methods.sparsify.bernoulli_mask`);
- **spectra** (the 2-D tensors of the transformer layers): the singular values of each τᵢ, its
  effective rank exp(H(s/Σs)) (Roy & Vetterli 2007), and the subspace alignment ratio of the
  Iso-C paper (Marczak et al. 2025, arXiv:2502.04959), SARᵢ = ‖Π_k τᵢ‖ / ‖τᵢ‖ with Π_k the
  projection onto the top-k left singular vectors of the task-arithmetic sum Στⱼ, k the smallest
  rank that holds :data:`SAR_ENERGY` of its squared norm. Per layer, SAR aggregates as
  √(Σ‖Π_k τᵢ‖² / Σ‖τᵢ‖²) over the layer's matrices.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergeforge.errors import CheckpointError
from mergeforge.methods.kernels import BLOCK, block_index, ranges

SAR_ENERGY = 0.95
SPECTRUM_KEEP = 32  # leading singular values stored per tensor and model (normalised by the largest)


@dataclass
class Sums:
    """The float64 sums that every statistic of a scope comes from."""

    models: int
    entries: int = 0
    base_sq: float = 0.0
    gram: torch.Tensor = field(default=None)  # type: ignore[assignment]  # [models, models]: ⟨τᵢ, τⱼ⟩
    kept_by_two: int = 0  # entries kept by ≥ 2 trimmed task vectors
    conflicts: int = 0  # ... whose kept signs differ
    dare_sq: torch.Tensor = field(default=None)  # type: ignore[assignment]  # ‖dare(τᵢ) − τᵢ‖², measured
    projected_sq: torch.Tensor = field(default=None)  # type: ignore[assignment]  # ‖Π_k τᵢ‖² (spectral tensors)
    spectral_sq: torch.Tensor = field(default=None)  # type: ignore[assignment]  # ‖τᵢ‖² of the spectral tensors

    def __post_init__(self) -> None:
        zeros = torch.zeros(self.models, dtype=torch.float64)
        self.gram = torch.zeros(self.models, self.models, dtype=torch.float64) if self.gram is None else self.gram
        self.dare_sq = zeros.clone() if self.dare_sq is None else self.dare_sq
        self.projected_sq = zeros.clone() if self.projected_sq is None else self.projected_sq
        self.spectral_sq = zeros.clone() if self.spectral_sq is None else self.spectral_sq

    def add(self, other: Sums) -> None:
        self.entries += other.entries
        self.base_sq += other.base_sq
        self.gram += other.gram
        self.kept_by_two += other.kept_by_two
        self.conflicts += other.conflicts
        self.dare_sq += other.dare_sq
        self.projected_sq += other.projected_sq
        self.spectral_sq += other.spectral_sq

    def summary(self, density: float) -> dict[str, Any]:
        """The statistics of the scope, from its sums."""
        norms = self.gram.diagonal().clamp_min(0).sqrt()
        outer = torch.outer(norms, norms)
        cosine = torch.where(outer > 0, self.gram / outer.clamp_min(1e-300), torch.zeros_like(outer))
        base = math.sqrt(self.base_sq)
        n = self.models
        pairs = [float(cosine[i, j]) for i in range(n) for j in range(i + 1, n)]
        drop = 1.0 - density
        out: dict[str, Any] = {
            "entries": self.entries,
            "cosine": cosine.tolist(),
            "mean_pairwise_cosine": sum(pairs) / len(pairs) if pairs else None,
            "relative_norm": [float(v) / base if base > 0 else None for v in norms],
            "sign_conflict_rate": self.conflicts / self.kept_by_two if self.kept_by_two else 0.0,
            "kept_by_two_share": self.kept_by_two / self.entries if self.entries else 0.0,
            "dare_noise_expected": [math.sqrt(drop / density) * float(v) / base if base > 0 else None for v in norms],
            "dare_noise_measured": [math.sqrt(float(v)) / base if base > 0 else None for v in self.dare_sq],
        }
        if float(self.spectral_sq.sum()) > 0:
            out["subspace_alignment"] = [math.sqrt(float(p) / float(s)) if s > 0 else None
                                         for p, s in zip(self.projected_sq, self.spectral_sq, strict=True)]
        return out


class Scratch:
    """Buffers reused from tensor to tensor, grown to the largest (one per role)."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        buffer = self._buffers.get(role)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[role] = np.empty(size, dtype=np.uint8)
        return buffer[:size].view(dtype).reshape(shape)


def tensor_sums(base: torch.Tensor, models: Sequence[torch.Tensor], density: float, seed: int,
                scratch: Scratch | None = None) -> Sums:
    """The sums of one tensor (everything but the spectra).

    One pass per model finds TIES' exact threshold and, per block of
    :func:`mergeforge.methods.kernels.ranges`, adds its kept signs to per-entry counts and DARE's
    sums; then the Gram matrix comes from one pass over the blocks. Products are summed in float32
    within :data:`GRAM_SPAN` entries (each ⟨τᵢ, τⱼ⟩ within about 1e-8 of ‖τᵢ‖‖τⱼ‖, so cosines to
    1e-8), and every sum across spans, blocks and tensors is float64. ``scratch`` (reused from
    tensor to tensor by one thread) spares the page faults of fresh memory."""
    scratch = scratch or Scratch()
    b = base.reshape(-1).float()
    n = b.numel()
    vectors = torch.from_numpy(scratch.get("vectors", (len(models), n), np.float32))
    for row, model in zip(vectors, models, strict=True):
        row.copy_(model.reshape(-1))  # widened in place: several times faster than .float() then sub
        row.sub_(b)
    sums = Sums(len(models), entries=n, base_sq=_sum_of_squares(b))
    count = np.int8 if len(models) < 128 else np.int32
    kept = scratch.get("kept", (n,), count)  # per entry: how many models keep it, non-zero
    negative = scratch.get("negative", (n,), count)  # ... and how many of those are negative
    kept[:] = 0
    negative[:] = 0
    magnitude = scratch.get("magnitude", (n,), np.float32)
    below = scratch.get("below", (min(n, BLOCK),), np.bool_)
    for index, row in enumerate(vectors):
        tau = row.numpy()
        np.abs(tau, out=magnitude)
        p = _model_pass(tau, magnitude, density, seed + index, kept, negative, below)
        # DARE with mergekit's L1 rescale c = ‖τ‖₁ / ‖kept‖₁: ‖dare(τ) − τ‖² = (c − 1)²‖kept‖² + ‖dropped‖²,
        # with ‖τ‖² from the Gram matrix below.
        scale = p.l1 / p.kept_l1 if p.l1 >= 1e-7 and p.kept_l1 >= 1e-7 else 1.0
        sums.dare_sq[index] = (scale - 1.0) ** 2 * p.kept_sq - p.kept_sq
    for start, stop in ranges(n):
        sums.gram += _gram(vectors[:, start:stop])
    sums.dare_sq += sums.gram.diagonal()
    sums.kept_by_two = int(np.count_nonzero(kept >= 2))
    sums.conflicts = int(np.count_nonzero((negative > 0) & (negative < kept)))  # both signs among the kept
    return sums


GRAM_SPAN = 1 << 12  # entries per float32 product block of the Gram matrix


@dataclass
class _ModelPass:
    l1: float = 0.0  # ‖τ‖₁
    kept_l1: float = 0.0  # ‖τ ⊙ DARE's keep mask‖₁
    kept_sq: float = 0.0  # ‖τ ⊙ DARE's keep mask‖²


def _model_pass(tau: np.ndarray, magnitude: np.ndarray, density: float, seed: int, kept: np.ndarray,
                negative: np.ndarray, below: np.ndarray) -> _ModelPass:
    """Adds one task vector's (flat float32, and its magnitudes) TIES-kept non-zero entries to
    ``kept`` and its kept negative ones to ``negative``, and sums DARE's draw, block by block, with
    the masks of :func:`mergeforge.methods.sparsify.magnitude_mask` and ``bernoulli_mask``
    (``below``: a block of scratch)."""
    from mergeforge.methods._task_vector_kernels import TopK, bernoulli_keep

    selector = TopK(magnitude, int(density * tau.size))
    zero_ties = selector.threshold == 0  # entries tied at 0 are zeros: kept, but signless
    same_type = kept.dtype == np.int8
    out = _ModelPass(l1=float(magnitude.sum()))  # NumPy's pairwise float32 sums (about 1e-7 relative)
    for start, stop in ranges(tau.size):
        size = magnitude[start:stop]
        keep = selector.mask(size, start)
        if zero_ties:
            keep &= size > 0
        negatives = np.less(tau[start:stop], 0, out=below[:stop - start])
        negatives &= keep
        kept[start:stop] += keep.view(np.int8) if same_type else keep
        negative[start:stop] += negatives.view(np.int8) if same_type else negatives
        dropped = size * bernoulli_keep(seed, block_index(start), stop - start, density)  # faster than np.where
        out.kept_l1 += float(dropped.sum())
        out.kept_sq += float(np.square(dropped, out=dropped).sum())
    return out


def _gram(part: torch.Tensor) -> torch.Tensor:
    """⟨τᵢ, τⱼ⟩ over a block ([models, entries], float32): float32 products within spans of
    :data:`GRAM_SPAN` entries, summed in float64."""
    models, entries = part.shape
    whole = entries - entries % GRAM_SPAN
    gram = torch.zeros(models, models, dtype=torch.float64)
    if whole:
        spans = part[:, :whole].reshape(models, -1, GRAM_SPAN).transpose(0, 1)  # [spans, models, span]
        gram += torch.bmm(spans, spans.transpose(1, 2)).double().sum(0)
    if whole < entries:
        tail = part[:, whole:].double()
        gram += tail @ tail.T
    return gram


def _sum_of_squares(values: torch.Tensor) -> float:
    return sum(float(values[start:stop].double().square().sum()) for start, stop in ranges(values.numel()))


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007)."""
    total = float(singular_values.sum())
    if total <= 0:
        return 0.0
    p = singular_values.double() / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """The singular values of ``matrix`` in descending order, in float64, from the eigenvalues of
    its Gram matrix on the smaller side: several times faster than an SVD on 2 cores, and exact
    enough for spectra, effective ranks and energies (the smallest values lose relative accuracy)."""
    x = matrix.double()
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def leading_left_vectors(matrix: torch.Tensor, energy: float) -> torch.Tensor:
    """The top-k left singular vectors of ``matrix`` ([rows, k], float64), k the smallest rank that
    holds ``energy`` of its squared norm (0 columns for a zero matrix)."""
    x = matrix.double()
    small_side = x.shape[0] <= x.shape[1]
    values, vectors = torch.linalg.eigh(x @ x.T if small_side else x.T @ x)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    total = float(values.sum())
    if total <= 0:
        return x.new_zeros((x.shape[0], 0))
    k = int(torch.searchsorted(torch.cumsum(values, 0), energy * total)) + 1
    k = min(k, int((values > 0).sum()))
    if small_side:
        return vectors[:, :k]
    return (x @ vectors[:, :k]) / values[:k].sqrt()  # U = X V / s


def spectral_stats(base: torch.Tensor, models: Sequence[torch.Tensor], sums: Sums) -> dict[str, Any]:
    """Singular spectra, effective ranks and SAR of one matrix's task vectors; adds the SAR sums to ``sums``."""
    b = base.float()
    vectors = [(m.float() - b).double() for m in models]
    total = torch.stack(vectors).sum(0)
    basis = leading_left_vectors(total, SAR_ENERGY)
    spectra, ranks = [], []
    for index, tau in enumerate(vectors):
        values = singular_values(tau)
        spectra.append((values[:SPECTRUM_KEEP] / values[0].clamp_min(1e-300)).tolist())
        ranks.append(effective_rank(values))
        sums.spectral_sq[index] += float(tau.pow(2).sum())
        sums.projected_sq[index] += float((basis.T @ tau).pow(2).sum())
    return {"effective_rank": ranks, "sar_rank": basis.shape[1], "spectrum": spectra,
            "task_arithmetic_effective_rank": effective_rank(singular_values(total))}


def analyze_checkpoints(base: Any, models: Sequence[Any], names: Sequence[str], *, density: float = 0.2, seed: int = 0,
                        spectral: bool = True, workers: int | None = None,
                        progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The statistics of ``models`` (opened checkpoints) against ``base``: per tensor, per layer and
    overall (see the module's docstring for each definition).

    The non-spectral sums run on ``workers`` threads (default: one per core, at most 2), one tensor
    each, with one torch thread apiece; memory is then ``workers`` times one tensor of every model.
    The spectra follow, tensor by tensor, on torch's own threads."""
    from mergeforge.engine.rules import job_seed, layer_index

    if not 0.0 < density < 1.0:
        raise CheckpointError(f"--density: give the share of entries TIES and DARE keep, in (0, 1); got {density}")
    skipped: list[str] = []
    shared = _shared_tensors(base, models, skipped)
    if not shared:
        raise CheckpointError("analyze: the base and the models share no floating tensor of one shape")
    timings = {"read": 0.0, "statistics": 0.0, "spectra": 0.0}
    local = threading.local()

    def statistics(name: str) -> tuple[list[int], Sums, float, float]:
        started = time.perf_counter()
        base_tensor = base.read(name)
        tensors_in = [m.read(name) for m in models]
        read = time.perf_counter() - started
        if not hasattr(local, "scratch"):
            local.scratch = Scratch()
        sums = tensor_sums(base_tensor, tensors_in, density, job_seed(seed, name), local.scratch)
        return list(base_tensor.shape), sums, read, time.perf_counter() - started - read

    count = max(1, min(2, os.cpu_count() or 1) if workers is None else workers)
    per_tensor: list[tuple[list[int], Sums]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound work: threads over tensors gain more, and OMP stalls under load
    try:
        with ThreadPoolExecutor(count) as pool:
            for index, (shape, sums, read, compute) in enumerate(pool.map(statistics, shared)):
                per_tensor.append((shape, sums))
                timings["read"] += read
                timings["statistics"] += compute
                if index % 20 == 0:
                    progress(f"{index + 1} tensors: {shared[index]}")
    finally:
        torch.set_num_threads(threads)
    overall = Sums(len(models))
    layers: dict[int, Sums] = {}
    tensors: list[dict[str, Any]] = []
    for name, (shape, sums) in zip(shared, per_tensor, strict=True):
        layer = layer_index(name)
        row: dict[str, Any] = {"name": name, "layer": layer, "shape": shape}
        if spectral and layer is not None and len(shape) == 2:
            started = time.perf_counter()
            row["spectral"] = spectral_stats(base.read(name), [m.read(name) for m in models], sums)
            timings["spectra"] += time.perf_counter() - started
        row.update(sums.summary(density))
        tensors.append(row)
        overall.add(sums)
        if layer is not None:
            layers.setdefault(layer, Sums(len(models))).add(sums)
    return {"models": len(models), "density": density, "seed": seed, "workers": count, "overall": overall.summary(density),
            "layers": [{"layer": index, **layers[index].summary(density)} for index in sorted(layers)],
            "tensors": tensors, "skipped": skipped, "seconds": timings}


def _shared_tensors(base: Any, models: Sequence[Any], skipped: list[str]) -> list[str]:
    """The base's floating tensors that every model holds with the same shape; others go to
    ``skipped`` (an added-token embedding, a model's extra head), and a model that shares none is an error."""
    from mergeforge.dtypes import is_floating

    names = []
    for name in base.names():
        info = base.info(name)
        if not is_floating(info.dtype):
            continue
        if all(m.has(name) and tuple(m.info(name).shape) == tuple(info.shape) for m in models):
            names.append(name)
        else:
            skipped.append(name)
    return names
