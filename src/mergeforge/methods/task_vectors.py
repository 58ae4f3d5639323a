"""The task-vector family: task arithmetic, TIES, DARE (and, in the same frame, Breadcrumbs and
DELLA). All share one recipe: task vectors δᵢ = θᵢ − θ_base, an optional sparsification of each,
an optional sign consensus, a weighted (optionally normalised) sum, scaled by λ, added to the base.

- Task arithmetic: Ilharco et al. 2023, "Editing models with task arithmetic" (arXiv:2212.04089).
- TIES: Yadav et al. 2023, "TIES-Merging" (arXiv:2306.01708): trim, elect sign, disjoint merge.
- DARE: Yu et al. 2024, "Language models are Super Mario" (arXiv:2311.03099): drop and rescale.

Parameter names and defaults follow mergekit's generalized task arithmetic, so recipes written for
it mean the same thing here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergeforge.errors import MethodError
from mergeforge.methods import sparsify
from mergeforge.methods.averaging import WEIGHT
from mergeforge.methods.registry import BaseUse, Param, register_method

DENSITY = Param(
    "density", 1.0, per_model=True, low=0.0, high=1.0, low_open=True, help="fraction of each task vector's entries kept"
)
LAMBDA = Param("lambda", 1.0, help="scale of the merged task vector")
INT8_MASK = Param("int8_mask", False, kind="bool", help="accepted for mergekit recipes; masks are always compact here")

# A sparsifier maps (task_vector, model_index, per-model params, generator) to a keep mask.
Sparsifier = Callable[[torch.Tensor, int, dict[str, list[float]], torch.Generator | None], torch.Tensor]


def elect_sign_mask(weighted_deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """TIES' sign election: the sign of Σ wᵢδᵢ (zero counts as positive); each model keeps only
    the entries whose sign agrees. Dropped (zero) entries never agree."""
    total = weighted_deltas[0].clone()
    for delta in weighted_deltas[1:]:
        total.add_(delta)
    elected_positive = total >= 0
    del total
    return [torch.where(elected_positive, delta > 0, delta < 0) for delta in weighted_deltas]


def merge_task_vectors(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    lambda_: float,
    normalize: bool,
    rescale: bool,
    sparsifier: Sparsifier | None,
    consensus: bool,
    per_model: dict[str, list[float]],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """θ_base + λ·merge(sparsify(θᵢ − θ_base)), the frame every task-vector method shares.

    On CPU, in float32, with one of the standard sparsifiers, the NumPy kernel does the work (the
    same code the torch-free fast path runs, so both give the same bytes); otherwise (GPU, float64,
    DELLA) the torch code below, with the same masks.
    """
    kind = _KERNEL_SPARSIFIERS.get(sparsifier) if sparsifier is not None else None
    if (sparsifier is None or kind is not None) and kernel_eligible([*tensors, base]):
        from mergeforge.fastpath import kernels

        sources = [kernels.Source(t.reshape(-1).numpy(), "F32") for t in tensors]
        blocks = kernels.task_vector_merge(
            sources,
            kernels.Source(base.reshape(-1).numpy(), "F32"),
            weights=weight,
            lambda_=lambda_,
            normalize=normalize,
            rescale=rescale,
            sparsify=kind,
            densities=per_model["density"],
            gammas=per_model.get("gamma"),
            consensus=consensus,
            seed=generator.initial_seed() if generator is not None else 0,
        )
        return torch.from_numpy(kernels.collect(blocks, base.numel())).view(base.shape)
    weighted_deltas = []
    for index, (tensor, model_weight) in enumerate(zip(tensors, weight)):
        delta = tensor - base
        if sparsifier is not None and per_model["density"][index] < 1:
            keep_mask = sparsifier(delta, index, per_model, generator)
            delta = sparsify.apply_mask(delta, keep_mask, rescale)
        weighted_deltas.append(delta.mul_(model_weight))

    merged = torch.zeros_like(base)
    if consensus:
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


def _magnitude(delta, index, per_model, generator):
    return sparsify.magnitude_mask(delta, per_model["density"][index])


def _bernoulli(delta, index, per_model, generator):
    seed = (generator.initial_seed() if generator is not None else 0) + index
    return sparsify.bernoulli_mask(delta, per_model["density"][index], seed)


def _outliers(delta, index, per_model, generator):
    return sparsify.outlier_trimmed_mask(delta, per_model["density"][index], per_model["gamma"][index])


# The sparsifiers the NumPy kernel implements, by its name for them.
_KERNEL_SPARSIFIERS = {_magnitude: "magnitude", _bernoulli: "bernoulli", _outliers: "outliers"}


def kernel_eligible(tensors: list[torch.Tensor]) -> bool:
    """True when the NumPy kernels can run on these tensors (CPU float32, no autograd)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


def _rank_probability(delta, index, per_model, generator):
    density, epsilon = per_model["density"][index], per_model["epsilon"][index]
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise MethodError(f"della: density ± epsilon must lie inside (0, 1); got density={density:g}, epsilon={epsilon:g}")
    return sparsify.rank_probability_mask(delta, per_model["density"][index], per_model["epsilon"][index], generator)


