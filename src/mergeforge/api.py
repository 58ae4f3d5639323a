"""The Python API: merge on disk (:func:`merge`), plan only (:func:`plan_merge`), or merge in memory
(:func:`merge_state_dicts`, :func:`merge_tensors`) for search loops and notebooks.

Every path goes through the same recipe validation, planner and engine, so a recipe means the
same thing whichever way it is run.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeforge.checkpoint import folder as folder_files
from mergeforge.checkpoint.reader import TensorInfo
from mergeforge.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardedWriter, output_error
from mergeforge.engine import (
    Engine,
    EngineOptions,
    ProgressReporter,
    estimate_peak_memory,
    side_outputs,
)
from mergeforge.errors import MergeforgeError, OutputError, RecipeError
from mergeforge.methods.registry import get_method
from mergeforge.plan import MergePlan, build_plan
from mergeforge.plan_rules import layer_index, parse_size
from mergeforge.recipe import Recipe, load_recipe

log = logging.getLogger("mergeforge")

SIDE_FOLDER = "mergeforge_side"
# The interpreter, torch and the plan, measured on top of the tensors the engine holds.
PROCESS_BASELINE_BYTES = 350 * 1024**2


@dataclass
class MergeResult:
    """What a merge did (or, for a dry run, would do)."""

    out_dir: Path | None
    method: str
    tensors: int
    bytes_read: int
    bytes_written: int
    estimated_peak_bytes: int
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    plan_lines: list[str] = field(default_factory=list)


def _relative_to(recipe_arg: Any) -> Path | None:
    if isinstance(recipe_arg, (str, os.PathLike)) and Path(str(recipe_arg)).is_file():
        return Path(str(recipe_arg)).resolve().parent
    return None


def _describe(plan: MergePlan, peak: int, shard_bytes: int) -> list[str]:
    from mergeforge.checkpoint.writer import split_into_shards

    lines = [f"method: {plan.method.name}", f"models: {', '.join(plan.checkpoints)}"]
    for job in plan.jobs:
        sources = [s.model if s else "(base)" for s in job.inputs]
        how = job.method.name if job.method else "copy"
        base = f" base={job.base.model}" if job.base and job.method else ""
        lines.append(f"  {job.output.name} {list(job.output.shape)} {str(job.output.dtype).removeprefix('torch.')} <- {how}({', '.join(sources) or job.base.model}){base}")
    shards = split_into_shards([j.output for j in plan.jobs], shard_bytes)
    lines.append(f"tensors: {len(plan.jobs)}")
    lines.append(f"read: {_human(plan.bytes_to_read)}")
    lines.append(f"write: {_human(plan.bytes_to_write)} in {len(shards)} shard(s)")
    lines.append(f"estimated peak memory: {_human(peak)}")
    return lines


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return str(count)


def plan_merge(recipe: Recipe | Mapping[str, Any] | str | os.PathLike[str], **options: Any) -> MergePlan:
    """Validate a recipe and plan it without reading any tensor data. Close the plan when done."""
    parsed = load_recipe(recipe)
    return build_plan(parsed, relative_to=_relative_to(recipe), **options)


def merge(
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    out_dtype: str | None = None,
    out_shard_size: int | str = DEFAULT_SHARD_BYTES,
    threads: int | None = None,
    memory_budget: int | str | None = None,
    copy_tokenizer: bool = True,
    dry_run: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    quiet: bool = False,
) -> MergeResult:
    """Merge the models of ``recipe`` into a Hugging Face folder at ``out_dir``.

    Arguments:
        recipe: a mergekit-style YAML path or text, a dict, or a :class:`Recipe`.
        out_dir: the output folder (created; must be empty unless ``overwrite``).
        device: ``cpu`` or ``cuda`` (``cuda:N``): where the math runs.
        dtype: override the recipe's ``dtype`` (inputs are rounded to it before merging).
        out_dtype: override the recipe's ``out_dtype`` (dtype of the written tensors).
        out_shard_size: shard size limit in bytes (or ``"2GB"``).
        threads: worker threads (default: one per core, at most 4).
        memory_budget: bytes of tensors held at once (default: automatic).
        copy_tokenizer: copy the tokenizer files from the tokenizer source.
        dry_run: plan only; nothing is read or written.
        overwrite: replace a non-empty ``out_dir``.
        seed: seed of the random methods (DARE, DELLA): the same seed gives the same bytes.
        quiet: no progress bar.

    Returns:
        A :class:`MergeResult`.

    Example:
        >>> merge("recipe.yml", "merged/")
    """
    started = time.perf_counter()
    parsed = load_recipe(recipe)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeforgeError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    shard_bytes = parse_size(out_shard_size)
    options = EngineOptions(
        device=device,
        threads=threads,
        memory_budget=parse_size(memory_budget) if memory_budget is not None else None,
        progress=not quiet,
    )
    if threads is not None and threads < 1:
        raise MergeforgeError("--threads must be at least 1")
    plan = build_plan(parsed, relative_to=_relative_to(recipe), seed=seed, dtype=dtype, out_dtype=out_dtype)
    try:
        for message in plan.warnings:
            log.warning(message)
        peak = PROCESS_BASELINE_BYTES + estimate_peak_memory(plan, options)
        result = MergeResult(
            out_dir=None if out_dir is None else Path(out_dir),
            method=plan.method.name,
            tensors=len(plan.jobs),
            bytes_read=plan.bytes_to_read,
            bytes_written=plan.bytes_to_write,
            estimated_peak_bytes=peak,
            warnings=list(plan.warnings),
        )
        if dry_run:
            result.plan_lines = _describe(plan, peak, shard_bytes)
            if plan.method.calibrate is not None:
                from mergeforge.calibration.context import calibration_summary

                result.plan_lines += calibration_summary(plan, _relative_to(recipe))
            return result
        if out_dir is None:
            raise OutputError("an output folder is required unless dry_run is set")
        out_path = Path(out_dir)
        folder_files.check_output_location(out_path, [c.folder for c in plan.checkpoints.values()], overwrite)
        if plan.method.calibrate is not None:
            # Data-aware methods: forward/backward passes on whole models, before the streaming merge.
            from mergeforge.calibration.context import run_calibration

            run_calibration(plan, device=device, progress=not quiet, relative_to=_relative_to(recipe))
        _write(plan, out_path, options, shard_bytes, copy_tokenizer)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        plan.close()


def _write(plan: MergePlan, out_path: Path, options: EngineOptions, shard_bytes: int, copy_tokenizer: bool) -> None:
    parent = out_path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if plan.bytes_to_write > free:
        raise OutputError(f"{parent}: disk full: the merge writes {_human(plan.bytes_to_write)} but only {_human(free)} are free")
    try:
        with folder_files.atomic_output_folder(out_path) as temp:
            _write_into(plan, temp, options, shard_bytes, copy_tokenizer)
    except OSError as exc:
        raise output_error(exc, Path(exc.filename) if exc.filename else out_path) from None


def _write_into(plan: MergePlan, temp: Path, options: EngineOptions, shard_bytes: int, copy_tokenizer: bool) -> None:
    recipe = plan.recipe
    reference = plan.checkpoints[plan.reference]
    writer = ShardedWriter(temp, [job.output for job in plan.jobs], shard_bytes)
    side_writer = None
    side = side_outputs(plan)
    if side:
        (temp / SIDE_FOLDER).mkdir()
        side_writer = ShardedWriter(temp / SIDE_FOLDER, side, shard_bytes, stem="side", index_name="side.safetensors.index.json")
    progress = ProgressReporter(plan.bytes_to_write, len(plan.jobs), options.progress)
    try:
        Engine(plan, writer, options, side_writer).run(on_done=progress)
    finally:
        progress.close()
        writer.close()
        if side_writer is not None:
            side_writer.close()
    tokenizer_from = None
    if copy_tokenizer:
        source = recipe.tokenizer_source
        tokenizer_from = reference.folder if source in (None, "base") else plan.checkpoints[source].folder
    folder_files.carry_over_files(reference.folder, temp, tokenizer_from)
    floating = [job.output.dtype for job in plan.jobs if job.output.dtype.is_floating_point]
    out_dtype = max(set(floating), key=floating.count) if floating else None
    layer_sources = None
    if plan.output_layers is not None:
        layer_sources = [int(layer.name) for layer in plan.output_layers]
    folder_files.write_config(reference.config, temp, out_dtype, layer_sources)
    if recipe.chat_template:
        folder_files.apply_chat_template(recipe.chat_template, temp, [c.folder for c in plan.checkpoints.values()])
    recipe_yaml = recipe.to_yaml()
    (temp / "mergeforge_config.yml").write_text(recipe_yaml, encoding="utf-8")
    folder_files.write_model_card(temp, list(plan.checkpoints), plan.method.name, recipe_yaml)


# ---------------------------------------------------------------------------------------------
# In memory


class _MemoryCheckpoint:
    """A state dict seen through the checkpoint interface the planner and engine use."""

    def __init__(self, state: Mapping[str, torch.Tensor], ref: str):
        self.ref = ref
        self.folder = Path(".")
        self.config = None
        self._state = state
        self.tensors = {
            name: TensorInfo(name, tuple(t.shape), t.dtype, Path(ref), -1) for name, t in state.items()
        }

    def names(self) -> list[str]:
        return list(self._state)

    def has(self, name: str) -> bool:
        return name in self._state

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        tensor = self._state[name]
        return tensor[row_start:row_stop] if row_stop is not None else tensor

    def close(self) -> None:
        pass


class _MemoryWriter:
    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        # merge_state_dicts never splits a tensor into row blocks, so every write is whole.
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
    device: str = "cpu",
    threads: int | None = None,
    calibration: Mapping[str, Any] | None = None,
    calibration_model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    side_outputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with any registered method, without touching disk.

    Methods with per-task side outputs (``emr``, ``tall_mask``) put them into ``side_outputs``
    when a dict is given, keyed ``<tensor>::<suffix>`` as in a merge's ``mergeforge_side/``.

    Parameter values follow recipe rules (scalars, gradients, filter lists); ``parameters`` are the
    top-level ones, ``model_parameters[i]`` those of ``models[i]``.

    Data-aware methods (fisher_merging, regmean, adamerging) also need ``calibration`` (the
    recipe's ``calibration:`` field; its ``data`` may be one path or a list with one path per
    model), ``calibration_model`` (a module of the models' architecture, e.g. a transformers
    model; each state dict is loaded into a copy of it) and ``tokenizer`` (a tokenizer or its folder).

    Example:
        >>> merged = merge_state_dicts("ties", [sd_a, sd_b], base=sd_0,
        ...                            parameters={"density": 0.5}, model_parameters=[{"weight": 1}, {"weight": 1}])
    """
    if not models:
        raise RecipeError("merge_state_dicts: give at least one model")
    model_parameters = list(model_parameters or [None] * len(models))
    if len(model_parameters) != len(models):
        raise RecipeError(f"merge_state_dicts: {len(model_parameters)} model_parameters for {len(models)} models")
    checkpoints: dict[str, Any] = {}
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
    plan = build_plan(load_recipe(recipe_dict), checkpoints=checkpoints, seed=seed, dtype=dtype, out_dtype=out_dtype)
    if plan.method.calibrate is not None:
        from mergeforge.calibration.context import run_calibration, state_dict_loader

        if calibration_model is None or tokenizer is None:
            raise RecipeError(f"merge_state_dicts: '{method}' is data-aware; pass calibration_model and tokenizer too")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        states = {ref: checkpoint._state for ref, checkpoint in checkpoints.items()}
        run_calibration(plan, device=device, progress=False, loader=state_dict_loader(calibration_model, states), tokenizer=tokenizer)
    writer, side_writer = _MemoryWriter(), _MemoryWriter()
    options = EngineOptions(device=device, threads=threads or 1, progress=False, block_bytes=1 << 62)
    Engine(plan, writer, options, side_writer).run()  # type: ignore[arg-type]
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
    """Merge single tensors with a registered method. Per-model parameters may be scalars (the same
    for every model) or lists (one per tensor). Computes in float32 and returns float32.

    Example:
        >>> merge_tensors("slerp", [b], base=a, t=0.3)
    """
    merge_method = get_method(method)
    resolved: dict[str, Any] = {}
    for param in merge_method.params:
        value = parameters.pop(param.name, parameters.pop(param.arg, None))
        if param.per_model:
            values = value if isinstance(value, (list, tuple)) else [value] * len(tensors)
            if len(values) != len(tensors):
                raise RecipeError(f"{method}: '{param.name}' has {len(values)} values for {len(tensors)} tensors")
            resolved[param.name] = [
                param.check(v, f"{method} model {i}") if v is not None else _default(param, method) for i, v in enumerate(values)
            ]
        else:
            resolved[param.name] = param.check(value, method) if value is not None else _default(param, method)
    if parameters:
        raise RecipeError(f"{method}: unknown parameter(s) {', '.join(sorted(parameters))}")
    if merge_method.base.value == "required" and base is None:
        raise RecipeError(f"{method} needs a base tensor")
    generator = torch.Generator().manual_seed(seed) if merge_method.random else None
    work = [t.to(torch.float32) for t in tensors]
    base_work = base.to(torch.float32) if base is not None else None
    result = merge_method.run(work, base_work if merge_method.base.value != "none" else None, resolved, generator)
    return result


def _default(param: Any, method: str) -> Any:
    if param.required:
        raise RecipeError(f"{method}: parameter '{param.name}' is required")
    return param.default


__all__ = ["MergeResult", "merge", "merge_state_dicts", "merge_tensors", "plan_merge", "parse_size", "layer_index"]
