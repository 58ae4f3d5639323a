"""The NumPy executor: runs the plans its kernels cover without importing torch.

It takes a plan (see :func:`refusal`) when the merge runs on the CPU, every input tensor lies in a
safetensors file, the compute dtype is float32 (inputs BF16, F16 or F32, and no rounding to another
dtype first), every merged tensor's method has a NumPy kernel, and no calibration is needed. Those
are the common recipes (linear, slerp, task arithmetic, TIES, DARE, Breadcrumbs); the torch
executor takes the rest, and both write the same bytes.

Each worker streams one tensor at a time in blocks of :data:`~mergeforge.methods.kernels.BLOCK`
elements: read each input's block with ``pread`` (bf16 stays 2 bytes until it is widened in cache),
compute, round to the output dtype, and ``pwrite`` it to the tensor's fixed place in its shard.
``pread``, ``pwrite`` and NumPy's loops release the GIL, so the workers' reading, computing and
writing overlap and use every core. Jobs start largest first, so no core idles behind one big
tensor at the end. Peak memory is a few blocks per worker, plus what the kernel holds per tensor
(for a magnitude top-k, one float32 copy of the tensor's magnitudes while its threshold is found).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mergeforge.checkpoint.adapted import AdaptedCheckpoint
from mergeforge.checkpoint.reader import Checkpoint
from mergeforge.dtypes import ITEMSIZE, TORCH_NAMES, from_f32, to_f32
from mergeforge.engine.jobs import SourceTensor, TensorJob
from mergeforge.engine.options import MergeOptions
from mergeforge.engine.plan import MergePlan
from mergeforge.methods.kernels import Blocks
from mergeforge.tokenizer.view import VocabularyView

# Resident memory of the process before any tensor work: the interpreter with NumPy, pydantic,
# PyYAML and click (measured: 46 MB on Linux x86-64, Python 3.11, NumPy 2.4), plus allocator slack.
PROCESS_BASELINE_BYTES = 50 * 1024**2
COMPUTABLE = frozenset({"BF16", "F16", "F32"})  # input dtypes the kernels widen to float32 exactly


def refusal(plan: MergePlan, options: MergeOptions) -> str | None:
    """Why this executor cannot run ``plan`` (``None`` when it can)."""
    method = plan.method
    if options.device != "cpu":
        return f"--device {options.device}"
    if method.calibrate is not None:
        return f"'{method.name}' is data-aware"
    if method.kernel is None:
        return f"'{method.name}' has no NumPy kernel"
    if plan.compute_dtype != "F32":
        return f"computes in {TORCH_NAMES[plan.compute_dtype]}"
    adapted = next((ref for ref, source in plan.checkpoints.items() if isinstance(source, AdaptedCheckpoint)), None)
    if adapted is not None:
        return f"model '{adapted}' has a LoRA applied while it is read"
    for job in plan.jobs:
        infos = [(s, plan.checkpoints[s.model].info(s.name)) for s in [*job.inputs, job.base] if s is not None]
        for source, info in infos:
            if not info.in_safetensors:
                kind = "a GGUF file" if info.file.suffix == ".gguf" else "not in safetensors files"
                return f"model '{source.model}' is {kind}"
        if job.method is None:
            continue
        dtypes = {info.dtype for _, info in infos}
        if not dtypes <= COMPUTABLE:
            return f"tensor '{job.output.name}' is {sorted(dtypes - COMPUTABLE)[0]}"
        if plan.cast_dtype not in (None, "F32") and dtypes != {plan.cast_dtype}:
            return f"dtype {plan.cast_dtype} rounds the inputs first"
    return None


class _TensorBlocks:
    """An input tensor read block by block from its file (a :class:`~mergeforge.methods.kernels.Source`)."""

    def __init__(self, plan: MergePlan, source: SourceTensor):
        self.checkpoint = _file_checkpoint(plan, source)
        self.name = source.name
        info = self.checkpoint.info(source.name)
        self.dtype, self.size = info.dtype, info.numel

    def block(self, start: int, stop: int) -> np.ndarray:
        raw = self.checkpoint.read_array(self.name, start, stop)
        return raw if self.dtype == "F32" else to_f32(raw, self.dtype)


class NumpyExecutor:
    """Executes a plan :func:`refusal` accepts, with the methods' NumPy kernels."""

    name = "numpy"
    label = "numpy"

    def __init__(self, options: MergeOptions):
        self.threads = options.worker_threads

    def estimate_peak(self, plan: MergePlan) -> int:
        """The baseline plus the largest jobs running at once (jobs start largest first, so the
        first ``threads`` are the ones that overlap)."""
        peaks = sorted((_job_peak(job) for job in plan.jobs), reverse=True)
        return PROCESS_BASELINE_BYTES + sum(peaks[: self.threads])

    def run(self, plan: MergePlan, writer: Any, side_writer: Any, on_done: Callable[[TensorJob], None] | None = None) -> None:
        ordered = sorted(plan.jobs, key=lambda job: job.output.nbytes, reverse=True)
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="mergeforge-numpy") as pool:
            futures = [pool.submit(_run_job, plan, job, writer) for job in ordered]
            try:
                for future, job in zip(futures, ordered):
                    future.result()
                    if on_done is not None:
                        on_done(job)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def _file_checkpoint(plan: MergePlan, source: SourceTensor) -> Checkpoint | VocabularyView:
    """The model folder ``source`` is read from, or its view in a merged vocabulary (which reads
    the folder; :func:`refusal` admits no other kind of input)."""
    checkpoint = plan.reader(source.model)
    assert isinstance(checkpoint, (Checkpoint, VocabularyView))
    return checkpoint


def _job_peak(job: TensorJob) -> int:
    if job.method is None:
        return job.output.nbytes
    assert job.method.kernel is not None
    return job.method.kernel.peak_bytes(job.numel, len(job.inputs))


def _blocks(plan: MergePlan, job: TensorJob) -> Blocks:
    method = job.method
    assert method is not None and method.kernel is not None
    base = _TensorBlocks(plan, job.base) if job.base is not None else None
    inputs = [_TensorBlocks(plan, s) if s is not None else base for s in job.inputs]
    kwargs = method.arguments(job.params)
    if method.random:
        kwargs["seed"] = job.seed
    return method.kernel.run(inputs, base, **kwargs)


def _run_job(plan: MergePlan, job: TensorJob, writer: Any) -> None:
    name = job.output.name
    if job.method is None:
        _copy(plan, job, writer)
        return
    itemsize = ITEMSIZE[job.output.dtype]
    for start, block in _blocks(plan, job):
        writer.write_bytes(name, from_f32(block, job.output.dtype).data, start * itemsize)
    writer.mark_written(name)


def _copy(plan: MergePlan, job: TensorJob, writer: Any) -> None:
    """A tensor that is not merged (integer or boolean): the base's, or the inputs' when all agree."""
    sources = [job.base] if job.base is not None else [s for s in job.inputs if s is not None]
    data = [_file_checkpoint(plan, s).read_array(s.name, 0, job.numel).tobytes() for s in sources]
    for source, other in zip(sources[1:], data[1:]):
        if other != data[0]:
            raise job.copies_differ(sources[0], source)
    writer.write_bytes(job.output.name, data[0], complete=True)

