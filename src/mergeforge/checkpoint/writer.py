"""Streaming safetensors output, laid out before the first byte is written.

A merge knows every output tensor's name, shape and dtype before it computes any of them, so the
writer fixes the whole layout up front: which shard each tensor goes to (greedy, in plan order, up
to the shard size), the order inside each shard (the safetensors library's: by dtype, wider first, then by
name, so every tensor is aligned to its element size and the bytes do not depend on the
order tensors were computed in), each header, and each tensor's byte offset. Dtypes are safetensors
names (``"BF16"``), and data torch tensors or raw bytes (from NumPy arrays), so both executors write
through this same code, and torch is imported only when a torch tensor is written. Tensors are then
written with ``pwrite`` straight to their place, in whatever order they finish, by any thread: no
output shard is ever buffered in memory. Space is reserved up front with ``posix_fallocate``, so a
full disk is reported before the merge starts rather than in the middle.
"""

from __future__ import annotations

import errno
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergeforge.checkpoint.safetensors_format import SAFETENSORS_INDEX, header_bytes
from mergeforge.dtypes import ITEMSIZE, from_torch
from mergeforge.errors import OutputError

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_BYTES = 5 * 1000**3
# Written bytes after which the writing thread flushes its shard to disk (``fdatasync``), so the
# flush overlaps the other threads' computing instead of all coming in ``close``.
SYNC_EVERY_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: BF16, F32, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    tensor: OutputTensor


def shard_file_name(index: int, count: int, stem: str = "model") -> str:
    if count == 1:
        return f"{stem}.safetensors"
    return f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


def split_into_shards(tensors: Iterable[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy in plan order, like ``huggingface_hub``: a new shard starts when the next tensor would
    overflow the current one. A tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards if shards[0] else []


def _header_bytes(tensors: list[OutputTensor], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    return header_bytes([(t.name, t.dtype, t.shape) for t in tensors], metadata)


class ShardedWriter:
    """Writes a fixed set of tensors into ``folder`` as (sharded) safetensors.

    Arguments:
        folder: an existing, empty folder (the caller's temporary output folder).
        tensors: every tensor that will be written, in plan order.
        max_shard_bytes: shard size limit.
        stem: file name stem (``model`` gives the Hugging Face names).
        metadata: the safetensors ``__metadata__`` (``{"format": "pt"}`` by default).

    Example:
        >>> writer = ShardedWriter(tmp, [OutputTensor("w", (2, 2), "F32")])
        >>> writer.write("w", torch.ones(2, 2)); writer.close()
    """

    def __init__(
        self,
        folder: Path,
        tensors: list[OutputTensor],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        stem: str = "model",
        metadata: Mapping[str, str] | None = None,
        index_name: str = SAFETENSORS_INDEX,
    ):
        self.folder = folder
        self.shards = split_into_shards(tensors, max_shard_bytes)
        count = len(self.shards)
        self.file_names = [shard_file_name(i, count, stem) for i in range(count)]
        self._slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._unsynced: list[int] = []
        metadata = {"format": "pt"} if metadata is None else metadata
        total = 0  # bytes of tensor data, for the index
        try:
            for shard_index, (shard, file_name) in enumerate(zip(self.shards, self.file_names)):
                header, offsets = _header_bytes(shard, metadata)
                data_bytes = sum(t.nbytes for t in shard)
                path = folder / file_name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                self._unsynced.append(0)
                size = len(header) + data_bytes
                if size:
                    _reserve(fd, size, path)
                os.pwrite(fd, header, 0)
                for tensor in shard:
                    self._slots[tensor.name] = _Slot(shard_index, len(header) + offsets[tensor.name], tensor)
                total += data_bytes
        except BaseException:
            self.close()
            raise
        if count > 1:
            weight_map = {t.name: self.file_names[i] for i, shard in enumerate(self.shards) for t in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / index_name).write_text(json.dumps(index, indent=2) + "\n")

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Write a tensor (or, with ``row_start``, a block of its rows) to its place. Thread-safe."""
        slot = self._slots[name]
        expected = slot.tensor
        if from_torch(tensor.dtype) != expected.dtype:
            raise ValueError(f"{name}: expected dtype {expected.dtype}, got {tensor.dtype}")
        full = tuple(tensor.shape) == expected.shape and row_start == 0
        if not full and tuple(tensor.shape[1:]) != expected.shape[1:]:
            raise ValueError(f"{name}: expected shape {expected.shape}, got {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        row_bytes = expected.nbytes // expected.shape[0] if expected.shape and expected.shape[0] else 0
        if data.numel():
            import torch

            self._pwrite(slot, data.view(-1).view(torch.uint8).numpy().data, slot.offset + row_start * row_bytes)
        if full:
            with self._lock:
                self._written.add(name)

    def write_bytes(self, name: str, data: memoryview | bytes, byte_start: int = 0, complete: bool = False) -> None:
        """Write raw bytes (already in the tensor's dtype, e.g. from a NumPy array) at
        ``byte_start`` within tensor ``name``; ``complete`` marks the tensor done. Thread-safe."""
        slot = self._slots[name]
        view = memoryview(data).cast("B")
        if byte_start + len(view) > slot.tensor.nbytes:
            raise ValueError(f"{name}: {len(view)} bytes at {byte_start} run past its {slot.tensor.nbytes} bytes")
        if len(view):
            self._pwrite(slot, view, slot.offset + byte_start)
        if complete:
            self.mark_written(name)

    def _pwrite(self, slot: _Slot, view: memoryview, offset: int) -> None:
        fd = self._fds[slot.shard]
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            with self._lock:
                self._unsynced[slot.shard] += done
                flush = self._unsynced[slot.shard] >= SYNC_EVERY_BYTES
                if flush:
                    self._unsynced[slot.shard] = 0
            if flush:
                os.fdatasync(fd)
        except OSError as exc:
            raise output_error(exc, self.folder / self.file_names[slot.shard]) from None

    def mark_written(self, name: str) -> None:
        with self._lock:
            self._written.add(name)

    def missing(self) -> list[str]:
        """Tensors not (or not completely) written yet: an executor must leave none before the
        output folder is renamed into place."""
        return [name for name in self._slots if name not in self._written]

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._fds = []


def _reserve(fd: int, size: int, path: Path) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            os.ftruncate(fd, size)  # the file system cannot reserve; write errors still surface later
        else:
            raise output_error(exc, path) from None


def output_error(exc: OSError, path: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full; free space on {path.parent} or choose another OUT_DIR")
    return OutputError(f"{path}: cannot write: {exc.strerror}")


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write an in-memory state dict into an existing folder as (sharded) safetensors.

    Returns the file names written. Tensors that share memory are written as separate copies.
    """
    folder = Path(folder)
    tensors = [OutputTensor(name, tuple(t.shape), from_torch(t.dtype)) for name, t in state.items()]
    writer = ShardedWriter(folder, tensors, max_shard_bytes, metadata=metadata)
    try:
        for name, tensor in state.items():
            writer.write(name, tensor)
    finally:
        writer.close()
    return writer.file_names

