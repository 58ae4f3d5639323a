"""The search YAML of ``mergeforge evolve``: what is merged, which numbers are searched, what is
scored, and how long the search may run.

A parameter-space search names the models, the base and one merge method (as a recipe does), the
method parameters searched with their bounds, their granularity (one value per model, or per model
and group of layers). A layer-path search names instead, under ``layer_path``, the models whose
decoder layers a path may take, the repeats and the bounds of each step's scale. Both give the
fitness (a weighted sum of task scores on local task folders or lm-eval YAML tasks; a negative
weight means lower is better, as for a loss), the budget, the seed and the splits. Every field is
checked here, before any model is read, and an error names the file and the field.

Torch-free (``mergeforge --help`` must not pay for torch).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergeforge.config_file import load_config_file
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
    """One term of the fitness: ``weight`` × the task's ``metric`` on a split. The task is a
    mergeforge task folder (``task``), or an lm-eval YAML task (``lm_eval``, defined under
    ``include_path``) scored through lm-evaluation-harness on the candidate in memory."""

    task: str | None = None  # a task folder (spec.json + split JSONL), relative to the search file
    lm_eval: str | None = None  # an lm-eval task name, defined by a YAML file under include_path
    include_path: str | None = None  # the folder of lm-eval task YAML files, relative to the search file
    weight: float = 1.0  # negative: lower is better (loss, perplexity)
    # task: score (the spec's exact match or contains), loss or perplexity; lm_eval: score (the
    # task's first metric) or any metric lm-eval reports for it (e.g. exact_match, acc_norm)
    metric: str = "score"

    @model_validator(mode="after")
    def _one_source(self) -> FitnessTask:
        if (self.task is None) == (self.lm_eval is None):
            raise ValueError("give one of 'task' (a task folder) or 'lm_eval' (an lm-eval task name)")
        if self.task is not None:
            if self.include_path is not None:
                raise ValueError("'include_path' belongs to an 'lm_eval' term")
            if self.metric not in METRICS:
                raise ValueError(f"metric '{self.metric}' of task '{self.task}': use one of {', '.join(METRICS)}")
        elif self.include_path is None:
            raise ValueError(f"lm_eval task '{self.lm_eval}' needs 'include_path', the folder of its YAML "
                             "(lm-eval's built-in tasks download their data, so they are not offered)")
        return self

    @property
    def folder_name(self) -> str:
        """A task-folder term's task name (its folder's name)."""
        assert self.task is not None, "an lm_eval term has no task folder"
        return Path(self.task).name

    @property
    def key(self) -> str:
        """The term's key in the journal and the reports: the task folder's name (``lm_eval:`` and
        the task name for an lm-eval term), with the metric unless it is the score."""
        name = self.folder_name if self.task is not None else f"lm_eval:{self.lm_eval}"
        return name if self.metric == "score" else f"{name}:{self.metric}"


# Candidates per generation re-scored on the whole search split when a minibatch is used: a few,
# so that one lucky minibatch score does not make the winner.
RACE_DEFAULT = 3


class Splits(_Strict):
    """Validation drives the search; the test split is scored only for the final table."""

    search: str = "val"
    test: str = "test"
    search_examples: int | None = Field(default=None, gt=0)  # the first N examples of the search split (all if unset)
    test_examples: int | None = Field(default=None, gt=0)
    # Each generation scores its candidates on this many examples per task, drawn afresh from the
    # search split (every candidate of a generation sees the same ones); unset: the whole split.
    minibatch: int | None = Field(default=None, gt=0)
    # With a minibatch: the best `race` candidates of each generation are re-scored on the whole
    # search split, and the winner is the best of those (default RACE_DEFAULT).
    race: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _apart(self) -> Splits:
        if self.search == self.test:
            raise ValueError(f"the search split and the test split are both '{self.search}'; the test split must stay unseen")
        if self.race is not None and self.minibatch is None:
            raise ValueError("'race' re-scores candidates scored on a minibatch; set 'minibatch' too (or drop 'race')")
        if self.minibatch is not None and self.search_examples is not None and self.minibatch >= self.search_examples:
            raise ValueError(f"'minibatch' ({self.minibatch}) must be below 'search_examples' ({self.search_examples}); "
                             "drop 'minibatch' to score every candidate on the whole search split")
        return self

    @property
    def race_size(self) -> int:
        """Candidates of each generation re-scored on the whole search split (0: no minibatch, no race)."""
        if self.minibatch is None:
            return 0
        return self.race if self.race is not None else RACE_DEFAULT


class Budget(_Strict):
    """When the search stops: after this many candidates, or seconds, whichever comes first."""

    evaluations: int | None = Field(default=None, gt=0)
    seconds: float | None = Field(default=None, gt=0)  # wall time; a resumed run counts the time already spent

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.evaluations is None and self.seconds is None:
            raise ValueError("give 'evaluations' or 'seconds' (or both)")
        return self


# The genome length from which ``optimizer.diagonal`` defaults to on: cma's full covariance at
# about 4300 genes holds about 294 MB and takes 1.6 s per generation (REFERENCE.md).
DIAGONAL_FROM = 1000


class Optimizer(_Strict):
    # cma: CMA-ES on the weighted sum of the fitness terms; nsga2: NSGA-II (pymoo) with every
    # term an objective, searching their Pareto front (mergeforge.evolve.moo)
    name: Literal["cma", "nsga2"] = "cma"
    sigma0: float = Field(default=1 / 6, gt=0, le=1)  # in the unit cube; Sakana's evolutionary merge used 1/6
    popsize: int | None = Field(default=None, ge=2)  # default: cma's 4 + 3·ln(dimensions) (nsga2: rounded up to even)
    # Separable CMA (a diagonal covariance: linear, not quadratic, state and time per generation);
    # default: on from DIAGONAL_FROM genes (a layer path over a deep model runs to thousands).
    diagonal: bool | None = None

    @model_validator(mode="after")
    def _options_of_the_optimizer(self) -> Optimizer:
        if self.name == "nsga2":  # compared with the defaults: a dumped config (to a worker) sets every field
            for option in ("sigma0", "diagonal"):
                if getattr(self, option) != type(self).model_fields[option].default:
                    raise ValueError(f"'{option}' is an option of cma; nsga2 takes only 'popsize'")
        return self


class Baseline(_Strict):
    """A hand-set merge scored beside the winner on the test split."""

    name: str | None = None
    merge_method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    model_parameters: dict[str, Any] = Field(default_factory=dict)  # the same for every model


class LayerPath(_Strict):
    """Sakana's data-flow search space: the slots are every layer of every model in order (all of
    the first model's, then the second's, ...), the whole repeated ``repeats`` times; a candidate
    takes a subset of the slots, in slot order, each with a scale on its residual update."""

    models: list[str] = Field(min_length=1)  # model folders, or recipe files (merged once, into OUT_DIR/sources)
    repeats: int = Field(2, ge=1, le=64)  # r: the slots are r copies of all the models' layers
    max_steps: int | None = Field(default=None, ge=1)  # a path keeps its first max_steps taken slots (default: no cap)
    scale: Bounds = Bounds(low=0.5, high=1.5, start=1.0)  # each step's scale on its attention and MLP updates
    search_scales: bool = True  # false: every scale is 1, and the genome is the T indicators alone
    start: int = Field(0, ge=0)  # the path starts as this model's layers in order (an index into models)

    @model_validator(mode="after")
    def _start_model(self) -> LayerPath:
        if self.start >= len(self.models):
            raise ValueError(f"start ({self.start}) must index one of the {len(self.models)} models")
        return self


class SearchConfig(_Strict):
    """``mergeforge evolve`` SEARCH.yml: a parameter-space search (``merge_method``, ``models``,
    ``search``) or a layer-path search (``layer_path``)."""

    merge_method: str | None = None
    base_model: str | None = None  # required for a parameter-space search; optional with layer_path (baselines)
    models: list[SourceModel] | None = Field(default=None, min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)  # fixed top-level method parameters
    search: dict[str, Bounds] | None = Field(default=None, min_length=1)  # parameter name -> bounds
    layer_groups: int = Field(1, ge=1)  # 1: one gene per model; N: per model and per group of layers
    layer_path: LayerPath | None = None
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

    @model_validator(mode="after")
    def _one_kind(self) -> SearchConfig:
        if self.layer_path is not None:
            for name in ("merge_method", "models", "search"):
                if getattr(self, name) is not None:
                    raise ValueError(f"'{name}' belongs to a parameter-space search; a layer-path search lists its models "
                                     "under 'layer_path.models' (to search a merge's parameters, drop 'layer_path')")
            if self.parameters or self.layer_groups != 1:
                raise ValueError("'parameters' and 'layer_groups' belong to a parameter-space search, not to 'layer_path'")
            return self
        for name in ("merge_method", "base_model", "models", "search"):
            if getattr(self, name) is None:
                raise ValueError(f"missing '{name}' (or give 'layer_path' for a layer-path search)")
        return self

    @model_validator(mode="after")
    def _terms(self) -> SearchConfig:
        if self.splits.minibatch is not None and any(term.lm_eval is not None for term in self.fitness):
            raise ValueError("'splits.minibatch' draws examples from task folders; an 'lm_eval' term is scored on "
                             "the first 'search_examples' documents of its split instead: drop 'minibatch'")
        keys = [term.key for term in self.fitness]
        if len(set(keys)) < len(keys):
            raise ValueError(f"two fitness terms are both '{next(k for k in keys if keys.count(k) > 1)}' (the same task and metric)")
        return self

    @model_validator(mode="after")
    def _objectives(self) -> SearchConfig:
        objectives = sum(term.weight != 0 for term in self.fitness)
        if self.optimizer.name == "nsga2" and objectives < 2:
            raise ValueError(f"optimizer 'nsga2' searches the Pareto front of two fitness terms or more (with a non-zero "
                             f"weight); this search has {objectives}: add terms, or use 'cma'")
        return self

    @property
    def is_layer_path(self) -> bool:
        return self.layer_path is not None

    @property
    def method_name(self) -> str:
        """The method named in reports: the merge method, or ``layer_path``."""
        return self.merge_method if self.merge_method is not None else "layer_path"


# The bench's untuned settings of the task-vector family (task arithmetic λ = 1, TIES/DARE at
# density 0.5): what a user would write without a search.
DEFAULT_BASELINES = (
    Baseline(name="task_arithmetic (weight 1)", merge_method="task_arithmetic", model_parameters={"weight": 1.0}),
    Baseline(name="ties (density 0.5)", merge_method="ties", model_parameters={"weight": 1.0, "density": 0.5}),
    Baseline(name="dare_ties (density 0.5)", merge_method="dare_ties", model_parameters={"weight": 1.0, "density": 0.5}),
    Baseline(name="linear (equal weights)", merge_method="linear", model_parameters={"weight": 1.0}),
)


def check_against_method(config: SearchConfig, source: str) -> None:
    """The searched and fixed parameters against the method's registered schema: a searched name
    must be a numeric (float or int) parameter of the method, and its bounds inside the parameter's range."""
    from mergeforge.methods.registry import get_method

    _check_baselines(config, source)
    if config.layer_path is not None:
        return
    assert config.merge_method is not None and config.search is not None and config.models is not None
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
    if len(config.models) < 2 and spec.base.value == "none":
        raise RecipeError(f"{source}: field 'models': '{config.merge_method}' merges two models or more")


