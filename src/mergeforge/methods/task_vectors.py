"""The task-vector family: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA. All share one
recipe: task vectors δᵢ = θᵢ − θ_base, an optional sparsification of each, an optional sign
consensus, a weighted (optionally normalised) sum, scaled by λ, added to the base.

- Task arithmetic: Ilharco et al. 2023, "Editing models with task arithmetic" (arXiv:2212.04089).
- TIES: Yadav et al. 2023, "TIES-Merging" (arXiv:2306.01708): trim, elect sign, disjoint merge.
- DARE: Yu et al. 2024, "Language models are Super Mario" (arXiv:2311.03099): drop and rescale.
- Model Breadcrumbs: Davari & Belilovsky 2024 (arXiv:2312.06795): drop outliers and small entries.
- DELLA: Deep et al. 2024 (arXiv:2406.11617): magnitude-rank-dependent drop.

The family is one table, :data:`VARIANTS`: each member is a sparsifier, a consensus flag and
mergekit's defaults for ``normalize`` and ``rescale``, so recipes written for mergekit's
generalized task arithmetic mean the same thing here. Every member with a NumPy sparsifier runs on
the kernel in :mod:`mergeforge.methods._task_vector_kernels` (the CPU float32 implementation, used
by both executors); :func:`merge_task_vectors` is the torch implementation (GPU, float64, DELLA).
This module imports torch only inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from mergeforge.errors import MethodError
from mergeforge.methods._task_vector_kernels import task_vector_kernel, task_vector_peak
from mergeforge.methods.averaging import WEIGHT
from mergeforge.methods.kernels import Kernel
from mergeforge.methods.registry import BaseUse, Param, register_method

if TYPE_CHECKING:
    import torch

DENSITY = Param(
    "density", 1.0, per_model=True, low=0.0, high=1.0, low_open=True, help="fraction of each task vector's entries kept"
)
LAMBDA = Param("lambda", 1.0, help="scale of the merged task vector", scales_result=True)
INT8_MASK = Param("int8_mask", False, kind="bool", help="accepted for mergekit recipes; masks are always compact here")
GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0, help="fraction of largest-magnitude entries dropped")
EPSILON = Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0, help="keep-probability spread around density")

# The sparsifiers the NumPy kernel draws (DELLA's rank-probability drop is torch only).
KERNEL_SPARSIFIERS = (None, "magnitude", "bernoulli", "outliers")


@dataclass(frozen=True)
class Variant:
    """One member of the family."""

    name: str
    sparsify: str | None  # None, "magnitude" (TIES), "bernoulli" (DARE), "outliers" (Breadcrumbs), "rank_probability" (DELLA)
    consensus: bool  # TIES' sign election and disjoint merge
    normalize: bool  # default of 'normalize': divide by the sum of the (agreeing) weights
    rescale: bool  # default of 'rescale': restore each sparsified task vector's L1 norm
    math: str
    citation: str
    extra: tuple[Param, ...] = ()
    notes: str = ""

    @property
    def random(self) -> bool:
        return self.sparsify in ("bernoulli", "rank_probability")


BREADCRUMBS = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795); mergekit 'breadcrumbs'"
DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617); mergekit 'della'"
DARE = "Yu et al. 2024, DARE (arXiv:2311.03099); mergekit"
RANDOM_NOTE = "Random: the same --seed gives the same bytes."
DELLA_NOTE = "Requires 0 < density ± epsilon < 1."

VARIANTS = (
    Variant("task_arithmetic", None, False, False, False,
            "θ_base + λ·Σ wᵢ(θᵢ − θ_base)",
            "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089); mergekit 'task_arithmetic'",
            notes="A negative weight subtracts a task vector (task negation)."),
    Variant("ties", "magnitude", True, True, False,
            "trim δᵢ to its top-density magnitudes; elect sign(Σ wᵢδᵢ); θ_base + λ·Σ_agree wᵢδᵢ / Σ_agree wᵢ",
            "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708); mergekit 'ties'",
            notes="Exact top-k per tensor. Prefer over task arithmetic when task vectors interfere."),
    Variant("dare_linear", "bernoulli", False, False, True,
            "δᵢ ⊙ Bernoulli(density), rescaled to keep ‖δᵢ‖₁; θ_base + λ·Σ wᵢδᵢ", f"{DARE} 'dare_linear'", notes=RANDOM_NOTE),
    Variant("dare_ties", "bernoulli", True, False, True,
            "DARE drop-and-rescale, then TIES sign election and disjoint merge", f"{DARE} 'dare_ties'", notes=RANDOM_NOTE),
    Variant("breadcrumbs", "outliers", False, False, False,
            "drop the top-γ and the smallest magnitudes of δᵢ, keeping density; θ_base + λ·Σ wᵢδᵢ", BREADCRUMBS, (GAMMA,),
            notes="Removes outlier updates as well as small ones."),
    Variant("breadcrumbs_ties", "outliers", True, False, False,
            "Breadcrumbs masks, then TIES sign election and disjoint merge", BREADCRUMBS, (GAMMA,)),
    Variant("della", "rank_probability", True, True, True,
            "keep δᵢ entries with probability density−ε…density+ε by magnitude rank per row, rescale; TIES sign election",
            DELLA, (EPSILON,), notes=DELLA_NOTE),
    Variant("della_linear", "rank_probability", False, False, True,
            "DELLA's rank-probability drop and rescale, then θ_base + λ·Σ wᵢδᵢ", DELLA, (EPSILON,), notes=DELLA_NOTE),
)


def elect_sign_mask(weighted_deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """TIES' sign election: the sign of Σ wᵢδᵢ (zero counts as positive); each model keeps only
    the entries whose sign agrees. Dropped (zero) entries never agree."""
    import torch

    total = weighted_deltas[0].clone()
    for delta in weighted_deltas[1:]:
        total.add_(delta)
    elected_positive = total >= 0
    del total
    return [torch.where(elected_positive, delta > 0, delta < 0) for delta in weighted_deltas]


def _keep_mask(variant: Variant, delta: torch.Tensor, index: int, density: float, gamma: list[float] | None,
               epsilon: list[float] | None, generator: torch.Generator | None) -> torch.Tensor:
    from mergeforge.methods import sparsify

    if variant.sparsify == "magnitude":
        return sparsify.magnitude_mask(delta, density)
    if variant.sparsify == "bernoulli":
        seed = (generator.initial_seed() if generator is not None else 0) + index
        return sparsify.bernoulli_mask(delta, density, seed)
    if variant.sparsify == "outliers":
        assert gamma is not None
        return sparsify.outlier_trimmed_mask(delta, density, gamma[index])
    assert epsilon is not None
    if not (0 < density - epsilon[index] and density + epsilon[index] < 1):
        raise MethodError(f"della: density ± epsilon must lie inside (0, 1); got density={density:g}, epsilon={epsilon[index]:g}")
    return sparsify.rank_probability_mask(delta, density, epsilon[index], generator)


def merge_task_vectors(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    density: list[float],
    lambda_: float,
    normalize: bool,
    rescale: bool,
    int8_mask: bool,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    generator: torch.Generator | None = None,
    variant: Variant,
) -> torch.Tensor:
    """θ_base + λ·merge(sparsify(θᵢ − θ_base)) in torch, with the kernel's masks (see the module)."""
    import torch

    from mergeforge.methods import sparsify

    assert base is not None
    weighted_deltas = []
    for index, (tensor, model_weight) in enumerate(zip(tensors, weight)):
        delta = tensor - base
        if variant.sparsify is not None and density[index] < 1:
            keep_mask = _keep_mask(variant, delta, index, density[index], gamma, epsilon, generator)
            delta = sparsify.apply_mask(delta, keep_mask, rescale)
        weighted_deltas.append(delta.mul_(model_weight))

    merged = torch.zeros_like(base)
    divisor: torch.Tensor | float
    if variant.consensus:
        divisor = torch.zeros_like(base)
        for delta, agrees, model_weight in zip(weighted_deltas, elect_sign_mask(weighted_deltas), weight):
            merged.add_(delta * agrees)
            divisor.add_(agrees.to(base.dtype), alpha=model_weight)
        divisor[divisor == 0] = 1
    else:
        for delta in weighted_deltas:
            merged.add_(delta)
        weight_sum = sum(weight)
        divisor = weight_sum if abs(weight_sum) >= 1e-8 else 1.0
    if normalize:
        merged.div_(divisor)
    if lambda_ != 1.0:
        merged.mul_(lambda_)
    return merged.add_(base)


for _variant in VARIANTS:
    register_method(
        _variant.name,
        params=[
            WEIGHT,
            DENSITY,
            *_variant.extra,
            LAMBDA,
            Param("normalize", _variant.normalize, kind="bool", help="divide by the sum of the (agreeing) weights"),
            Param("rescale", _variant.rescale, kind="bool", help="rescale kept entries to keep each task vector's L1 norm"),
            INT8_MASK,
        ],
        base=BaseUse.REQUIRED,
        math=_variant.math,
        citation=_variant.citation,
        random=_variant.random,
        elementwise=_variant.sparsify is None,
        notes=_variant.notes,
        kernel=Kernel(partial(task_vector_kernel, sparsify=_variant.sparsify, consensus=_variant.consensus),
                      partial(task_vector_peak, sparsify=_variant.sparsify))
        if _variant.sparsify in KERNEL_SPARSIFIERS else None,
    )(partial(merge_task_vectors, variant=_variant))
