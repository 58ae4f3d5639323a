"""The Python API: merge on disk (:func:`merge`), plan only (:func:`plan_merge`), or merge in memory
(:func:`merge_state_dicts`, :func:`merge_tensors`) for search loops and notebooks.

Every path goes through the same recipe validation, planner and executors, so a recipe means the
same thing whichever way it is run, and the command line (``mergeforge merge``) calls
:func:`merge` itself. Nothing here imports torch until a plan needs the torch executor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeforge.checkpoint import folder as folder_files
from mergeforge.checkpoint.gguf_reader import GGUFCheckpoint
from mergeforge.checkpoint.reader import TensorIndex, TensorInfo
from mergeforge.dtypes import from_torch
from mergeforge.engine.options import MergeOptions
from mergeforge.engine.output import Executor, MergeResult, describe, write_merge
from mergeforge.engine.plan import MergePlan, build_plan
from mergeforge.engine.recipe import Recipe, load_recipe
from mergeforge.errors import MergeforgeError, OutputError, RecipeError
from mergeforge.methods.registry import BaseUse, get_method

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergeforge")

RecipeLike = Recipe | Mapping[str, Any] | str | os.PathLike[str]


def recipe_folder(recipe: RecipeLike) -> Path | None:
    """The folder of a recipe given as a file: relative model paths in it are read from there."""
    if isinstance(recipe, (str, os.PathLike)) and Path(str(recipe)).is_file():
        return Path(str(recipe)).resolve().parent
    return None


def plan_merge(recipe: RecipeLike, options: MergeOptions | None = None, **fields: Any) -> MergePlan:
    """Validate a recipe and plan it without reading any tensor data.

    Arguments:
        recipe: as for :func:`merge` (one document: the stages of a multi-document recipe read
            earlier stages' outputs, so only ``merge(..., dry_run=True)`` lists them).
        options: a :class:`MergeOptions` (``seed``, ``dtype``, ``out_dtype`` and ``math_dtype`` shape the plan),
            or its fields as keyword arguments.

    Returns:
        A :class:`~mergeforge.engine.plan.MergePlan`; close it (``plan.close()``) when done.

    Example:
        >>> plan = plan_merge("ties.yml"); print(len(plan.jobs)); plan.close()
    """
    from mergeforge.engine.stages import read_stages

    options = MergeOptions.of(options, fields)
    if read_stages(recipe) is not None:
        raise RecipeError("plan_merge plans one recipe; plan a multi-document recipe with merge(recipe, dry_run=True)")
    return _plan(load_recipe(recipe), options, recipe_folder(recipe))


def _plan(recipe: Recipe, options: MergeOptions, relative_to: Path | None, folders: Mapping[str, Path] | None = None) -> MergePlan:
    return build_plan(recipe, relative_to=relative_to, seed=options.seed, dtype=options.dtype, out_dtype=options.out_dtype,
                      math_dtype=options.math_dtype, folders=folders)


def choose_executor(plan: MergePlan, options: MergeOptions) -> Executor:
    """The NumPy executor when it takes the plan (and ``options.executor`` allows), else torch."""
    from mergeforge.engine.numpy_executor import NumpyExecutor, refusal

    reason = refusal(plan, options) if options.executor != "torch" else "--executor torch"
    if reason is None:
        return NumpyExecutor(options)
    if options.executor == "numpy":
        raise MergeforgeError(f"--executor numpy: the NumPy executor cannot run this merge: {reason}; use --executor torch or auto")
    from mergeforge.engine.torch_executor import TorchExecutor

    return TorchExecutor(options, reason)


def merge(recipe: RecipeLike, out_dir: str | os.PathLike[str] | None = None, options: MergeOptions | None = None,
          **fields: Any) -> MergeResult:
    """Merge the models of ``recipe`` into a Hugging Face folder at ``out_dir``.

    Arguments:
        recipe: a mergekit-style YAML path or text, a dict, or a :class:`~mergeforge.engine.recipe.Recipe`.
            YAML with several ``---``-separated documents is a multi-stage recipe (mergekit-multi's
            format): named documents are merged first, in dependency order, and the unnamed one
            into ``out_dir`` (see :mod:`mergeforge.engine.stages`).
        out_dir: the output folder (created; must be empty unless ``overwrite``); not needed for
            a dry run.
        options: how to run it (:class:`MergeOptions`: device, dtypes, threads, seed, dry run, ...),
            or its fields as keyword arguments (``merge(r, out, seed=3)``).

    Returns:
        A :class:`MergeResult`: tensors, bytes, the executor that ran, the time taken and, for a
        dry run, the plan listing (for a multi-stage recipe: the final stage's, with the earlier
        stages' results in ``stages``).

    Example:
        >>> merge("recipe.yml", "merged/")
        >>> merge("recipe.yml", None, dry_run=True).plan_lines
    """
    from mergeforge.engine.stages import merge_stages, read_stages

    options = MergeOptions.of(options, fields)
    stages = read_stages(recipe)
    if stages is not None:
        return merge_stages(stages, out_dir, options, recipe_folder(recipe))
    if options.intermediate_dir is not None:
        raise RecipeError("--intermediate-dir keeps the stages of a multi-document recipe; this recipe has one document")
    return merge_recipe(load_recipe(recipe), out_dir, options, recipe_folder(recipe))


def merge_recipe(recipe: Recipe, out_dir: str | os.PathLike[str] | None, options: MergeOptions, relative_to: Path | None = None,
                 folders: Mapping[str, Path] | None = None) -> MergeResult:
    """:func:`merge` of one validated recipe whose relative model paths are read from
    ``relative_to``; ``folders`` maps references to model folders (earlier stages' outputs)."""
    started = time.perf_counter()
    plan = _plan(recipe, options, relative_to, folders)
    try:
        if options.out_format == "gguf":
            from mergeforge.engine.gguf_output import check_gguf_output

            check_gguf_output(plan, options)
        if any(isinstance(c, GGUFCheckpoint) for c in plan.checkpoints.values()):
            from mergeforge.engine.gguf_output import quantization_warnings

            plan.warnings.extend(quantization_warnings(plan))
        for message in plan.warnings:
            log.warning(message)
        executor = choose_executor(plan, options)
        peak = executor.estimate_peak(plan)
        result = MergeResult(
            out_dir=None if out_dir is None else Path(out_dir),
            method=plan.method.name,
            executor=executor.name,
            tensors=len(plan.jobs),
            bytes_read=plan.bytes_to_read,
            bytes_written=plan.bytes_to_write,
            estimated_peak_bytes=peak,
            warnings=list(plan.warnings),
        )
        if options.dry_run:
            result.plan_lines = describe(plan, executor.label, peak, options.shard_bytes)
            from mergeforge.engine.gguf_output import input_type_lines, out_type

            extra = input_type_lines(plan)
            if options.out_format == "gguf":
                extra.append(f"output: GGUF {out_type(plan, options)} (model.gguf)")
            result.plan_lines[2:2] = extra  # after "method:" and "models:"
            if plan.method.calibrate is not None:
                from mergeforge.engine.calibrate import calibration_summary

                result.plan_lines += calibration_summary(plan, relative_to)
            return result
        if out_dir is None:
            raise OutputError("an output folder is required unless dry_run is set")
        out_path = Path(out_dir)
        folder_files.check_output_location(out_path, plan.input_locations(), options.overwrite)
        if plan.method.calibrate is not None:
            # Data-aware methods: forward/backward passes on whole models, before the streaming merge.
            from mergeforge.engine.calibrate import run_calibration

            statistics = run_calibration(plan, device=options.device, progress=not options.quiet, relative_to=relative_to)
            write_merge(plan.with_statistics(statistics), out_path, executor, options)
        else:
            write_merge(plan, out_path, executor, options)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        plan.close()


# ---------------------------------------------------------------------------------------------
# In memory


class _MemoryCheckpoint(TensorIndex):
    """A state dict seen through the interface the planner and the torch executor read."""

    def __init__(self, state: Mapping[str, torch.Tensor], ref: str):
        self.ref = ref
        self.folder = self.location = Path(".")
        self.config: dict[str, Any] | None = None
        self.state = state
        self.tensors = {name: TensorInfo(name, tuple(t.shape), from_torch(t.dtype), Path(ref), -1) for name, t in state.items()}

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        tensor = self.state[name]
        return tensor[row_start:row_stop] if row_stop is not None else tensor


class _MemoryWriter:
    """Collects written tensors in a dict (the writer interface of the torch executor)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        # The executor runs with an unbounded block size here, so every write is whole.
        with self._lock:
            self.state[name] = tensor

    def mark_written(self, name: str) -> None:
        pass


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any] | None] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    out_dtype: str | None = None,
    math_dtype: str = "float32",
    device: str = "cpu",
    threads: int | None = None,
    calibration: Mapping[str, Any] | None = None,
    calibration_model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    side_outputs: dict[str, torch.Tensor] | None = None,
    calibration_cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with any registered method, without touching disk.

    Arguments:
        method: the ``merge_method``.
        models: the state dicts to merge (not the base).
        base: the base model's state dict, for methods that use one.
        parameters: the top-level recipe ``parameters`` (scalars, gradients, filter lists).
        model_parameters: ``model_parameters[i]`` are the ``parameters`` of ``models[i]``.
        seed, dtype, out_dtype, math_dtype, device, threads: as in :class:`MergeOptions`.
        calibration: for data-aware methods (fisher_merging, regmean, adamerging), the recipe's
            ``calibration:`` field; its ``data`` may be one path or a list with one path per model.
        calibration_model: for data-aware methods, a module of the models' architecture (e.g. a
            transformers model); each state dict is loaded into a copy of it.
        tokenizer: for data-aware methods, a tokenizer or its folder.
        side_outputs: a dict that receives the per-task side tensors of ``emr`` and ``tall_mask``,
            keyed ``<tensor>::<suffix>`` as in a merge's ``mergeforge_side/``.
        calibration_cache: for data-aware methods whose statistics do not depend on their
            parameters (fisher_merging, regmean), a dict that keeps the calibration's statistics:
            an empty one is filled, a filled one is used instead of calibrating again. Give each
            set of models and calibration data its own dict.

    Returns:
        The merged state dict, in the inputs' tensor order.

    Example:
        >>> merged = merge_state_dicts("ties", [sd_a, sd_b], base=sd_0,
        ...                            parameters={"density": 0.5}, model_parameters=[{"weight": 1}, {"weight": 1}])
    """
    if not models:
        raise RecipeError("merge_state_dicts: give at least one model")
    model_parameters = list(model_parameters or [None] * len(models))
    if len(model_parameters) != len(models):
        raise RecipeError(f"merge_state_dicts: {len(model_parameters)} model_parameters for {len(models)} models")
    checkpoints: dict[str, _MemoryCheckpoint] = {}
    if base is not None:
        checkpoints["base"] = _MemoryCheckpoint(base, "base")
    entries = []
    for index, (state, params) in enumerate(zip(models, model_parameters)):
        ref = f"model_{index}"
        checkpoints[ref] = _MemoryCheckpoint(state, ref)
        entries.append({"model": ref, **({"parameters": dict(params)} if params else {})})
    recipe_dict: dict[str, Any] = {"merge_method": method, "models": entries}
    if base is not None:
        recipe_dict["base_model"] = "base"
    if parameters:
        recipe_dict["parameters"] = dict(parameters)
    if calibration is not None:
        recipe_dict["calibration"] = _calibration_for_memory(calibration, len(models))
    options = MergeOptions(device=device, threads=threads or 1, seed=seed, dtype=dtype, out_dtype=out_dtype, math_dtype=math_dtype,
                           quiet=True)
    plan = build_plan(load_recipe(recipe_dict), checkpoints=checkpoints, seed=seed, dtype=dtype, out_dtype=out_dtype,
                      math_dtype=math_dtype)
    if plan.method.calibrate is not None:
        from mergeforge.calibration.context import state_dict_loader
        from mergeforge.engine.calibrate import run_calibration

        if calibration_model is None or tokenizer is None:
            raise RecipeError(f"merge_state_dicts: '{method}' is data-aware; pass calibration_model and tokenizer too")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if calibration_cache is not None and not plan.method.statistics_ignore_params:
            raise RecipeError(f"merge_state_dicts: '{method}''s calibration depends on its parameters; it takes no calibration_cache")
        if calibration_cache:
            statistics = calibration_cache
        else:
            states = {ref: checkpoint.state for ref, checkpoint in checkpoints.items()}
            statistics = run_calibration(plan, device=device, progress=False, loader=state_dict_loader(calibration_model, states),
                                         tokenizer=tokenizer)
            if calibration_cache is not None:
                calibration_cache.update(statistics)
        plan = plan.with_statistics(statistics)
    from mergeforge.engine.torch_executor import TorchExecutor

    writer, side_writer = _MemoryWriter(), _MemoryWriter()
    TorchExecutor(options, block_bytes=1 << 62).run(plan, writer, side_writer)
    if side_outputs is not None:
        side_outputs.update(side_writer.state)
    return {job.output.name: writer.state[job.output.name] for job in plan.jobs}


def _calibration_for_memory(calibration: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The ``calibration`` field for in-memory models, named ``model_0``, ``model_1``, ..."""
    result = dict(calibration)
    data = result.get("data")
    if isinstance(data, (list, tuple)):
        if len(data) != count:
            raise RecipeError(f"merge_state_dicts: calibration data has {len(data)} entries for {count} models")
        result["data"] = {f"model_{index}": str(path) for index, path in enumerate(data)}
    elif isinstance(data, os.PathLike):
        result["data"] = str(data)
    return result


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int = 0,
    **parameters: Any,
) -> torch.Tensor:
    """Merge single tensors with a registered method, in float32.

    Arguments:
        method: the ``merge_method``.
        tensors: the tensors to merge (not the base), of one shape.
        base: the base tensor, for methods that use one.
        seed: the seed of a random method's generator.
        parameters: the method's parameters by name; a per-model one is a scalar (the same for
            every tensor) or a list with one value per tensor.

    Returns:
        The merged tensor in float32 (a method with side outputs returns ``(tensor, side)``).

    Example:
        >>> merge_tensors("slerp", [b], base=a, t=0.3)
    """
    import torch

    spec = get_method(method)
    resolved: dict[str, Any] = {}
    for param in spec.params:
        value = parameters.pop(param.name, parameters.pop(param.arg, None))
        if param.per_model:
            values = value if isinstance(value, (list, tuple)) else [value] * len(tensors)
            if len(values) != len(tensors):
                raise RecipeError(f"{method}: '{param.name}' has {len(values)} values for {len(tensors)} tensors")
            resolved[param.name] = [param.resolve(v, f"{method} model {i}") for i, v in enumerate(values)]
        else:
            resolved[param.name] = param.resolve(value, method)
    if parameters:
        raise RecipeError(f"{method}: unknown parameter(s) {', '.join(sorted(parameters))}")
    if spec.base == BaseUse.REQUIRED and base is None:
        raise RecipeError(f"{method} needs a base tensor")
    spec.check_model_count(len(tensors), "merge_tensors")
    generator = torch.Generator().manual_seed(seed) if spec.random else None
    work = [t.to(torch.float32) for t in tensors]
    base_work = base.to(torch.float32) if base is not None and spec.base != BaseUse.NONE else None
    return spec.run(work, base_work, resolved, generator)
