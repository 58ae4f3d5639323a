"""The search YAML of ``mergeforge evolve``: what is merged, which numbers are searched, what is
scored, and how long the search may run.

A search names the models, the base and one merge method (as a recipe does), the method
parameters searched with their bounds, their granularity (one value per model, or per model and
group of layers), the fitness (a weighted sum of task scores on local task folders; a negative
weight means lower is better, as for a loss), the budget, the seed and the splits. Every field is
checked here, before any model is read, and an error names the file and the field.

Torch-free (``mergeforge --help`` must not pay for torch).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeforge.errors import RecipeError, closest

METRICS = ("score", "loss", "perplexity")


class _Strict(BaseModel):
    # Unknown fields are errors, never ignored (STYLE.md: mergekit's silently ignored fields).
    model_config = ConfigDict(extra="forbid")


class SourceModel(_Strict):
    """One model to merge, with the method parameters it keeps fixed (searched ones override them)."""

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class Bounds(_Strict):
    """The interval a searched parameter lives in; CMA-ES searches the unit cube mapped onto it."""

    low: float
    high: float
    start: float | None = None  # where the search starts (default: the middle of the interval)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high}), both finite")
        if self.start is not None and not self.low <= self.start <= self.high:
            raise ValueError(f"start ({self.start}) must lie in [{self.low}, {self.high}]")
        return self


class FitnessTask(_Strict):
    """One term of the fitness: ``weight`` × the task's ``metric`` on a split."""

    task: str  # a task folder (spec.json + split JSONL), relative to the search file
    weight: float = 1.0  # negative: lower is better (loss, perplexity)
    metric: Literal["score", "loss", "perplexity"] = "score"


class Splits(_Strict):
    """Validation drives the search; the test split is scored only for the final table."""

    search: str = "val"
    test: str = "test"
    search_examples: int | None = Field(default=None, gt=0)  # the first N examples of the search split (all if unset)
    test_examples: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _apart(self) -> Splits:
        if self.search == self.test:
            raise ValueError(f"the search split and the test split are both '{self.search}'; the test split must stay unseen")
        return self


class Budget(_Strict):
    """When the search stops: after this many candidates, or seconds, whichever comes first."""

    evaluations: int | None = Field(default=None, gt=0)
    seconds: float | None = Field(default=None, gt=0)  # wall time; a resumed run counts the time already spent

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.evaluations is None and self.seconds is None:
            raise ValueError("give 'evaluations' or 'seconds' (or both)")
        return self


class Optimizer(_Strict):
    name: Literal["cma"] = "cma"
    sigma0: float = Field(default=1 / 6, gt=0, le=1)  # in the unit cube; Sakana's evolutionary merge used 1/6
    popsize: int | None = Field(default=None, ge=2)  # default: cma's 4 + 3·ln(dimensions)
    diagonal: bool = False  # separable CMA (cheaper state) for long genomes


class Baseline(_Strict):
    """A hand-set merge scored beside the winner on the test split."""

    name: str | None = None
    merge_method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    model_parameters: dict[str, Any] = Field(default_factory=dict)  # the same for every model


