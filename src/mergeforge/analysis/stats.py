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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeforge.errors import CheckpointError

SAR_ENERGY = 0.95
SPECTRUM_KEEP = 32  # leading singular values stored per tensor and model (normalised by the largest)
CHUNK = 1 << 22  # entries per float64 Gram update, to bound the float64 copies


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


def tensor_sums(base: torch.Tensor, models: Sequence[torch.Tensor], density: float, seed: int) -> Sums:
    """The sums of one tensor (everything but the spectra)."""
    from mergeforge.methods.sparsify import apply_mask, bernoulli_mask, magnitude_mask

    b = base.float()
    vectors = torch.stack([m.float() - b for m in models]).reshape(len(models), -1)
    sums = Sums(len(models), entries=b.numel(), base_sq=float(b.double().pow(2).sum()))
    for start in range(0, vectors.shape[1], CHUNK):
        part = vectors[:, start:start + CHUNK].double()
        sums.gram += part @ part.T
    positive = torch.zeros(vectors.shape[1], dtype=torch.int16)
    negative = torch.zeros_like(positive)
    for index, tau in enumerate(vectors):
        kept = magnitude_mask(tau, density)
        positive += (kept & (tau > 0)).to(torch.int16)
        negative += (kept & (tau < 0)).to(torch.int16)
        dropped = apply_mask(tau, bernoulli_mask(tau, density, seed + index), rescale=True)
        sums.dare_sq[index] = float((dropped - tau).double().pow(2).sum())
    sums.kept_by_two = int(((positive + negative) >= 2).sum())
    sums.conflicts = int(((positive > 0) & (negative > 0)).sum())
    return sums


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
                        spectral: bool = True, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The statistics of ``models`` (opened checkpoints) against ``base``: per tensor, per layer and
    overall (see the module's docstring for each definition)."""
    from mergeforge.engine.rules import job_seed, layer_index

    if not 0.0 < density < 1.0:
        raise CheckpointError(f"--density: give the share of entries TIES and DARE keep, in (0, 1); got {density}")
    overall = Sums(len(models))
    layers: dict[int, Sums] = {}
    tensors: list[dict[str, Any]] = []
    skipped: list[str] = []
    timings = {"read": 0.0, "statistics": 0.0, "spectra": 0.0}
    for count, name in enumerate(_shared_tensors(base, models, skipped)):
        started = time.perf_counter()
        base_tensor = base.read(name)
        tensors_in = [m.read(name) for m in models]
        timings["read"] += time.perf_counter() - started
        started = time.perf_counter()
        sums = tensor_sums(base_tensor, tensors_in, density, job_seed(seed, name))
        timings["statistics"] += time.perf_counter() - started
        layer = layer_index(name)
        row: dict[str, Any] = {"name": name, "layer": layer, "shape": list(base_tensor.shape)}
        if spectral and layer is not None and base_tensor.ndim == 2:
            started = time.perf_counter()
            row["spectral"] = spectral_stats(base_tensor, tensors_in, sums)
            timings["spectra"] += time.perf_counter() - started
        row.update(sums.summary(density))
        tensors.append(row)
        overall.add(sums)
        if layer is not None:
            layers.setdefault(layer, Sums(len(models))).add(sums)
        if count % 20 == 0:
            progress(f"{count + 1} tensors: {name}")
    if not tensors:
        raise CheckpointError("analyze: the base and the models share no floating tensor of one shape")
    return {"models": len(models), "density": density, "seed": seed, "overall": overall.summary(density),
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
