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

A method may also have a ``kernel``: the same math in NumPy, over flat arrays read block by block
(see :mod:`mergeforge.methods.kernels`), called with the same keyword arguments (``seed`` instead
of ``generator``). The NumPy executor runs a plan whose every method has one without importing
torch, and :meth:`MethodSpec.run` uses it for CPU float32 tensors, so both executors write the
same bytes.

A method registered with ``extra_outputs`` returns ``(tensor, {suffix: side_tensor})``; the
engine writes the side tensors to a second checkpoint (see EMR merging).

A data-aware method (Fisher merging, RegMean, AdaMerging) registers a ``calibrate`` hook. Before the
streaming merge, the hook runs forward/backward passes on whole models over the recipe's
calibration data (see :mod:`mergeforge.calibration`) and returns per-tensor statistics; the plan
is rebuilt with each tensor's statistics among its job's parameters under ``statistics``, and the
method function receives them as the keyword argument ``statistics`` (``None`` for a tensor
without any).

The registration's :class:`Param` schema drives validation, defaults, ``mergeforge methods``
and the docs, so they cannot disagree. Third-party packages register methods through the
``mergeforge.methods`` entry point group (each entry point names a module, imported once) or by
calling :func:`register_method` themselves.

Nothing here imports torch: specs are plain data, so planning a merge needs no torch.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from mergeforge.errors import MethodError, RecipeError, closest
from mergeforge.methods.params import REQUIRED, Param

if TYPE_CHECKING:
    import torch

    from mergeforge.methods.kernels import Kernel

__all__ = ["REQUIRED", "STATISTICS", "BaseUse", "MethodSpec", "Param", "Registry", "all_methods", "get_method",
           "register_method", "METHODS"]

# The job parameter (and keyword argument) that carries a data-aware method's per-tensor statistics.
STATISTICS = "statistics"

# ``(shape, n_models) -> {suffix: (shape, dtype name)}``: the side tensors a method writes per tensor,
# each named ``<tensor>{SIDE_SEPARATOR}<suffix>``.
SIDE_SEPARATOR = "::"
ExtraOutputs = Callable[[tuple[int, ...], int], dict[str, tuple[tuple[int, ...], str]]]