class SearchConfig(_Strict):
    """``mergeforge evolve`` SEARCH.yml."""

    merge_method: str
    base_model: str
    models: list[SourceModel] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)  # fixed top-level method parameters
    search: dict[str, Bounds] = Field(min_length=1)  # parameter name -> bounds
    layer_groups: int = Field(1, ge=1)  # 1: one gene per model; N: per model and per group of layers
    fitness: list[FitnessTask] = Field(min_length=1)
    splits: Splits = Splits()
    budget: Budget
    seed: int = 0  # of the optimiser and of the merge's random masks (DARE, DELLA)
    optimizer: Optimizer = Optimizer()
    baselines: list[Baseline] | None = None  # default: DEFAULT_BASELINES
    batch_size: int = Field(64, gt=0)
    device: str = "cpu"

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``models: [a, b]`` is ``models: [{model: a}, {model: b}]``."""
        if isinstance(value, list):
            return [{"model": item} if isinstance(item, str) else item for item in value]
        return value


# The bench's untuned settings of the task-vector family (task arithmetic λ = 1, TIES/DARE at
# density 0.5): what a user would write without a search.
DEFAULT_BASELINES = (
    Baseline(name="task_arithmetic (weight 1)", merge_method="task_arithmetic", model_parameters={"weight": 1.0}),
    Baseline(name="ties (density 0.5)", merge_method="ties", model_parameters={"weight": 1.0, "density": 0.5}),
    Baseline(name="dare_ties (density 0.5)", merge_method="dare_ties", model_parameters={"weight": 1.0, "density": 0.5}),
    Baseline(name="linear (equal weights)", merge_method="linear", model_parameters={"weight": 1.0}),
)


def _known_fields() -> list[str]:
    names: list[str] = []
    for model in (SearchConfig, SourceModel, Bounds, FitnessTask, Splits, Budget, Optimizer, Baseline):
        names += list(model.model_fields)
    return names


def _validation_message(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        match = closest(str(first["loc"][-1]), _known_fields())
        hint = f"; did you mean '{match}'?" if match else ""
        return f"{source}: unknown field '{location}'{hint}"
    return f"{source}: field '{location}': {message}"


def check_against_method(config: SearchConfig, source: str) -> None:
    """The searched and fixed parameters against the method's registered schema: a searched name
    must be a numeric (float or int) parameter of the method, and its bounds inside the parameter's range."""
    from mergeforge.methods.registry import get_method

    try:
        spec = get_method(config.merge_method)
    except RecipeError as exc:
        raise RecipeError(f"{source}: field 'merge_method': {str(exc).removeprefix('merge_method: ')}") from None
    params = {param.name: param for param in spec.params}
    for name, bounds in config.search.items():
        param = params.get(name)
        if param is None:
            match = closest(name, params)
            hint = f"; did you mean '{match}'?" if match else ""
            raise RecipeError(f"{source}: field 'search.{name}': '{config.merge_method}' has no parameter '{name}'{hint} "
                              f"(its parameters: {', '.join(params) or 'none'})")
        if param.kind == "bool":
            raise RecipeError(f"{source}: field 'search.{name}': '{name}' is a bool parameter; only numeric parameters "
                              "are searched (set it under 'parameters')")
        below = param.low is not None and (bounds.low < param.low or (param.low_open and bounds.low <= param.low))
        above = param.high is not None and (bounds.high > param.high or (param.high_open and bounds.high >= param.high))
        if below or above:
            raise RecipeError(f"{source}: field 'search.{name}': [{bounds.low}, {bounds.high}] leaves the parameter's range "
                              f"{param.range_text()}")
    for name in config.parameters:
        if name not in params:
            raise RecipeError(f"{source}: field 'parameters.{name}': '{config.merge_method}' has no parameter '{name}'")
    for index, model in enumerate(config.models):
        for name in model.parameters:
            if name not in params or not params[name].per_model:
                raise RecipeError(f"{source}: field 'models.{index}.parameters.{name}': '{config.merge_method}' has no "
                                  f"per-model parameter '{name}'")
    for index, baseline in enumerate(config.baselines or []):
        try:
            get_method(baseline.merge_method)
        except RecipeError as exc:
            raise RecipeError(f"{source}: field 'baselines.{index}.merge_method': {str(exc).removeprefix('merge_method: ')}") from None
    if len(config.models) < 2 and spec.base.value == "none":
        raise RecipeError(f"{source}: field 'models': '{config.merge_method}' merges two models or more")


def load_search_config(config: SearchConfig | dict[str, Any] | str | os.PathLike[str]) -> tuple[SearchConfig, Path]:
    """Validate a search given as an object, a dict or a YAML file.

    Returns:
        The config, and the folder its relative paths (models, tasks) are read from.
    """
    if isinstance(config, SearchConfig):
        check_against_method(config, "search config")
        return config, Path.cwd()
    source, folder, data = "search config", Path.cwd(), config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise RecipeError(f"{path}: search file not found")
        from mergeforge.engine.recipe import parse_yaml

        source, folder = str(path), path.resolve().parent
        data = parse_yaml(path.read_text(encoding="utf-8"), source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a search must be a mapping with 'merge_method', 'base_model', 'models', 'search', "
                          "'fitness' and 'budget'")
    try:
        parsed = SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_validation_message(exc, source)) from None
    check_against_method(parsed, source)
    return parsed, folder


def resolve_path(text: str, folder: Path) -> Path:
    """A model or task path of the search file: absolute, or relative to the file's folder."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()
