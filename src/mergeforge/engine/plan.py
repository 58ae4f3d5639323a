"""Recipe + checkpoints -> a plan: one job per output tensor, with every parameter resolved.

Everything a user can get wrong is found here, before a single output byte is written: unknown or
misspelled parameters, values out of range, a method that needs ``base_model`` without one, missing
tensors, mismatched shapes, layer ranges past a model's end (see :mod:`mergeforge.engine.layouts`).
The plan holds header entries and dtype names only: planning reads no tensor data and imports no
torch, and either executor runs the same plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.checkpoint.adapted import input_locations
from mergeforge.checkpoint.reader import Checkpoint, TensorSource, open_checkpoint
from mergeforge.checkpoint.writer import OutputTensor
from mergeforge.dtypes import promote
from mergeforge.engine.jobs import SourceTensor, TensorJob
from mergeforge.engine.layouts import Planner
from mergeforge.engine.recipe import Parameters, Recipe
from mergeforge.engine.vocabulary import plan_vocabulary, tokenizer_field
from mergeforge.errors import CheckpointError, RecipeError, closest
from mergeforge.methods.registry import (
    SIDE_SEPARATOR,
    STATISTICS,
    MethodSpec,
    all_methods,
    get_method,
)
from mergeforge.tokenizer import MergedVocabulary


@dataclass
class MergePlan:
    """The output of planning, consumed by the engine and the writer."""

    recipe: Recipe
    method: MethodSpec
    checkpoints: Mapping[str, TensorSource]
    reference: str  # the model whose config and files the output carries over
    jobs: list[TensorJob]
    compute_dtype: str  # what the methods compute in (see compute_dtype)
    cast_dtype: str | None  # recipe 'dtype': inputs are rounded to it first (mergekit semantics)
    output_layers: list[SourceTensor] | None  # for slices: (model, source layer) of each output layer
    warnings: list[str]
    vocabulary: MergedVocabulary | None = None  # the output's vocabulary, when the recipe sets one
    views: Mapping[str, TensorSource] = dataclasses.field(default_factory=dict)  # models read through it

    def reader(self, model: str) -> TensorSource:
        """What the executors read ``model``'s tensors from: its view in the merged vocabulary
        when the recipe remaps it, else the model itself."""
        return self.views.get(model) or self.checkpoints[model]

    @property
    def bytes_to_read(self) -> int:
        total = 0
        for job in self.jobs:
            sources = [s for s in job.inputs if s is not None] + ([job.base] if job.base else [])
            total += sum(self.checkpoints[s.model].info(s.name).nbytes for s in sources)
        return total

    @property
    def bytes_to_write(self) -> int:
        return sum(job.output.nbytes for job in self.jobs)

    def input_locations(self) -> list[Path]:
        """Every file or folder the merge reads, which its output must not replace: the models,
        and the adapters of ``model+adapter`` references."""
        return [location for checkpoint in self.checkpoints.values() for location in input_locations(checkpoint)]

    def side_tensors(self) -> list[OutputTensor]:
        """The side tensors the method will produce (e.g. EMR's per-task masks), none for most."""
        extra = self.method.extra_outputs
        if extra is None:
            return []
        return [
            OutputTensor(f"{job.output.name}{SIDE_SEPARATOR}{suffix}", tuple(shape), dtype)
            for job in self.jobs if job.method is not None
            for suffix, (shape, dtype) in extra(job.output.shape, len(job.inputs)).items()
        ]

    def with_statistics(self, statistics: Mapping[str, Any]) -> MergePlan:
        """The same plan with each merged tensor's calibration statistics (``None`` for a tensor
        without any) among its job's parameters: what a data-aware method computes from."""
        jobs = [
            dataclasses.replace(job, params={**job.params, STATISTICS: statistics.get(job.output.name)}) if job.method else job
            for job in self.jobs
        ]
        return dataclasses.replace(self, jobs=jobs)

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()

    def __enter__(self) -> MergePlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_parameter_names(recipe: Recipe, method: MethodSpec) -> None:
    known = [p.name for p in method.params]

    def check(parameters: Parameters | None, where: str, per_model_level: bool) -> None:
        for name in parameters or {}:
            param = method.param(name)
            if param is None:
                match = closest(name, known)
                hint = f" Did you mean '{match}'?" if match else ""
                listing = ", ".join(known) if known else "none"
                raise RecipeError(f"{where}: unknown parameter '{name}' for merge_method '{method.name}'.{hint} Its parameters: {listing}")
            if per_model_level and not param.per_model:
                raise RecipeError(
                    f"{where}: '{name}' is a global parameter of '{method.name}'; set it under the top-level or slice 'parameters'"
                )

    check(recipe.parameters, "parameters", False)
    for i, model in enumerate(recipe.models or []):
        check(model.parameters, f"models[{i}] ({model.model}).parameters", True)
    for i, output_slice in enumerate(recipe.slices or []):
        check(output_slice.parameters, f"slices[{i}].parameters", False)
        for j, source in enumerate(output_slice.sources):
            check(source.parameters, f"slices[{i}].sources[{j}] ({source.model}).parameters", True)


def _check_calibration(recipe: Recipe, method: MethodSpec) -> None:
    """Data-aware methods need ``calibration:`` data, and only they take it."""
    if method.calibrate is None:
        if recipe.calibration is not None:
            data_aware = ", ".join(m.name for m in all_methods() if m.calibrate is not None)
            raise RecipeError(
                f"calibration: merge_method '{method.name}' does not use calibration data; remove the 'calibration' field "
                f"(the data-aware methods are {data_aware})"
            )
        return
    if recipe.calibration is None:
        raise RecipeError(
            f"calibration: merge_method '{method.name}' is data-aware and needs calibration data; add a top-level "
            "'calibration:' field with 'data: FILE.jsonl' (or a task folder) and optionally 'samples', 'max_length', 'batch_size'"
        )
    if recipe.slices:
        raise RecipeError(f"slices: merge_method '{method.name}' (data-aware) merges whole models; use 'models' instead of 'slices'")


def open_models(recipe: Recipe, relative_to: Path | None = None, folders: Mapping[str, Path] | None = None) -> dict[str, TensorSource]:
    """Every model the recipe reads, by its reference; ``folders`` maps references that are not
    paths (a multi-stage recipe's stage names) to the folders that hold them."""
    checkpoints: dict[str, TensorSource] = {}
    tokenizer_only = recipe.tokenizer_model() if recipe.tokenizer_model() not in recipe.merged_models() else None
    try:
        for ref in recipe.referenced_models():
            try:
                checkpoints[ref] = Checkpoint(folders[ref], ref) if folders and ref in folders else open_checkpoint(ref, relative_to)
            except CheckpointError as exc:
                if ref != tokenizer_only:
                    raise
                match = closest(ref, recipe.merged_models())
                hint = f"; did you mean '{match}'?" if match else ""
                raise RecipeError(f"{tokenizer_field(recipe)}: '{ref}' is not one of the merged models and cannot be opened as a "
                                  f"model ({exc}){hint}") from None
    except BaseException:
        for checkpoint in checkpoints.values():
            checkpoint.close()
        raise
    return checkpoints


def compute_dtype(math_dtype: str, cast_dtype: str | None, input_dtypes: set[str]) -> str:
    """The dtype the methods compute in.

    ``"float32"`` (the default) widens 16-bit inputs: float32, or float64 when the recipe asks for
    it. ``"recipe"`` follows mergekit, which computes in what it loaded: the recipe's ``dtype``,
    else the inputs' own dtype (promoted when they differ), to reproduce a mergekit merge made with
    ``dtype: bfloat16``; the first is more accurate. A method that declares ``float32_math``
    computes in float32 either way (the torch executor widens its inputs).
    """
    if math_dtype == "recipe":
        return promote({cast_dtype}) if cast_dtype is not None else promote(input_dtypes)
    return "F64" if cast_dtype == "F64" else "F32"


def build_plan(
    recipe: Recipe,
    *,
    checkpoints: Mapping[str, TensorSource] | None = None,
    relative_to: Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    out_dtype: str | None = None,
    math_dtype: str = "float32",
    folders: Mapping[str, Path] | None = None,
) -> MergePlan:
    """Plan a merge; ``seed``, ``dtype`` and ``out_dtype`` override the recipe's; ``math_dtype``
    is :data:`~mergeforge.engine.options.MATH_DTYPES`' choice (see :func:`compute_dtype`).

    Opens the recipe's models (``folders`` maps references to folders, see :func:`open_models`)
    unless ``checkpoints`` (reference -> model) is given; the plan owns them and
    :meth:`MergePlan.close` closes them. Reads no tensor data.
    """
    method = get_method(recipe.merge_method)
    _check_parameter_names(recipe, method)
    _check_calibration(recipe, method)
    opened = open_models(recipe, relative_to, folders) if checkpoints is None else checkpoints
    try:
        vocabulary = plan_vocabulary(recipe, method, opened)
        readers = {**opened, **vocabulary.views} if vocabulary is not None else opened
        planner = Planner(recipe, method, readers, seed, dtype, out_dtype)
        output_layers = planner.plan_slices() if recipe.slices else None
        if not recipe.slices:
            planner.plan_models()
        planner.finish_warnings()
    except BaseException:
        if checkpoints is None:
            for checkpoint in opened.values():
                checkpoint.close()
        raise
    for job in planner.jobs:
        job.input_dtypes = [opened[s.model].info(s.name).dtype for s in job.inputs if s is not None]
    return MergePlan(
        recipe=recipe,
        method=method,
        checkpoints=opened,
        reference=recipe.reference_model(),
        jobs=planner.jobs,
        compute_dtype=compute_dtype(math_dtype, planner.cast_dtype,
                                    {dtype for job in planner.jobs if job.method is not None for dtype in job.input_dtypes}),
        cast_dtype=planner.cast_dtype,
        output_layers=output_layers,
        warnings=[*(vocabulary.warnings if vocabulary else []), *planner.warnings],
        vocabulary=vocabulary.merged if vocabulary else None,
        views=vocabulary.views if vocabulary else {},
    )
