"""Which registered methods the benchmark can run on N experts, and the small hyperparameter grid
each one is tuned over on the validation split.

The grid is derived from a method's parameter schema, so a method added later (or a plugin) is
benchmarked without touching this file: a ``lambda`` (the task-vector scale) is searched, and so is
a ``density`` (the fraction of each task vector kept); everything else keeps its default. The few
methods whose key knob has another name get an explicit entry in ``SPECIFIC_GRIDS``. Per-model
weights are 1 for every expert, as in the papers' data-free set-ups.

The schema also decides how a method is scored (its protocol): methods that store per-task masks
are scored per task, methods that merge at most two models on pairs of experts, every other one as
one multi-task model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from mergeforge.methods.registry import BaseUse, MethodSpec

# Scale of the summed task vectors. Without normalisation the sum of N vectors needs a small
# scale (Ilharco et al. pick λ≈0.3-0.4 for 8 tasks); with normalisation (a mean) λ≈1 or above.
LAMBDA_SUM = (0.2, 0.35, 0.5, 0.8)
LAMBDA_MEAN = (0.7, 1.0, 1.5)
DENSITY = (0.2, 0.5, 0.8)

SPECIFIC_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "model_stock": {"filter_wise": (False, True)},
    "sce": {"select_topk": (0.1, 0.3, 1.0)},
    "ramplus_tl": {"r": (0.1, 0.5), "alpha": (0.2, 1.0)},
    "karcher": {},
    "multislerp": {},
    # Spectral methods rescale the merged matrix themselves; their λ sits near 1 (TSV-M uses 1.0,
    # Iso-C/CTS tune α on validation between 0.5 and 2).
    "tsv": {"lambda": (0.5, 1.0, 1.5)},
    "iso_c": {"lambda": (0.5, 1.0, 1.5, 2.0)},
    "iso_cts": {"lambda": (0.5, 1.0, 1.5, 2.0)},
    "magmax": {"lambda": (0.3, 0.5, 1.0)},
    "consensus": {"lambda": (0.3, 0.5, 0.8), "tall_lambda": (0.2, 0.4, 0.6)},
    "pcb": {"density": (0.1, 0.2, 0.5), "lambda": LAMBDA_MEAN},
    "wudi": {},
    "fisher_merging": {},
    "regmean": {"alpha": (0.5, 0.9)},
    # Layer-wise λ only (the paper's stronger variant): each run is 200 steps of entropy minimisation.
    "adamerging": {},
    # Two-model methods (run on pairs of experts, see PAIRWISE): the interpolation factor, and
    # nearswap's sameness threshold around the size of a typical fine-tuning difference.
    "slerp": {"t": (0.3, 0.5, 0.7)},
    "nearswap": {"t": (1e-3, 1e-2, 1e-1)},
    "tall_mask": {"tall_lambda": (0.2, 0.4, 0.6)},
}

# Protocols: how a method's output is scored.
MULTITASK = "multitask"  # one model from all N experts, scored on every task
PER_TASK = "per_task"  # one model per task rebuilt from stored masks, each scored on its own task (the task id is known)
PAIRWISE = "pairwise"  # experts merged two at a time (disjoint pairs), each pair's model scored on its two tasks
# Methods that can merge N experts but are also run pairwise, as the reference for two-model methods.
PAIRWISE_REFERENCE = ("linear", "task_arithmetic", "ties")

# Methods that merge no skills at all.
NOT_BENCHMARKED = {
    "passthrough": "stacks layer ranges; not a merge of skills",
}


@dataclass
class MethodPlan:
    """How the benchmark runs one method: inputs, fixed parameters and the grid, or why it cannot."""

    method: str
    uses_base: bool = True
    data_aware: bool = False  # runs the method's calibration stage on each expert's training prompts
    calibrates_once: bool = False  # data-aware, and one calibration serves every grid point
    fixed: dict[str, Any] = field(default_factory=dict)
    model_fixed: dict[str, Any] = field(default_factory=dict)
    grid: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    skip_reason: str | None = None
    protocol: str = MULTITASK
    # Pairwise only: the first expert of a pair takes the base's place (slerp, nearswap and
    # arcee_fusion blend "the base" with one other model; merging two fine-tunes, the base is one of them).
    first_as_base: bool = False
    # A grid axis that only scales the merged task vector (``Param.scales_result``): the grid
    # varies it fastest, so one merge at scale 1 serves every value of it.
    rescaled: str | None = None


def plan_method(method: MethodSpec, n_experts: int, protocol: str | None = None) -> MethodPlan:
    """The benchmark plan for ``method`` merging ``n_experts`` experts (plus the base when used).

    The protocol is ``protocol`` when given, else the method's own: per-task for methods that
    store per-task masks, pairwise for methods that merge at most two models, else multi-task.
    """
    plan = MethodPlan(method.name, uses_base=method.base is not BaseUse.NONE)
    if method.name in NOT_BENCHMARKED:
        plan.skip_reason = NOT_BENCHMARKED[method.name]
        return plan
    plan.data_aware = method.calibrate is not None
    plan.calibrates_once = plan.data_aware and method.statistics_ignore_params
    if protocol is None:
        protocol = PER_TASK if method.extra_outputs is not None else MULTITASK
        if method.max_models is not None and method.max_models < n_experts and method.max_models <= 2 and n_experts >= 2:
            protocol = PAIRWISE
    plan.protocol = protocol
    if protocol == PAIRWISE:
        n_experts = 2
        if method.max_models == 1 and method.base is BaseUse.REQUIRED:
            plan.first_as_base, n_experts = True, 1
    if n_experts < method.min_models or (method.max_models is not None and n_experts > method.max_models):
        if method.max_models == method.min_models:
            accepted = f"exactly {method.min_models}"
        else:
            accepted = f"{method.min_models} to {method.max_models if method.max_models is not None else 'any number of'}"
        plan.skip_reason = f"merges {accepted} model(s) besides the base, not {n_experts}"
        return plan
    weight = method.param("weight")
    if weight is not None and weight.per_model:
        plan.model_fixed["weight"] = 1.0
    axes: dict[str, tuple[Any, ...]] = {}
    if method.name in SPECIFIC_GRIDS:
        axes = dict(SPECIFIC_GRIDS[method.name])
    else:
        if method.param("lambda") is not None:
            normalize = method.param("normalize")
            axes["lambda"] = LAMBDA_MEAN if normalize is not None and normalize.default is True else LAMBDA_SUM
        if method.param("density") is not None and method.name != "task_arithmetic":
            axes["density"] = DENSITY
    missing = [p.name for p in method.params if p.required and p.name not in axes and p.name not in plan.model_fixed]
    if missing:
        plan.skip_reason = f"needs a value for {', '.join(missing)} with no multi-task default"
        return plan
    plan.rescaled = next((p.name for p in method.params if p.scales_result and p.name in axes), None)
    names = sorted(axes, key=lambda name: name == plan.rescaled)  # the rescaled axis last: it varies fastest
    plan.grid = [dict(zip(names, values, strict=True)) for values in itertools.product(*(axes[n] for n in names))] or [{}]
    return plan


def describe(params: dict[str, Any]) -> str:
    """``lambda=0.5, density=0.2`` (or ``defaults``) for tables."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "defaults"
