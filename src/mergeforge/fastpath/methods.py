"""The methods the fast path runs, with their parameter schemas.

These mirror the registered methods' schemas (:mod:`mergeforge.methods.averaging` and
:mod:`mergeforge.methods.task_vectors`) without importing them, because the method package imports
torch; ``tests/test_fastpath.py`` checks that every name, default, scope and range here equals the
registry's, so the two cannot drift apart. Anything the fast path does not recognise is left to the
full path, which also owns every error message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

REQUIRED = object()


@dataclass(frozen=True)
class FastParam:
    name: str
    default: Any = REQUIRED
    per_model: bool = False
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def accept(self, value: Any) -> tuple[bool, Any]:
        """(True, coerced value) when the registry would accept ``value`` unchanged, else (False, None)."""
        if self.kind == "bool":
            if isinstance(value, bool):
                return True, value
            if isinstance(value, (int, float)) and value in (0, 1):
                return True, bool(value)
            return False, None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, None
        value = float(value)
        if math.isnan(value):
            return False, None
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False, None
        if self.high is not None and value > self.high:
            return False, None
        return True, value


@dataclass(frozen=True)
class FastMethod:
    name: str
    params: tuple[FastParam, ...]
    uses_base: bool  # True: the base is measured from (task vectors, slerp), not an input
    sparsify: str | None = None  # kernel sparsifier: magnitude, bernoulli, outliers
    consensus: bool = False
    random: bool = False
    max_models: int | None = None


WEIGHT = FastParam("weight", per_model=True)
DENSITY = FastParam("density", 1.0, per_model=True, low=0.0, high=1.0, low_open=True)
GAMMA = FastParam("gamma", 0.01, per_model=True, low=0.0, high=1.0)
LAMBDA = FastParam("lambda", 1.0)
INT8_MASK = FastParam("int8_mask", False, kind="bool")


def _task_vector(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
                 extra: tuple[FastParam, ...] = (), random: bool = False) -> FastMethod:
    params = (
        WEIGHT, DENSITY, *extra, LAMBDA,
        FastParam("normalize", normalize, kind="bool"), FastParam("rescale", rescale, kind="bool"), INT8_MASK,
    )
    return FastMethod(name, params, True, sparsify, consensus, random)


FAST_METHODS: dict[str, FastMethod] = {
    "linear": FastMethod("linear", (WEIGHT, FastParam("normalize", True, kind="bool")), uses_base=False),
    "slerp": FastMethod("slerp", (FastParam("t"),), uses_base=True, max_models=1),
    "task_arithmetic": _task_vector("task_arithmetic", None, False, False, False),
    "ties": _task_vector("ties", "magnitude", True, True, False),
    "dare_linear": _task_vector("dare_linear", "bernoulli", False, False, True, random=True),
    "dare_ties": _task_vector("dare_ties", "bernoulli", True, False, True, random=True),
    "breadcrumbs": _task_vector("breadcrumbs", "outliers", False, False, False, (GAMMA,)),
    "breadcrumbs_ties": _task_vector("breadcrumbs_ties", "outliers", True, False, False, (GAMMA,)),
}
