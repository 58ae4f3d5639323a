"""The frame NumPy kernels are written in: flat inputs read block by block, results yielded block
by block. Torch-free.

A kernel (:class:`Kernel`) is a method's math in NumPy (see :mod:`mergeforge.methods.averaging` and
:mod:`mergeforge.methods._task_vector_kernels`)::

    run(tensors: list[Source], base: Source | None, *, <parameters>, seed=...) -> Blocks

It takes the same keyword arguments as the method's torch function (``seed`` instead of
``generator``) and yields ``(start, float32 block)`` over the flattened output, so a caller holds
one block of temporaries (:data:`BLOCK` elements) rather than several copies of a large tensor.
The NumPy executor feeds it blocks read straight from the input files; :func:`run_on_tensors`
feeds it CPU float32 torch tensors (zero-copy), which is how :meth:`MethodSpec.run` computes on
the CPU, so both executors give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mergeforge.dtypes import to_f32

if TYPE_CHECKING:
    import torch

BLOCK = 1 << 20  # elements per block: 4 MB of float32, a few times the L2 cache

Blocks = Iterator[tuple[int, np.ndarray]]


class Source(Protocol):
    """One input tensor, flattened: its element count, and float32 copies of ranges of it."""

    @property
    def size(self) -> int: ...

    def block(self, start: int, stop: int) -> np.ndarray:
        """Float32 values of ``[start, stop)``, in new memory the caller may modify."""
        ...


@dataclass(frozen=True)
class ArraySource:
    """A :class:`Source` over an array in memory (``array`` is ``NUMPY_STORAGE[dtype]``)."""

    array: np.ndarray
    dtype: str

    @property
    def size(self) -> int:
        return self.array.size

    def block(self, start: int, stop: int) -> np.ndarray:
        return to_f32(self.array[start:stop], self.dtype)


@dataclass(frozen=True)
class Kernel:
    """A method's NumPy implementation (``run``, called as in the module docstring), and the bytes
    one worker holds while it runs a tensor of ``numel`` elements from ``inputs`` input tensors
    (``peak_bytes(numel, inputs)``), for the NumPy executor's memory estimate."""

    run: Callable[..., Blocks]
    peak_bytes: Callable[[int, int], int]


def held_blocks(numel: int, count: int) -> int:
    """Bytes of ``count`` float32 blocks of a tensor of ``numel`` elements."""
    return min(BLOCK, max(1, numel)) * 4 * count


def ranges(size: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` of each block of a tensor of ``size`` elements."""
    for start in range(0, size, BLOCK):
        yield start, min(size, start + BLOCK)


def block_index(start: int) -> int:
    """Which block of :func:`ranges` begins at element ``start`` (DARE seeds its draws by it)."""
    return start // BLOCK


def collect(blocks: Blocks, size: int) -> np.ndarray:
    """All blocks of a kernel into one float32 array."""
    out = np.empty(size, dtype=np.float32)
    for start, block in blocks:
        out[start:start + block.size] = block
    return out


def kernel_accepts(tensors: Sequence[torch.Tensor]) -> bool:
    """True when a kernel can compute on these torch tensors: CPU float32, no autograd."""
    import torch

    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


def run_on_tensors(kernel: Kernel, tensors: Sequence[torch.Tensor], base: torch.Tensor | None,
                   kwargs: Mapping[str, Any]) -> torch.Tensor:
    """Call ``kernel`` on CPU float32 tensors (zero-copy) and return its result as a tensor."""
    import torch

    sources = [ArraySource(t.reshape(-1).numpy(), "F32") for t in tensors]
    base_source = ArraySource(base.reshape(-1).numpy(), "F32") if base is not None else None
    shape = (base if base is not None else tensors[0]).shape
    out = collect(kernel.run(sources, base_source, **kwargs), sources[0].size)
    return torch.from_numpy(out).view(shape)
