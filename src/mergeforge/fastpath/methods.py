"""The methods the fast path runs, with their parameter schemas.

These mirror the registered methods' schemas (:mod:`mergeforge.methods.averaging` and
:mod:`mergeforge.methods.task_vectors`) without importing them, because those modules import
torch; they are made of the registry's own (torch-free) :class:`~mergeforge.methods.params.Param`,
so values are checked by the same code, and ``tests/test_fastpath.py`` checks that every name,
default, scope and range here equals the registry's, so the two cannot drift apart. Anything the fast path does not recognise is left to the
full path, which also owns every error message.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeforge.methods.params import REQUIRED, Param

__all__ = ["FAST_METHODS", "REQUIRED", "FastMethod", "Param"]

@dataclass(frozen=True)
class FastMethod:
    name: str
    params: tuple[Param, ...]
    uses_base: bool  # True: the base is measured from (task vectors, slerp), not an input
    sparsify: str | None = None  # kernel sparsifier: magnitude, bernoulli, outliers
    consensus: bool = False
    random: bool = False
    max_models: int | None = None


WEIGHT = Param("weight", per_model=True)
DENSITY = Param("density", 1.0, per_model=True, low=0.0, high=1.0, low_open=True)
GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0)
LAMBDA = Param("lambda", 1.0)
INT8_MASK = Param("int8_mask", False, kind="bool")


def _task_vector(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
                 extra: tuple[Param, ...] = (), random: bool = False) -> FastMethod:
    params = (
        WEIGHT, DENSITY, *extra, LAMBDA,
        Param("normalize", normalize, kind="bool"), Param("rescale", rescale, kind="bool"), INT8_MASK,
    )
    return FastMethod(name, params, True, sparsify, consensus, random)


FAST_METHODS: dict[str, FastMethod] = {
    "linear": FastMethod("linear", (WEIGHT, Param("normalize", True, kind="bool")), uses_base=False),
    "slerp": FastMethod("slerp", (Param("t"),), uses_base=True, max_models=1),
    "task_arithmetic": _task_vector("task_arithmetic", None, False, False, False),
    "ties": _task_vector("ties", "magnitude", True, True, False),
    "dare_linear": _task_vector("dare_linear", "bernoulli", False, False, True, random=True),
    "dare_ties": _task_vector("dare_ties", "bernoulli", True, False, True, random=True),
    "breadcrumbs": _task_vector("breadcrumbs", "outliers", False, False, False, (GAMMA,)),
    "breadcrumbs_ties": _task_vector("breadcrumbs_ties", "outliers", True, False, False, (GAMMA,)),
}
