"""Running a fast plan: read blocks with ``pread``, compute with the NumPy kernels, write blocks
with ``pwrite``, on a small thread pool, without importing torch.

Each worker streams one tensor at a time in blocks of :data:`~mergeforge.fastpath.kernels.BLOCK`
elements: read each input's block (bf16 stays 2 bytes until it is widened in cache), compute,
round to the output dtype, write to the tensor's fixed place in the output shard. ``pread``,
``pwrite`` and NumPy's loops release the GIL, so the workers' reading, computing and writing
overlap and use every core. Jobs start largest first, so no core idles behind one big tensor at
the end. Peak memory is a few blocks per worker, plus, for a magnitude top-k (TIES, Breadcrumbs),
one float32 copy of the tensor's magnitudes while its threshold is found.

The output folder is finished by the same functions as the full path's (config, model card,
recipe, carried-over files, atomic rename), so the two paths write byte-identical folders.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergeforge.checkpoint.safetensors_format import pread_into, read_json
from mergeforge.checkpoint.writer import (
    DEFAULT_SHARD_BYTES,
    OutputTensor,
    ShardedWriter,
    output_error,
)
from mergeforge.errors import OutputError, RecipeError
from mergeforge.fastpath import kernels
from mergeforge.fastpath.arrays import STORAGE, from_f32, to_f32
from mergeforge.fastpath.plan import FastJob, FastPlan, FastSource, NotEligible, build_fast_plan
from mergeforge.plan_rules import parse_size
from mergeforge.progress import ProgressReporter
from mergeforge.recipe import Recipe, load_recipe

# safetensors dtype name -> the name config.json uses (torch's, without "torch.").
CONFIG_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
TORCH_NAMES = {**CONFIG_DTYPES, "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64"}

# Resident memory of the process before any tensor work: the interpreter with NumPy, pydantic,
# PyYAML and click (measured: 46 MB on Linux x86-64, Python 3.11, NumPy 2.4), plus allocator slack.
BASELINE_BYTES = 50 * 1024**2
# float32 block-sized temporaries a worker holds at once beyond one per input, calibrated on the
# benchmark's measured peaks (docs/performance.md): linear keeps the sum and a term, slerp also a
# scaled copy, the task-vector family the base block, the sum for the sign election, the merged
# block and the divisor.
BLOCK_TEMPORARIES = {"linear": 2, "slerp": 3}
TASK_VECTOR_TEMPORARIES = 4


@dataclass
class FastResult:
    """What a fast merge did (the fields of :class:`mergeforge.api.MergeResult` the CLI prints)."""

    out_dir: Path | None
    method: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    estimated_peak_bytes: int = 0
    plan_lines: list[str] = field(default_factory=list)


class FileSource:
    """An input tensor read block by block from its file (see :class:`kernels.Source`)."""

    def __init__(self, source: FastSource):
        self.fd, self.path, self.dtype = source.fd, source.path, source.entry.dtype
        self.offset = source.entry.offset
        self.size = source.entry.numel
        self.storage = STORAGE[self.dtype]

    def block(self, start: int, stop: int) -> np.ndarray:
        raw = np.empty(stop - start, dtype=self.storage)
        pread_into(self.fd, memoryview(raw).cast("B"), self.offset + start * self.storage.itemsize, self.path)
        return raw if self.dtype == "F32" else to_f32(raw, self.dtype)


def blocks_of(job: FastJob, method: Any) -> kernels.Blocks:
    """The kernel call for one job."""
    params = job.params
    inputs = [FileSource(s) for s in job.inputs]
    if method.name == "linear":
        return kernels.linear(inputs, params["weight"], params["normalize"])
    assert job.base is not None
    base = FileSource(job.base)
    if method.name == "slerp":
        return kernels.slerp(params["t"], base, inputs[0])
    return kernels.task_vector_merge(
        inputs,
        base,
        weights=params["weight"],
        lambda_=params["lambda"],
        normalize=params["normalize"],
        rescale=params["rescale"],
        sparsify=method.sparsify,
        densities=params["density"],
        gammas=params.get("gamma"),
        consensus=method.consensus,
        seed=job.seed,
    )


def run_job(job: FastJob, method: Any, writer: ShardedWriter) -> FastJob:
    if job.copy:
        source = job.inputs[0]
        writer.write_bytes(job.name, os.pread(source.fd, source.entry.nbytes, source.entry.offset), complete=True)
        return job
    itemsize = STORAGE[job.out_dtype].itemsize
    for start, block in blocks_of(job, method):
        writer.write_bytes(job.name, from_f32(block, job.out_dtype).data, start * itemsize)
    writer.mark_written(job.name)
    return job


def execute(plan: FastPlan, temp: Path, shard_bytes: int, threads: int, progress_enabled: bool) -> None:
    writer = ShardedWriter(temp, [OutputTensor(j.name, j.shape, j.out_dtype) for j in plan.jobs], shard_bytes)
    progress = ProgressReporter(plan.bytes_to_write, len(plan.jobs), progress_enabled)
    try:
        ordered = sorted(plan.jobs, key=lambda j: j.nbytes, reverse=True)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergeforge-fast") as pool:
            futures = [pool.submit(run_job, job, plan.method, writer) for job in ordered]
            try:
                for future in futures:
                    progress(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        progress.close()
        writer.close()


def finish_folder(plan: FastPlan, temp: Path, copy_tokenizer: bool) -> None:
    """Everything besides the weights, by the full path's own functions."""
    from mergeforge.checkpoint import folder as folder_files

    recipe = plan.recipe
    reference = plan.folders[plan.reference]
    tokenizer_from = None
    if copy_tokenizer:
        source = recipe.tokenizer_source
        tokenizer_from = reference if source in (None, "base") else plan.folders[source]
    folder_files.carry_over_files(reference, temp, tokenizer_from)
    floating = [job.out_dtype for job in plan.jobs if job.out_dtype in CONFIG_DTYPES]
    out_dtype = CONFIG_DTYPES[max(set(floating), key=floating.count)] if floating else None
    folder_files.write_config(read_json(reference / "config.json"), temp, out_dtype, None)
    if recipe.chat_template:
        folder_files.apply_chat_template(recipe.chat_template, temp, list(plan.folders.values()))
    recipe_yaml = recipe.to_yaml()
    (temp / "mergeforge_config.yml").write_text(recipe_yaml, encoding="utf-8")
    folder_files.write_model_card(temp, list(plan.folders), plan.method.name, recipe_yaml)