def _check_baselines(config: SearchConfig, source: str) -> None:
    from mergeforge.methods.registry import BaseUse, get_method

    for index, baseline in enumerate(config.baselines or []):
        try:
            spec = get_method(baseline.merge_method)
        except RecipeError as exc:
            raise RecipeError(f"{source}: field 'baselines.{index}.merge_method': {str(exc).removeprefix('merge_method: ')}") from None
        if config.base_model is None and spec.base == BaseUse.REQUIRED:
            raise RecipeError(f"{source}: field 'baselines.{index}.merge_method': '{baseline.merge_method}' needs a base; "
                              "set 'base_model'")


def load_search_config(config: SearchConfig | dict[str, Any] | str | os.PathLike[str]) -> tuple[SearchConfig, Path]:
    """Validate a search given as an object, a dict or a YAML file.

    Returns:
        The config, and the folder its relative paths (models, tasks) are read from.
    """
    if isinstance(config, SearchConfig):
        check_against_method(config, "search config")
        return config, Path.cwd()
    parsed, source, folder = load_config_file(
        config, SearchConfig, what="search file", source="search config",
        mapping="a search must be a mapping with 'merge_method', 'base_model', 'models', 'search', 'fitness' and 'budget'",
        schemas=[SourceModel, Bounds, FitnessTask, Splits, Budget, Optimizer, Baseline, LayerPath])
    check_against_method(parsed, source)
    return parsed, folder


def resolve_path(text: str, folder: Path) -> Path:
    """A model or task path of the search file: absolute, or relative to the file's folder."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()
