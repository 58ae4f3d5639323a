"""Low-rank factors of weight updates: how many singular values to keep, truncated SVD of a dense
update (exact or randomized), and the optimal truncation of a product of stacked factors without
ever forming the dense product.

Eckart-Young: the best rank-k approximation of ΔW in Frobenius norm keeps its k largest singular
values, and the squared error is the sum of the discarded ones squared. So an *energy* target (the
share of ``||ΔW||_F²`` kept) fixes the rank per module, and the discarded share is the squared
relative error.

For ΔW = B A given as factors (a concatenation of LoRAs, or KnOTS's shared basis), the SVD of ΔW
comes from a QR of B and of Aᵀ and an SVD of the small ``r × r`` core ``R_B R_Aᵀ``: the cost grows
with the rank, not with the weight's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergeforge.errors import MergeforgeError

# A randomized SVD samples this many more directions than it keeps (Halko et al. 2011, sec. 4.2).
OVERSAMPLE = 8
# Subspace iterations of the randomized SVD; two make its error close to the optimum for the
# slowly decaying spectra of fine-tuning deltas (measured in the report, never assumed).
POWER_ITERATIONS = 2


@dataclass(frozen=True)
class RankRule:
    """How many singular values a module keeps: an energy target, a cap, or both (the smaller)."""

    max_rank: int | None = None
    energy: float | None = None  # share of the squared Frobenius norm kept, in (0, 1]
    sv_epsilon: float = 0.0  # singular values at or below it are dropped (mergekit's --sv-epsilon)

    def __post_init__(self) -> None:
        if self.max_rank is not None and self.max_rank < 1:
            raise MergeforgeError(f"--max-rank must be at least 1, got {self.max_rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise MergeforgeError(f"--energy is the share of the squared Frobenius norm to keep: give a value in (0, 1], got {self.energy}")
        if self.sv_epsilon < 0:
            raise MergeforgeError(f"--sv-epsilon must be non-negative, got {self.sv_epsilon}")

    def rank(self, singular_values: torch.Tensor, total_energy: float) -> int:
        """The rank to keep, given singular values in descending order and ``||ΔW||_F²`` (which
        may exceed their squared sum when they are only the leading ones, as from a randomized SVD)."""
        squares = singular_values.double() ** 2
        rank = int((singular_values > self.sv_epsilon).sum())
        if self.energy is not None and total_energy > 0:
            kept = torch.cumsum(squares, 0)
            # The first rank whose kept share reaches the target (a hair below it counts, for float sums).
            reached = torch.nonzero(kept >= self.energy * total_energy * (1 - 1e-9))
            rank = min(rank, int(reached[0]) + 1 if len(reached) else len(singular_values))
        if self.max_rank is not None:
            rank = min(rank, self.max_rank)
        return rank


@dataclass(frozen=True)
class Factors:
    """ΔW ≈ ``up @ down`` (PEFT's ``lora_B`` and ``lora_A``), with the share of ``||ΔW||_F²`` kept."""

    up: torch.Tensor  # [out, rank]
    down: torch.Tensor  # [rank, in]
    kept_energy: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def split_scale(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, distribute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B A = U diag(s) Vh``: √s on each side (``distribute``, mergekit's default:
    both factors of one scale, which keeps them well conditioned in 16-bit), else all of s in B."""
    if distribute:
        root = s.sqrt()
        return u * root, root[:, None] * vh
    return u * s, vh


def _kept_share(singular_values: torch.Tensor, rank: int, total_energy: float) -> float:
    if total_energy <= 0:
        return 1.0
    return float((singular_values[:rank].double() ** 2).sum() / total_energy)


def truncated_svd(delta: torch.Tensor, rule: RankRule, *, randomized: bool = False, distribute: bool = True,
                  seed: int = 0) -> Factors:
    """The best low-rank factors of a dense update under ``rule``.

    ``randomized`` uses ``torch.svd_lowrank`` with :data:`OVERSAMPLE` extra directions, doubling
    the sample until the energy target is met (or falling back to the exact SVD when the sample
    would cover the whole matrix). Its factors are not optimal; the caller measures their error.
    """
    work = delta.float()
    total = float(work.double().pow(2).sum())
    smallest = min(work.shape)
    if randomized:
        sample = min(smallest, (rule.max_rank or 16) + OVERSAMPLE)
        while sample < smallest:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                u, s, v = torch.svd_lowrank(work, q=sample, niter=POWER_ITERATIONS)
            rank = rule.rank(s, total)
            enough = rule.energy is None or _kept_share(s, rank, total) >= rule.energy * (1 - 1e-9)
            if enough and (rule.max_rank is not None or rank < len(s)):
                return Factors(*split_scale(u[:, :rank], s[:rank], v[:, :rank].T, distribute), _kept_share(s, rank, total))
            sample = min(smallest, sample * 2)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    total = float((s.double() ** 2).sum())  # = ||ΔW||_F², without float32's rounding of the two sums apart
    rank = rule.rank(s, total)
    return Factors(*split_scale(u[:, :rank], s[:rank], vh[:rank], distribute), _kept_share(s, rank, total))


def core_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``U diag(s) Vh`` of ``up @ down`` from QRs of both sides and an SVD of the small
    core: exact, without forming the ``[out, in]`` product."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u_core, s, vh_core @ q_down.T


def refactor(up: torch.Tensor, down: torch.Tensor, rule: RankRule | None, *, distribute: bool = True) -> Factors:
    """``up @ down`` as factors: unchanged when ``rule`` is None (exact), else truncated optimally
    (the discarded energy is exact: it comes from the product's true singular values)."""
    if rule is None:
        return Factors(up.float(), down.float(), 1.0)
    u, s, vh = core_svd(up, down)
    total = float((s**2).sum())
    rank = rule.rank(s, total)
    b, a = split_scale(u[:, :rank], s[:rank], vh[:rank], distribute)
    return Factors(b.float(), a.float(), _kept_share(s, rank, total))


def relative_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """``||ΔW − B A||_F / ||ΔW||_F``, measured (0 for a zero update reproduced exactly)."""
    reference = delta.double()
    norm = float(reference.norm())
    residual = float((reference - up.double() @ down.double()).norm())
    return residual / norm if norm > 0 else residual