def job_peak_bytes(job: FastJob, method: Any) -> int:
    """Bytes one worker holds while running ``job``."""
    if job.copy:
        return job.nbytes
    block = min(kernels.BLOCK, max(1, job.nbytes // STORAGE[job.out_dtype].itemsize))
    temporaries = BLOCK_TEMPORARIES.get(method.name, TASK_VECTOR_TEMPORARIES) + len(job.inputs)
    peak = block * 4 * temporaries
    numel = job.nbytes // STORAGE[job.out_dtype].itemsize
    cached = numel * 4 * (len(job.inputs) + 1)
    if method.sparsify is not None and cached <= kernels.CACHE_BYTES:
        peak += cached  # task vectors widened once and held (see kernels.CACHE_BYTES)
    if method.sparsify == "magnitude":
        peak += numel * 4  # the magnitudes whose k-th largest is the threshold
    elif method.sparsify == "outliers":
        peak += numel * 8  # two thresholds: two copies of the magnitudes
    elif method.sparsify == "bernoulli":
        peak += numel // 8 * len(job.inputs)  # DARE's masks, kept as bits between the two passes
    return peak


def estimate_peak_bytes(plan: FastPlan, workers: int) -> int:
    """Peak resident memory of a fast merge: the baseline plus the largest jobs running at once
    (jobs start largest first, so the first ``workers`` are the ones that overlap)."""
    peaks = sorted((job_peak_bytes(job, plan.method) for job in plan.jobs), reverse=True)
    return BASELINE_BYTES + sum(peaks[:workers])


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return str(count)


def describe(plan: FastPlan, peak: int, shard_bytes: int) -> list[str]:
    """The ``--dry-run`` listing, line for line as the full path prints it."""
    from mergeforge.checkpoint.writer import split_into_shards

    lines = [f"method: {plan.method.name}", f"models: {', '.join(plan.folders)}"]
    for job in plan.jobs:
        shape = list(job.shape)
        dtype = TORCH_NAMES[job.out_dtype]
        if job.copy:
            lines.append(f"  {job.name} {shape} {dtype} <- copy({', '.join(s.model for s in job.inputs)})")
            continue
        base = f" base={job.base.model}" if job.base else ""
        lines.append(f"  {job.name} {shape} {dtype} <- {plan.method.name}({', '.join(s.model for s in job.inputs)}){base}")
    shards = split_into_shards([OutputTensor(j.name, j.shape, j.out_dtype) for j in plan.jobs], shard_bytes)
    lines.append(f"tensors: {len(plan.jobs)}")
    lines.append(f"read: {_human(plan.bytes_to_read)}")
    lines.append(f"write: {_human(plan.bytes_to_write)} in {len(shards)} shard(s)")
    lines.append(f"estimated peak memory: {_human(peak)} (fast path: NumPy, no torch)")
    return lines


def try_fast_merge(
    recipe: Recipe | Any,
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
) -> FastResult | None:
    """Run the merge on the torch-free fast path when it is eligible (same arguments as
    :func:`mergeforge.merge`); ``None`` when it is not, and the caller runs the full path.

    The result is byte-identical to the full path's. Errors after the plan is accepted (disk
    full, an output location refused) are raised as the full path raises them.
    """
    started = time.perf_counter()
    if (out_dir is None and not dry_run) or device != "cpu" or (threads is not None and threads < 1):
        return None
    try:
        shard_bytes = parse_size(out_shard_size)
    except RecipeError:  # the full path reports it
        return None
    try:
        parsed = load_recipe(recipe)
        relative_to = Path(str(recipe)).resolve().parent if isinstance(recipe, (str, os.PathLike)) and Path(str(recipe)).is_file() else None
        plan = build_fast_plan(parsed, relative_to, dtype=dtype, out_dtype=out_dtype, seed=seed)
    except NotEligible:
        return None
    except Exception:
        return None  # the full path validates again and reports the problem its own way
    workers = threads or max(1, min(4, os.cpu_count() or 1))
    try:
        peak = estimate_peak_bytes(plan, workers)
        if dry_run:
            return FastResult(None, plan.method.name, len(plan.jobs), plan.bytes_to_read, plan.bytes_to_write, 0.0,
                              estimated_peak_bytes=peak, plan_lines=describe(plan, peak, shard_bytes))
        from mergeforge.checkpoint import folder as folder_files

        out_path = Path(out_dir)
        folder_files.check_output_location(out_path, list(plan.folders.values()), overwrite)
        parent = out_path.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(parent).free
        if plan.bytes_to_write > free:
            raise OutputError(f"{parent}: disk full: the merge writes {plan.bytes_to_write} bytes but only {free} are free")
        try:
            with folder_files.atomic_output_folder(out_path) as temp:
                execute(plan, temp, shard_bytes, workers, not quiet)
                finish_folder(plan, temp, copy_tokenizer)
        except OSError as exc:
            raise output_error(exc, Path(exc.filename) if exc.filename else out_path) from None
        return FastResult(out_path, plan.method.name, len(plan.jobs), plan.bytes_to_read, plan.bytes_to_write,
                          time.perf_counter() - started, estimated_peak_bytes=peak)
    finally:
        plan.close()
