"""The torch executor: runs any plan, on the CPU or a GPU, in float32 or float64, with bounded memory.

It reads each job's inputs as torch tensors, calls the job's method (:meth:`MethodSpec.run`, which
itself uses the method's NumPy kernel for CPU float32 tensors), and writes the result. Jobs run on
a small thread pool: ``pread``, ``pwrite`` and torch kernels release the GIL, so one job's reading
overlaps another's computing and writing, and both cores stay busy without processes. A byte
budget admits jobs: a job starts only when its estimated working set fits next to those in flight
(a job larger than the budget runs alone). Jobs of element-wise methods whose working set would
exceed the block size are processed in blocks of rows, so peak memory does not grow with the
largest tensor (embeddings, output heads). It knows nothing of any method's math.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from mergeforge.dtypes import ITEMSIZE, to_torch
from mergeforge.engine.jobs import SourceTensor, TensorJob
from mergeforge.engine.options import MergeOptions
from mergeforge.engine.plan import MergePlan
from mergeforge.errors import MergeforgeError, MethodError
from mergeforge.methods.registry import SIDE_SEPARATOR

# Temporaries a method makes beyond its inputs and output, in units of one compute-dtype tensor.
METHOD_OVERHEAD = 3
# Element-wise jobs whose working set is larger than this run in row blocks.
BLOCK_BYTES = 256 * 1024**2
# Resident memory of the process before any tensor work: the interpreter, torch and the plan.
PROCESS_BASELINE_BYTES = 350 * 1024**2


def job_memory(job: TensorJob, compute_itemsize: int, rows: int | None = None) -> int:
    """Estimated peak bytes of one job (or one block of ``rows`` rows of it)."""
    numel = job.numel
    if rows is not None and job.output.shape:
        numel = numel // job.output.shape[0] * rows
    output_itemsize = ITEMSIZE[job.output.dtype]
    stored = sum(ITEMSIZE[dtype] for dtype in job.input_dtypes) + (output_itemsize if job.base else 0)
    tensors_in_compute = len(job.inputs) + (1 if job.base else 0)
    return numel * (stored + (tensors_in_compute + METHOD_OVERHEAD) * compute_itemsize + output_itemsize)


def block_rows(job: TensorJob, compute_itemsize: int, block_bytes: int) -> int | None:
    """Rows per block for a job that should run in blocks, else ``None``."""
    if job.method is None or not job.method.elementwise or len(job.output.shape) < 1:
        return None
    rows_total = job.output.shape[0]
    if rows_total < 2 or job_memory(job, compute_itemsize) <= block_bytes:
        return None
    per_row = max(1, job_memory(job, compute_itemsize, rows=1))
    return max(1, min(rows_total, block_bytes // per_row))


class TorchExecutor:
    """Executes a :class:`MergePlan` with torch.

    Arguments:
        options: the merge's options (device, threads, memory budget).
        reason: why the NumPy executor did not take the plan (shown by ``--dry-run``).
        block_bytes: element-wise jobs larger than this run in row blocks.
    """

    name = "torch"

    def __init__(self, options: MergeOptions, reason: str | None = None, block_bytes: int = BLOCK_BYTES):
        self.options = options
        self.reason = reason
        self.block_bytes = block_bytes
        self.threads = options.worker_threads

    @property
    def label(self) -> str:
        return f"torch ({self.reason})" if self.reason else "torch"

    def budget(self) -> int:
        return self.options.budget_bytes or max(self.block_bytes * self.threads, 512 * 1024**2)

    def estimate_peak(self, plan: MergePlan) -> int:
        """Bytes the process holds at most: the baseline plus the jobs in flight, within the budget."""
        itemsize = ITEMSIZE[plan.compute_dtype]
        costs = sorted((job_memory(job, itemsize, block_rows(job, itemsize, self.block_bytes)) for job in plan.jobs),
                       reverse=True)
        in_flight = max(costs[0] if costs else 0, min(sum(costs[: self.threads]), self.budget()))
        return PROCESS_BASELINE_BYTES + in_flight

    def run(self, plan: MergePlan, writer: Any, side_writer: Any, on_done: Callable[[TensorJob], None] | None = None) -> None:
        """Run every job into ``writer`` (side tensors into ``side_writer``); raises the first
        error after cancelling the rest."""
        _Run(plan, writer, side_writer, self, _device(self.options.device)).run(on_done)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergeforgeError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeforgeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


class _Run:
    """One execution of a plan."""

    def __init__(self, plan: MergePlan, writer: Any, side_writer: Any, executor: TorchExecutor, device: torch.device):
        self.plan = plan
        self.writer = writer
        self.side_writer = side_writer
        self.executor = executor
        self.device = device
        self.compute_dtype = to_torch(plan.compute_dtype)
        self.compute_itemsize = ITEMSIZE[plan.compute_dtype]
        self.cast_dtype = to_torch(plan.cast_dtype) if plan.cast_dtype is not None else None

    # -- one job ------------------------------------------------------------------------------

    def _job_dtype(self, job: TensorJob) -> torch.dtype:
        """The plan's compute dtype, widened to float32 for a method that never computes in 16 bits."""
        if job.method is not None and job.method.float32_math and self.compute_itemsize < 4:
            return torch.float32
        return self.compute_dtype

    def _load(self, source: SourceTensor, rows: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
        checkpoint = self.plan.reader(source.model)
        tensor = checkpoint.read(source.name, *rows) if rows else checkpoint.read(source.name)
        if self.cast_dtype is not None and tensor.dtype.is_floating_point:
            tensor = tensor.to(self.cast_dtype)
        return tensor.to(device=self.device, dtype=dtype, non_blocking=True)

    def _copy(self, job: TensorJob) -> None:
        name = job.output.name
        if job.base is not None:
            self.writer.write(name, self.plan.reader(job.base.model).read(job.base.name))
            return
        sources = [s for s in job.inputs if s is not None]
        first = self.plan.reader(sources[0].model).read(sources[0].name)
        for source in sources[1:]:
            other = self.plan.reader(source.model).read(source.name)
            if not torch.equal(first, other):
                raise job.copies_differ(sources[0], source)
        self.writer.write(name, first)

    def _merge(self, job: TensorJob, rows: tuple[int, int] | None) -> None:
        assert job.method is not None
        dtype = self._job_dtype(job)
        base = self._load(job.base, rows, dtype) if job.base is not None else None
        tensors = []
        for source in job.inputs:
            if source is None:
                assert base is not None  # a model may lack a tensor only when the base has it (the planner checks)
                tensors.append(base)  # unchanged from the base; methods never modify their inputs
            else:
                tensors.append(self._load(source, rows, dtype))
        generator = None
        if job.method.random:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(job.seed + (rows[0] if rows else 0))
        try:
            result = job.method.run(tensors, base, job.params, generator)
        except NotImplementedError as exc:  # torch lacks a kernel for this dtype on this device
            name = str(dtype).removeprefix("torch.")
            raise MethodError(f"merge_method '{job.method.name}' cannot compute tensor '{job.output.name}' in {name} on "
                              f"{self.device.type} ({str(exc).splitlines()[0]}); use --math-dtype float32") from None
        del tensors, base
        extras: dict[str, torch.Tensor] = {}
        if isinstance(result, tuple):
            result, extras = result
        expected = job.output.shape if rows is None else (rows[1] - rows[0], *job.output.shape[1:])
        if tuple(result.shape) != tuple(expected):
            raise MethodError(
                f"merge_method '{job.method.name}' returned shape {list(result.shape)} for tensor '{job.output.name}', expected {list(expected)}"
            )
        self.writer.write(job.output.name, result.to(to_torch(job.output.dtype)).cpu(), row_start=rows[0] if rows else 0)
        if extras:
            assert self.side_writer is not None
            for suffix, side in extras.items():
                self.side_writer.write(f"{job.output.name}{SIDE_SEPARATOR}{suffix}", side.cpu())

    def _run_job(self, job: TensorJob, rows_per_block: int | None) -> None:
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

    def run(self, on_done: Callable[[TensorJob], None] | None) -> None:
        threads = self.executor.threads
        budget = self.executor.budget()
        block_bytes = self.executor.block_bytes
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // threads))
        in_flight: dict[Future[None], tuple[TensorJob, int]] = {}
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mergeforge") as pool:
                used = 0
                for job in self.plan.jobs:
                    rows = block_rows(job, self.compute_itemsize, block_bytes)
                    cost = job_memory(job, self.compute_itemsize, rows)
                    while in_flight and (used + cost > budget or len(in_flight) >= threads * 2):
                        used -= _reap(in_flight, on_done, block=True)
                    in_flight[pool.submit(self._run_job, job, rows)] = (job, cost)
                    used += cost
                    used -= _reap(in_flight, on_done, block=False)
                while in_flight:
                    _reap(in_flight, on_done, block=True)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
        finally:
            torch.set_num_threads(previous_threads)


def _reap(in_flight: dict[Future[None], tuple[TensorJob, int]], on_done: Callable[[TensorJob], None] | None, block: bool) -> int:
    """Collect finished jobs (waiting for one when ``block``); returns the bytes they free."""
    if not in_flight:
        return 0
    if block:
        done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
    else:
        done = {f for f in in_flight if f.done()}
    freed = 0
    for future in done:
        job, cost = in_flight.pop(future)
        freed += cost
        error = future.exception()
        if error is not None:
            raise error
        if on_done is not None:
            on_done(job)
    return freed

