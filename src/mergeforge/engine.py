"""Runs a plan: reads each job's inputs, calls its method, writes the result, with bounded memory.

Jobs run on a small thread pool. ``pread``, ``pwrite`` and torch kernels release the GIL, so one
job's reading overlaps another's computing and writing, and both cores stay busy without processes.
A byte budget admits jobs: a job starts only when its estimated working set fits next to those in
flight (a job larger than the budget runs alone). Jobs of element-wise methods whose working set
would exceed the block size are processed in blocks of rows, so peak memory does not grow with the
largest tensor (embeddings, output heads). The engine knows nothing of any method's math.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from mergeforge.checkpoint.writer import OutputTensor, ShardedWriter
from mergeforge.errors import MergeforgeError, MethodError
from mergeforge.plan import MergePlan, SourceTensor, TensorJob
from mergeforge.progress import ProgressReporter

SIDE_SEPARATOR = "::"
# Temporaries a method makes beyond its inputs and output, in units of one compute-dtype tensor.
METHOD_OVERHEAD = 3


@dataclass
class EngineOptions:
    device: str = "cpu"
    threads: int | None = None  # worker threads; None: one per core, at most 4
    memory_budget: int | None = None  # bytes of tensors in flight; None: automatic
    block_bytes: int = 256 * 1024**2  # element-wise jobs larger than this run in row blocks
    progress: bool = True


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def job_memory(job: TensorJob, compute_itemsize: int, rows: int | None = None) -> int:
    """Estimated peak bytes of one job (or one block of ``rows`` rows of it)."""
    numel = job.numel
    if rows is not None and job.output.shape:
        numel = numel // job.output.shape[0] * rows
    stored = sum(dtype.itemsize for dtype in job.input_dtypes) + (job.output.dtype.itemsize if job.base else 0)
    tensors_in_compute = len(job.inputs) + (1 if job.base else 0)
    return numel * (stored + (tensors_in_compute + METHOD_OVERHEAD) * compute_itemsize + job.output.dtype.itemsize)


def block_rows(job: TensorJob, compute_itemsize: int, block_bytes: int) -> int | None:
    """Rows per block for a job that should run in blocks, else ``None``."""
    if job.method is None or not job.method.elementwise or len(job.output.shape) < 1:
        return None
    rows_total = job.output.shape[0]
    if rows_total < 2 or job_memory(job, compute_itemsize) <= block_bytes:
        return None
    per_row = max(1, job_memory(job, compute_itemsize, rows=1))
    return max(1, min(rows_total, block_bytes // per_row))


class Engine:
    """Executes one :class:`MergePlan` into a :class:`ShardedWriter`."""

    def __init__(self, plan: MergePlan, writer: ShardedWriter, options: EngineOptions, side_writer: ShardedWriter | None = None):
        self.plan = plan
        self.writer = writer
        self.side_writer = side_writer
        self.options = options
        self.device = torch.device(options.device)
        self.compute_dtype = plan.compute_dtype
        self.compute_itemsize = torch.empty((), dtype=plan.compute_dtype).element_size()

    # -- one job ------------------------------------------------------------------------------

    def _load(self, source: SourceTensor, rows: tuple[int, int] | None) -> torch.Tensor:
        checkpoint = self.plan.checkpoints[source.model]
        tensor = checkpoint.read(source.name, *rows) if rows else checkpoint.read(source.name)
        if self.plan.cast_dtype is not None and tensor.dtype.is_floating_point:
            tensor = tensor.to(self.plan.cast_dtype)
        return tensor.to(device=self.device, dtype=self.compute_dtype, non_blocking=True)

    def _copy(self, job: TensorJob) -> None:
        name = job.output.name
        if job.base is not None:
            self.writer.write(name, self.plan.checkpoints[job.base.model].read(job.base.name))
            return
        sources = [s for s in job.inputs if s is not None]
        first = self.plan.checkpoints[sources[0].model].read(sources[0].name)
        for source in sources[1:]:
            other = self.plan.checkpoints[source.model].read(source.name)
            if not torch.equal(first, other):
                raise MethodError(
                    f"tensor '{name}' ({first.dtype}, not mergeable) differs between models '{sources[0].model}' and "
                    f"'{source.model}'; give a base_model to copy it from"
                )
        self.writer.write(name, first)

    def _merge(self, job: TensorJob, rows: tuple[int, int] | None) -> None:
        assert job.method is not None
        base = self._load(job.base, rows) if job.base is not None else None
        tensors = [self._load(s, rows) if s is not None else base for s in job.inputs]
        generator = None
        if job.method.random:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(job.seed + (rows[0] if rows else 0))
        result = job.method.run(tensors, base, job.params, generator)
        del tensors, base
        extras: dict[str, torch.Tensor] = {}
        if isinstance(result, tuple):
            result, extras = result
        expected = job.output.shape if rows is None else (rows[1] - rows[0], *job.output.shape[1:])
        if tuple(result.shape) != tuple(expected):
            raise MethodError(
                f"merge_method '{job.method.name}' returned shape {list(result.shape)} for tensor '{job.output.name}', expected {list(expected)}"
            )
        self.writer.write(job.output.name, result.to(job.output.dtype).cpu(), row_start=rows[0] if rows else 0)
        if extras:
            assert self.side_writer is not None
            for suffix, side in extras.items():
                self.side_writer.write(f"{job.output.name}{SIDE_SEPARATOR}{suffix}", side.cpu())

    def run_job(self, job: TensorJob, rows_per_block: int | None) -> None:
        if job.method is None:
            self._copy(job)
            return
        if rows_per_block is None:
            self._merge(job, None)
            return
        total = job.output.shape[0]
        for start in range(0, total, rows_per_block):
            self._merge(job, (start, min(total, start + rows_per_block)))
        self.writer.mark_written(job.output.name)

    # -- all jobs -----------------------------------------------------------------------------

    def run(self, on_done: Callable[[TensorJob], None] | None = None) -> None:
        """Run every job; raises the first error after cancelling the rest."""
        threads = self.options.threads or default_threads()
        budget = self.options.memory_budget or max(self.options.block_bytes * threads, 512 * 1024**2)
        intra_op = max(1, (os.cpu_count() or 1) // threads)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(intra_op)
        in_flight: dict[Future[None], int] = {}
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergeforge") as pool:
                used = 0
                for job in self.plan.jobs:
                    rows = block_rows(job, self.compute_itemsize, self.options.block_bytes)
                    cost = job_memory(job, self.compute_itemsize, rows)
                    while in_flight and (used + cost > budget or len(in_flight) >= threads * 2):
                        used -= self._reap(in_flight, on_done, block=True)
                    future = pool.submit(self.run_job, job, rows)
                    future.job = job  # type: ignore[attr-defined]
                    in_flight[future] = cost
                    used += cost
                    used -= self._reap(in_flight, on_done, block=False)
                while in_flight:
                    self._reap(in_flight, on_done, block=True)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
        finally:
            torch.set_num_threads(previous_threads)

    @staticmethod
    def _reap(in_flight: dict[Future[None], int], on_done: Callable[[TensorJob], None] | None, block: bool) -> int:
        if not in_flight:
            return 0
        if block:
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
        else:
            done = {f for f in in_flight if f.done()}
        freed = 0
        for future in done:
            freed += in_flight.pop(future)
            error = future.exception()
            if error is not None:
                raise error
            if on_done is not None:
                on_done(future.job)  # type: ignore[attr-defined]
        return freed


def side_outputs(plan: MergePlan) -> list[OutputTensor]:
    """The side tensors a method with ``extra_outputs`` will produce (e.g. EMR's masks)."""
    method = plan.method
    if method.extra_outputs is None:
        return []
    result = []
    for job in plan.jobs:
        if job.method is None:
            continue
        for suffix, (shape, dtype) in method.extra_outputs(job.output.shape, len(job.inputs)).items():
            result.append(OutputTensor(f"{job.output.name}{SIDE_SEPARATOR}{suffix}", tuple(shape), dtype))
    return result


def estimate_peak_memory(plan: MergePlan, options: EngineOptions) -> int:
    """Bytes of tensors the engine holds at most, for ``--dry-run`` (excludes the interpreter)."""
    itemsize = torch.empty((), dtype=plan.compute_dtype).element_size()
    threads = options.threads or default_threads()
    costs = sorted(
        (job_memory(job, itemsize, block_rows(job, itemsize, options.block_bytes)) for job in plan.jobs), reverse=True
    )
    budget = options.memory_budget or max(options.block_bytes * threads, 512 * 1024**2)
    peak = sum(costs[:threads])
    return max(costs[0] if costs else 0, min(peak, budget))


__all__ = ["Engine", "EngineOptions", "estimate_peak_memory", "side_outputs", "ProgressReporter", "MergeforgeError"]
