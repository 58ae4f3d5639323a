"""The method registry: one place that knows every merge method, its parameters and its math.

A merge method is a pure function over the tensors that make one output tensor::

    fn(tensors: list[Tensor], base: Tensor | None, *, <parameters>, generator=None) -> Tensor

- ``tensors`` are the inputs other than the base, in recipe order, all of one shape, in the
  compute dtype (float32 unless the user asks otherwise), on the compute device.
- ``base`` is the base model's tensor when the method uses a base, else ``None``.
- Per-model parameters arrive as lists aligned with ``tensors``; global ones as scalars.
  A parameter whose name is a Python keyword (``lambda``) arrives as ``lambda_``.
- Random methods receive a seeded ``torch.Generator``; they must draw from it only, so that one
  seed gives the same bytes.

A method registered with ``extra_outputs`` returns ``(tensor, {suffix: side_tensor})``; the
engine writes the side tensors to a second checkpoint (see EMR merging).

A data-aware method (Fisher merging, RegMean, AdaMerging) registers a ``calibrate`` hook. Before the
streaming merge, the hook runs forward/backward passes on whole models over the recipe's
calibration data (see :mod:`mergeforge.calibration`) and returns per-tensor statistics; the planner
stores each tensor's statistics in its job's parameters under ``statistics``, and the method
function receives them as the keyword argument ``statistics`` (``None`` for a tensor without any).

The registration's :class:`Param` schema drives validation, defaults, ``mergeforge methods``
and the docs, so they cannot disagree. Third-party packages register methods through the
``mergeforge.methods`` entry point group (each entry point names a module, imported once) or by
calling :func:`register_method` themselves.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from mergeforge.errors import RecipeError

# Re-exported: method modules import the schema from here.
from mergeforge.methods.params import REQUIRED, Param

__all__ = ["REQUIRED", "STATISTICS", "BaseUse", "MergeMethod", "Param", "all_methods", "get_method", "register_method"]

# The job parameter (and keyword argument) that carries a data-aware method's per-tensor statistics.
STATISTICS = "statistics"


class BaseUse(StrEnum):
    """How a method treats ``base_model``."""

    NONE = "none"  # the base is an input like any other, if it is listed among the models
    REQUIRED = "required"  # the method measures from the base (task vectors); it is not an input
    OPTIONAL = "optional"  # used when given, else the method works without it


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method. Call it with :meth:`run`."""

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    base: BaseUse
    math: str
    reference: str
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    elementwise: bool = False
    extra_outputs: Callable[[tuple[int, ...], int], dict[str, tuple[tuple[int, ...], torch.dtype]]] | None = None
    aliases: tuple[str, ...] = ()
    plugin: str | None = None
    notes: str = ""
    calibrate: Callable[..., dict[str, Any]] | None = None  # data-aware methods: (context) -> {tensor: statistics}
    _by_name: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})

    def param(self, name: str) -> Param | None:
        return self._by_name.get(name)

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    def run(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
        generator: torch.Generator | None = None,
    ) -> Any:
        """Call the method with parameters keyed by their recipe names (already validated)."""
        kwargs = {self._by_name[name].arg: value for name, value in params.items() if name != STATISTICS}
        if self.calibrate is not None:
            kwargs[STATISTICS] = params.get(STATISTICS)
        if self.random:
            kwargs["generator"] = generator
        return self.fn(list(tensors), base, **kwargs)


_REGISTRY: dict[str, MergeMethod] = {}
_ALIASES: dict[str, str] = {}
_plugins_loaded = False


def register_method(
    name: str,
    *,
    params: Iterable[Param] = (),
    base: BaseUse | str = BaseUse.NONE,
    math: str,
    reference: str,
    random: bool = False,
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = False,
    extra_outputs: Callable[..., Any] | None = None,
    aliases: Iterable[str] = (),
    notes: str = "",
    calibrate: Callable[..., dict[str, Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers ``fn`` as merge method ``name``.

    Arguments:
        name: the ``merge_method`` value in recipes.
        params: the parameter schema.
        base: how the method treats ``base_model`` (:class:`BaseUse`).
        math: one line of math for ``mergeforge methods``.
        reference: the paper (arXiv id or title) or the mergekit method it matches.
        random: the method draws random numbers (it receives ``generator``).
        min_models, max_models: how many non-base inputs it accepts.
        elementwise: output entry i depends only on input entries i, so the engine may split a
            large tensor into row blocks to bound memory.
        extra_outputs: ``(shape, n_models) -> {suffix: (shape, dtype)}`` for side tensors.
        notes: when to prefer it, and how it treats non-matrix tensors.
        calibrate: for data-aware methods, ``(CalibrationContext) -> {tensor name: statistics}``,
            run once on whole models before the merge (see :mod:`mergeforge.calibration`).

    Example:
        >>> @register_method("mean", math="mean of the inputs", reference="-")
        ... def mean(tensors, base):
        ...     return torch.stack(tensors).mean(0)
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        method = MergeMethod(
            name=name,
            fn=fn,
            params=tuple(params),
            base=BaseUse(base),
            math=math,
            reference=reference,
            random=random,
            min_models=min_models,
            max_models=max_models,
            elementwise=elementwise,
            extra_outputs=extra_outputs,
            aliases=tuple(aliases),
            plugin=None if fn.__module__.startswith("mergeforge.") else fn.__module__,
            notes=notes,
            calibrate=calibrate,
        )
        _REGISTRY[name] = method
        for alias in method.aliases:
            _ALIASES[alias] = name
        return fn

    return decorator


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group="mergeforge.methods"):
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not break every merge
            import warnings

            warnings.warn(f"mergeforge: plugin '{entry.name}' ({entry.value}) failed to load: {exc}", stacklevel=2)


def _load_builtin() -> None:
    from mergeforge.methods import load_builtin_methods

    load_builtin_methods()


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; a :class:`RecipeError` listing the known ones if none."""
    _load_builtin()
    if name not in _REGISTRY and name not in _ALIASES:
        _load_plugins()
    name = _ALIASES.get(name, name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError(f"merge_method: unknown method '{name}'.{hint} Known methods: {', '.join(sorted(_REGISTRY))}")


def all_methods() -> list[MergeMethod]:
    """Every registered method (built-in and plugins), sorted by name."""
    _load_builtin()
    _load_plugins()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