def register_task_vector_method(
    name: str,
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
    normalize_default: bool,
    rescale_default: bool,
    math: str,
    reference: str,
    extra_params: tuple[Param, ...] = (),
    random: bool = False,
    elementwise: bool = False,
    notes: str = "",
) -> None:
    """Register one member of the family; its parameters are mergekit's for that method."""
    per_model_names = ["density", *(p.name for p in extra_params if p.per_model)]

    def method(tensors, base, *, weight, lambda_, normalize, rescale, int8_mask, generator=None, **others):
        per_model = {key: others[key] for key in per_model_names}
        return merge_task_vectors(
            tensors,
            base,
            weight=weight,
            lambda_=lambda_,
            normalize=normalize,
            rescale=rescale,
            sparsifier=sparsifier,
            consensus=consensus,
            per_model=per_model,
            generator=generator,
        )

    method.__name__ = name
    method.__module__ = __name__
    register_method(
        name,
        params=[
            WEIGHT,
            DENSITY,
            *extra_params,
            LAMBDA,
            Param("normalize", normalize_default, kind="bool", help="divide by the sum of the (agreeing) weights"),
            Param("rescale", rescale_default, kind="bool", help="rescale kept entries to keep each task vector's L1 norm"),
            INT8_MASK,
        ],
        base=BaseUse.REQUIRED,
        math=math,
        reference=reference,
        random=random,
        elementwise=elementwise,
        notes=notes,
    )(method)


register_task_vector_method(
    "task_arithmetic",
    sparsifier=None,
    consensus=False,
    normalize_default=False,
    rescale_default=False,
    math="θ_base + λ·Σ wᵢ(θᵢ − θ_base)",
    reference="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089); mergekit 'task_arithmetic'",
    elementwise=True,
    notes="A negative weight subtracts a task vector (task negation).",
)
register_task_vector_method(
    "ties",
    sparsifier=_magnitude,
    consensus=True,
    normalize_default=True,
    rescale_default=False,
    math="trim δᵢ to its top-density magnitudes; elect sign(Σ wᵢδᵢ); θ_base + λ·Σ_agree wᵢδᵢ / Σ_agree wᵢ",
    reference="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708); mergekit 'ties'",
    notes="Exact top-k per tensor. Prefer over task arithmetic when task vectors interfere.",
)
register_task_vector_method(
    "dare_linear",
    sparsifier=_bernoulli,
    consensus=False,
    normalize_default=False,
    rescale_default=True,
    math="δᵢ ⊙ Bernoulli(density), rescaled to keep ‖δᵢ‖₁; θ_base + λ·Σ wᵢδᵢ",
    reference="Yu et al. 2024, DARE (arXiv:2311.03099); mergekit 'dare_linear'",
    random=True,
    elementwise=False,
    notes="Random: the same --seed gives the same bytes.",
)
register_task_vector_method(
    "dare_ties",
    sparsifier=_bernoulli,
    consensus=True,
    normalize_default=False,
    rescale_default=True,
    math="DARE drop-and-rescale, then TIES sign election and disjoint merge",
    reference="Yu et al. 2024, DARE (arXiv:2311.03099); mergekit 'dare_ties'",
    random=True,
    notes="Random: the same --seed gives the same bytes.",
)

GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0, help="fraction of largest-magnitude entries dropped")
EPSILON = Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0, help="keep-probability spread around density")
BREADCRUMBS_REFERENCE = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795); mergekit 'breadcrumbs'"
DELLA_REFERENCE = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617); mergekit 'della'"

register_task_vector_method(
    "breadcrumbs",
    sparsifier=_outliers,
    consensus=False,
    normalize_default=False,
    rescale_default=False,
    extra_params=(GAMMA,),
    math="drop the top-γ and the smallest magnitudes of δᵢ, keeping density; θ_base + λ·Σ wᵢδᵢ",
    reference=BREADCRUMBS_REFERENCE,
    notes="Removes outlier updates as well as small ones.",
)
register_task_vector_method(
    "breadcrumbs_ties",
    sparsifier=_outliers,
    consensus=True,
    normalize_default=False,
    rescale_default=False,
    extra_params=(GAMMA,),
    math="Breadcrumbs masks, then TIES sign election and disjoint merge",
    reference=BREADCRUMBS_REFERENCE,
)
register_task_vector_method(
    "della",
    sparsifier=_rank_probability,
    consensus=True,
    normalize_default=True,
    rescale_default=True,
    extra_params=(EPSILON,),
    math="keep δᵢ entries with probability density−ε…density+ε by magnitude rank per row, rescale; TIES sign election",
    reference=DELLA_REFERENCE,
    random=True,
    notes="Requires 0 < density ± epsilon < 1.",
)
register_task_vector_method(
    "della_linear",
    sparsifier=_rank_probability,
    consensus=False,
    normalize_default=False,
    rescale_default=True,
    extra_params=(EPSILON,),
    math="DELLA's rank-probability drop and rescale, then θ_base + λ·Σ wᵢδᵢ",
    reference=DELLA_REFERENCE,
    random=True,
    notes="Requires 0 < density ± epsilon < 1.",
)
