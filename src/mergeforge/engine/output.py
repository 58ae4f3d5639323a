"""What a merge writes besides running its plan, for both executors: the result and the dry-run
listing, the disk check, the atomic output folder and everything in it besides the weights
(config, tokenizer, carried-over files, chat template, recipe, model card). Torch-free."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mergeforge.checkpoint import folder as folder_files
from mergeforge.checkpoint.writer import ShardedWriter, output_error, split_into_shards
from mergeforge.dtypes import TORCH_NAMES, is_floating
from mergeforge.engine.jobs import TensorJob
from mergeforge.engine.options import MergeOptions
from mergeforge.engine.plan import MergePlan
from mergeforge.engine.progress import ProgressReporter
from mergeforge.errors import OutputError
from mergeforge.tokenizer.chat_templates import apply_chat_template

SIDE_FOLDER = "mergeforge_side"  # per-task side tensors (EMR, TALL masks), beside the weights
RECIPE_FILE = "mergeforge_config.yml"


class Executor(Protocol):
    """Runs every job of a plan into a writer (see :mod:`mergeforge.engine.numpy_executor` and
    :mod:`mergeforge.engine.torch_executor`)."""

    @property
    def name(self) -> str:
        """ "numpy" or "torch"."""
        ...

    @property
    def label(self) -> str:
        """The name and, when torch runs a plan, why NumPy does not (for --dry-run)."""
        ...

    def estimate_peak(self, plan: MergePlan) -> int:
        """Peak resident bytes of the whole process while it runs ``plan``."""
        ...

    def run(self, plan: MergePlan, writer: ShardedWriter, side_writer: ShardedWriter | None,
            on_done: Callable[[TensorJob], None]) -> None: ...


@dataclass
class MergeResult:
    """What a merge did (or, for a dry run, would do)."""

    out_dir: Path | None
    method: str
    executor: str  # "numpy" or "torch"
    tensors: int
    bytes_read: int
    bytes_written: int
    estimated_peak_bytes: int
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    plan_lines: list[str] = field(default_factory=list)  # the dry-run listing
    stages: list[MergeResult] = field(default_factory=list)  # a multi-stage recipe's earlier stages, in order


def human_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return str(count)


def describe(plan: MergePlan, executor: str, peak: int, shard_bytes: int) -> list[str]:
    """The ``--dry-run`` listing: every output tensor and where it comes from, then the totals."""
    lines = [f"method: {plan.method.name}", f"models: {', '.join(plan.checkpoints)}"]
    if plan.vocabulary is not None:
        lines.append(plan.vocabulary.summary() + (f"; remapped: {', '.join(plan.views)}" if plan.views else ""))
    for job in plan.jobs:
        sources = [s.model if s else "(base)" for s in job.inputs]
        how = job.method.name if job.method else "copy"
        base = f" base={job.base.model}" if job.base and job.method else ""
        origin = ", ".join(sources) or (job.base.model if job.base else "")
        lines.append(f"  {job.output.name} {list(job.output.shape)} {TORCH_NAMES[job.output.dtype]} <- {how}({origin}){base}")
    shards = split_into_shards([j.output for j in plan.jobs], shard_bytes)
    lines.append(f"tensors: {len(plan.jobs)}")
    lines.append(f"read: {human_size(plan.bytes_to_read)}")
    lines.append(f"write: {human_size(plan.bytes_to_write)} in {len(shards)} shard(s)")
    lines.append(f"executor: {executor}")
    lines.append(f"estimated peak memory: {human_size(peak)}")
    return lines


def write_merge(plan: MergePlan, out_dir: Path, executor: Executor, options: MergeOptions) -> None:
    """Run ``plan`` into a complete model folder at ``out_dir``, which appears only when complete."""
    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    # A GGUF output is written from a safetensors merge in the same temporary folder: twice the bytes at most.
    needed = plan.bytes_to_write * (2 if options.out_format == "gguf" else 1)
    if needed > free:
        raise OutputError(f"{parent}: disk full: the merge writes {human_size(needed)} but only {human_size(free)} are free")

    def write_hf(folder: Path) -> None:
        _write_weights(plan, folder, executor, options)
        finish_folder(plan, folder, options.copy_tokenizer)

    try:
        with folder_files.atomic_output_folder(out_dir) as temp:
            if options.out_format == "gguf":
                from mergeforge.engine.gguf_output import write_gguf_folder

                write_gguf_folder(plan, temp, options, write_hf)
            else:
                write_hf(temp)
    except OSError as exc:
        raise output_error(exc, Path(exc.filename) if exc.filename else out_dir) from None


def _write_weights(plan: MergePlan, temp: Path, executor: Executor, options: MergeOptions) -> None:
    writers = [ShardedWriter(temp, [job.output for job in plan.jobs], options.shard_bytes)]
    side = plan.side_tensors()
    if side:
        (temp / SIDE_FOLDER).mkdir()
        writers.append(ShardedWriter(temp / SIDE_FOLDER, side, options.shard_bytes, stem="side",
                                     index_name="side.safetensors.index.json"))
    progress = ProgressReporter(plan.bytes_to_write, len(plan.jobs), not options.quiet)
    try:
        executor.run(plan, writers[0], writers[1] if side else None, progress)
    finally:
        progress.close()
        for writer in writers:
            writer.close()
    unwritten = [name for writer in writers for name in writer.missing()]
    if unwritten:
        raise RuntimeError(f"internal error: the {executor.name} executor never wrote tensor '{unwritten[0]}'")


def finish_folder(plan: MergePlan, temp: Path, copy_tokenizer: bool) -> None:
    """Everything in the output folder besides the weights."""
    recipe = plan.recipe
    reference = plan.checkpoints[plan.reference]
    vocabulary = plan.vocabulary
    # A merged vocabulary's tokenizer is always written: the weights' rows follow it (as mergekit).
    tokenizer_from = vocabulary.source_folder if vocabulary is not None else reference.folder if copy_tokenizer else None
    folder_files.carry_over_files(reference.folder, temp, tokenizer_from)
    if vocabulary is not None:
        vocabulary.write(temp)
    floating = Counter(job.output.dtype for job in plan.jobs if is_floating(job.output.dtype))
    out_dtype = floating.most_common(1)[0][0] if floating else None
    layer_sources = [int(layer.name) for layer in plan.output_layers] if plan.output_layers is not None else None
    folder_files.write_config(reference.config, temp, out_dtype, layer_sources,
                              vocab_size=vocabulary.rows if vocabulary is not None else None)
    if recipe.chat_template:
        apply_chat_template(recipe.chat_template, temp, [plan.checkpoints[m].folder for m in recipe.merged_models()])
    recipe_yaml = recipe.to_yaml()
    (temp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    folder_files.write_model_card(temp, list(plan.checkpoints), plan.method.name, recipe_yaml, title=recipe.name)
