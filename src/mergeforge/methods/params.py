"""A merge method's parameter schema (:class:`Param`): validation, defaults and the text that
``mergeforge methods`` and the docs show, from one definition. Torch-free, like the registry."""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass
from typing import Any

from mergeforge.errors import RecipeError


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    Arguments:
        name: the name used in recipes (mergekit's, so recipes mean the same thing).
        default: the value when the recipe gives none, or ``REQUIRED``.
        per_model: True when each input model has its own value (``models[].parameters``).
        kind: ``"float"``, ``"int"`` or ``"bool"``.
        low, high: inclusive bounds unless ``low_open``/``high_open``; ``None`` for unbounded.
        help: one line for ``mergeforge methods`` and the docs.
        scales_result: the method returns ``base + value·(result at 1 − base)`` (a final scale
            of the merged task vector); the benchmark then merges once per grid line and rescales.
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    help: str = ""
    scales_result: bool = False

    @property
    def arg(self) -> str:
        """The keyword argument name the method function receives."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def range_text(self) -> str:
        if self.kind == "bool":
            return "true/false"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def resolve(self, value: Any, where: str) -> Any:
        """The value to use: the default when ``value`` is None (an error if there is none), else
        ``value`` checked (see :meth:`check`)."""
        if value is None:
            if self.required:
                raise RecipeError(f"{where}: parameter '{self.name}' is required and not set")
            return self.default
        return self.check(value, where)

    def check(self, value: Any, where: str) -> Any:
        """Coerce ``value`` to this parameter's kind and check its range.

        ``where`` names the recipe field (and tensor) for the error message.
        """
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise RecipeError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: parameter '{self.name}' must be a number, got {value!r}")
        if self.kind == "int":
            if float(value) != int(value):
                raise RecipeError(f"{where}: parameter '{self.name}' must be a whole number, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if math.isnan(value):
            raise RecipeError(f"{where}: parameter '{self.name}' is NaN")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise RecipeError(
                f"{where}: parameter '{self.name}' = {value:g} is outside its valid range {self.range_text()}"
            )
        return value