class BaseUse(StrEnum):
    """How a method treats ``base_model``."""

    NONE = "none"  # the base is an input like any other, if it is listed among the models
    REQUIRED = "required"  # the method measures from the base (task vectors); it is not an input
    OPTIONAL = "optional"  # used when given, else the method works without it


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: its schema, its torch function and, optionally, its NumPy kernel."""

    name: str
    fn: Callable[..., Any]
    params: tuple[Param, ...]
    base: BaseUse
    math: str
    citation: str
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    elementwise: bool = False
    extra_outputs: ExtraOutputs | None = None
    aliases: tuple[str, ...] = ()
    plugin: str | None = None
    notes: str = ""
    calibrate: Callable[..., dict[str, Any]] | None = None  # data-aware methods: (context) -> {tensor: statistics}
    # The calibrate hook reads none of the method's parameters, so its statistics serve every setting.
    statistics_ignore_params: bool = False
    kernel: Kernel | None = None
    # Computes in float32 even under --math-dtype recipe with a 16-bit recipe dtype: mergekit's
    # own implementation widens (linear, slerp), torch has no 16-bit kernel for its math
    # (SVD), or 16 bits cannot hold it (an optimiser's small steps).
    float32_math: bool = False
    _by_name: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})

    def param(self, name: str) -> Param | None:
        return self._by_name.get(name)

    def check_model_count(self, count: int, where: str) -> None:
        """Raise if the method cannot merge ``count`` models (besides the base)."""
        if count >= self.min_models and (self.max_models is None or count <= self.max_models):
            return
        if self.max_models == self.min_models:
            wanted = f"exactly {self.min_models}"
        else:
            wanted = f"at least {self.min_models}" + (f" and at most {self.max_models}" if self.max_models else "")
        base_note = " besides the base model" if self.base != BaseUse.NONE else ""
        raise RecipeError(f"{where}: merge_method '{self.name}' takes {wanted} model(s){base_note}, got {count}")

    def arguments(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``fn`` and ``kernel`` from parameters keyed by their recipe names."""
        kwargs = {self._by_name[name].arg: value for name, value in params.items() if name != STATISTICS}
        if self.calibrate is not None:
            kwargs[STATISTICS] = params.get(STATISTICS)
        return kwargs

    def run(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        params: Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> Any:
        """Merge one tensor, with parameters keyed by their recipe names (already validated).

        CPU float32 tensors go through the NumPy kernel when the method has one (zero-copy), so the
        result is the NumPy executor's to the bit; other tensors (GPU, float64) through ``fn``.
        """
        kwargs = self.arguments(params)
        if self.kernel is not None:
            from mergeforge.methods.kernels import kernel_accepts, run_on_tensors

            if kernel_accepts([*tensors, *([base] if base is not None else [])]):
                if self.random:
                    kwargs["seed"] = generator.initial_seed() if generator is not None else 0
                return run_on_tensors(self.kernel, tensors, base, kwargs)
        if self.random:
            kwargs["generator"] = generator
        return self.fn(list(tensors), base, **kwargs)


def _module_of(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__module__", "") or ""


def _check_signature(name: str, fn: Callable[..., Any], expected: set[str], what: str) -> None:
    """The keyword-only arguments of ``fn`` must be exactly the schema's (extra ones need defaults)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to read
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    keyword_only = {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    missing = sorted(expected - set(keyword_only))
    if missing:
        raise MethodError(f"register_method('{name}'): the {what} takes no keyword argument '{missing[0]}' of the schema")
    unknown = sorted(n for n, p in keyword_only.items() if n not in expected and p.default is inspect.Parameter.empty)
    if unknown:
        raise MethodError(f"register_method('{name}'): the {what}'s keyword argument '{unknown[0]}' is not in the schema")


class Registry:
    """Merge methods by name. Built-in methods load on first use; plugins (the
    ``mergeforge.methods`` entry point group) on the first lookup of a name nobody registered."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodSpec] = {}
        self._aliases: dict[str, str] = {}
        self._broken_plugins: set[str] = set()

    def add(self, spec: MethodSpec, *, replace: bool = False) -> None:
        """Register ``spec``; a name (or alias) already taken is an error unless ``replace``."""
        if not _module_of(spec.fn).startswith("mergeforge."):
            _load_builtins()  # so a plugin that reuses a built-in name is told so now, not later
        for name in (spec.name, *spec.aliases):
            owner = self._aliases.get(name, name)
            if owner in self._methods and not (replace and owner == spec.name):
                where = self._methods[owner].plugin or "built-in"
                raise MethodError(
                    f"register_method('{spec.name}'): the name '{name}' is already taken by method '{owner}' ({where}); "
                    "choose another name, or pass replace=True to replace it"
                )
        self._methods[spec.name] = spec
        for alias in spec.aliases:
            self._aliases[alias] = spec.name

    def remove(self, name: str) -> None:
        """Unregister method ``name`` and its aliases (for notebooks and tests)."""
        spec = self._methods.pop(self._aliases.get(name, name))
        for alias in spec.aliases:
            self._aliases.pop(alias, None)

    def find(self, name: str) -> MethodSpec | None:
        return self._methods.get(self._aliases.get(name, name))

    def names(self) -> list[str]:
        return sorted(self._methods)

    def load_plugins(self) -> None:
        """Import every ``mergeforge.methods`` entry point not imported yet (each registers its
        methods on import); one that fails to import is a warning, given once."""
        from importlib.metadata import entry_points

        for entry in entry_points(group="mergeforge.methods"):
            if entry.value in self._broken_plugins or entry.module in sys.modules:
                continue
            try:
                entry.load()
            except Exception as exc:  # a broken plugin must not break every merge
                self._broken_plugins.add(entry.value)
                warnings.warn(f"mergeforge: plugin '{entry.name}' ({entry.value}) failed to load: {exc}", stacklevel=2)


METHODS = Registry()


def register_method(
    name: str,
    *,
    params: Iterable[Param] = (),
    base: BaseUse | str = BaseUse.NONE,
    math: str,
    citation: str,
    random: bool = False,
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = False,
    extra_outputs: ExtraOutputs | None = None,
    aliases: Iterable[str] = (),
    notes: str = "",
    calibrate: Callable[..., dict[str, Any]] | None = None,
    statistics_ignore_params: bool = False,
    kernel: Kernel | None = None,
    float32_math: bool = False,
    replace: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers ``fn`` as merge method ``name``.

    Arguments:
        name: the ``merge_method`` value in recipes.
        params: the parameter schema; its names must be ``fn``'s keyword-only arguments.
        base: how the method treats ``base_model`` (:class:`BaseUse`).
        math: one line of math for ``mergeforge methods``.
        citation: the paper (arXiv id or title) or the mergekit method it matches.
        random: the method draws random numbers (it receives ``generator``).
        min_models, max_models: how many non-base inputs it accepts.
        elementwise: output entry i depends only on input entries i, so the engine may split a
            large tensor into row blocks to bound memory.
        extra_outputs: ``(shape, n_models) -> {suffix: (shape, dtype name)}`` for side tensors.
        notes: when to prefer it, and how it treats non-matrix tensors.
        calibrate: for data-aware methods, ``(CalibrationContext) -> {tensor name: statistics}``,
            run once on whole models before the merge (see :mod:`mergeforge.calibration`).
        statistics_ignore_params: ``calibrate`` reads none of the method's parameters, so one
            calibration serves every setting (``merge_state_dicts``' ``calibration_cache``).
        kernel: the NumPy implementation (see :mod:`mergeforge.methods.kernels`), if any.
        float32_math: compute in float32 even when ``--math-dtype recipe`` asks for a 16-bit
            dtype (mergekit's implementation widens too, torch has no 16-bit kernel for the math,
            or 16 bits cannot hold it).
        replace: replace a method already registered under ``name`` instead of raising.

    Returns:
        The decorator; it returns ``fn`` unchanged.

    Example:
        >>> @register_method("mean", math="mean of the inputs", citation="-")
        ... def mean(tensors, base):
        ...     return torch.stack(tensors).mean(0)
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        schema = tuple(params)
        module = _module_of(fn)
        spec = MethodSpec(
            name=name,
            fn=fn,
            params=schema,
            base=BaseUse(base),
            math=math,
            citation=citation,
            random=random,
            min_models=min_models,
            max_models=max_models,
            elementwise=elementwise,
            extra_outputs=extra_outputs,
            aliases=tuple(aliases),
            plugin=None if module.startswith("mergeforge.") else module,
            notes=notes,
            calibrate=calibrate,
            statistics_ignore_params=statistics_ignore_params,
            kernel=kernel,
            float32_math=float32_math,
        )
        expected = {p.arg for p in schema} | ({STATISTICS} if calibrate is not None else set())
        _check_signature(name, fn, expected | ({"generator"} if random else set()), "function")
        if kernel is not None:
            _check_signature(name, kernel.run, expected | ({"seed"} if random else set()), "kernel")
        METHODS.add(spec, replace=replace)
        return fn

    return decorator


def _load_builtins(torch_free_only: bool = False) -> None:
    from mergeforge.methods import load_builtin_methods

    load_builtin_methods(torch_free_only=torch_free_only)


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name`` (or an alias); a :class:`RecipeError` listing the known
    ones if none. Looking up a method with a NumPy kernel imports no torch."""
    _load_builtins(torch_free_only=True)
    spec = METHODS.find(name)
    if spec is None:
        _load_builtins()
        spec = METHODS.find(name)
    if spec is None:
        METHODS.load_plugins()
        spec = METHODS.find(name)
    if spec is not None:
        return spec
    known = METHODS.names()
    match = closest(name, known)
    hint = f" Did you mean '{match}'?" if match else ""
    raise RecipeError(f"merge_method: unknown method '{name}'.{hint} Known methods: {', '.join(known)}")


def all_methods() -> list[MethodSpec]:
    """Every registered method (built-in and plugins), sorted by name."""
    _load_builtins()
    METHODS.load_plugins()
    return [spec for name in METHODS.names() if (spec := METHODS.find(name)) is not None]
