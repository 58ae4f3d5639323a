"""Lazy, per-tensor reading of Hugging Face checkpoints: ``model.safetensors``, sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` (loaded with ``weights_only``).

Safetensors headers are parsed and validated by :mod:`mergeforge.checkpoint.safetensors_format`
(the file is untrusted input). Tensor bytes are read with ``pread`` straight into the tensor's own
memory: nothing is memory-mapped, so what a merge holds in RAM is exactly the tensors it is
working on, and threads read in parallel.

Opening a safetensors checkpoint and listing its tensors needs no torch: dtypes are safetensors
names (:mod:`mergeforge.dtypes`). :meth:`Checkpoint.read` returns a torch tensor (importing torch
then); :meth:`Checkpoint.read_array` returns a NumPy array of the stored bytes, for the NumPy
executor. ``.bin`` files are read with torch.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np

from mergeforge.checkpoint.safetensors_format import (
    index_shards,
    parse_header,
    pread_into,
    read_json,
    resolve_model_path,
    split_adapter_reference,
    weights_layout,
)
from mergeforge.dtypes import ITEMSIZE, NUMPY_STORAGE, from_torch, to_torch
from mergeforge.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from mergeforge.checkpoint.adapted import AdaptedCheckpoint
    from mergeforge.checkpoint.gguf_reader import GGUFCheckpoint


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, without reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: BF16, F32, I64, ...
    file: Path
    offset: int  # absolute byte offset in ``file`` (safetensors), -1 when not in a safetensors file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def in_safetensors(self) -> bool:
        """True when the bytes lie at ``offset`` in ``file``, so they can be read in any range."""
        return self.offset >= 0


class TensorSource(Protocol):
    """What the planner and the executors need of an input model: a folder of safetensors or
    ``.bin`` files (:class:`~mergeforge.checkpoint.reader.Checkpoint`), a GGUF file
    (:class:`~mergeforge.checkpoint.gguf_reader.GGUFCheckpoint`), or a state dict in memory."""

    @property
    def ref(self) -> str: ...
    @property
    def folder(self) -> Path:
        """The Hugging Face files besides the weights (config, tokenizer, ...)."""
        ...
    @property
    def location(self) -> Path:
        """The file or folder the weights are read from (an output must not overwrite it)."""
        ...
    @property
    def config(self) -> dict[str, Any] | None: ...

    def names(self) -> list[str]: ...
    def has(self, name: str) -> bool: ...
    def info(self, name: str) -> TensorInfo: ...
    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> Any: ...
    def close(self) -> None: ...


class TensorIndex:
    """``names``, ``has`` and ``info`` over ``self.tensors`` (name -> :class:`TensorInfo`), and
    ``with`` closing: what every :class:`TensorSource` shares."""

    ref: str
    tensors: dict[str, TensorInfo]

    def names(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"model '{self.ref}': tensor '{name}' not found") from None

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile:
    """One validated safetensors file, read tensor by tensor with ``pread``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            self.metadata, entries = parse_header(self._fd, self.path)
        except Exception:
            os.close(self._fd)
            raise
        self.tensors = {name: TensorInfo(name, e.shape, e.dtype, self.path, e.offset) for name, e in entries.items()}

    def read(self, info: TensorInfo, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        """Read a tensor, or rows ``[row_start, row_stop)`` of its first dimension, into new memory."""
        import torch

        shape = info.shape
        if row_stop is not None:
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            shape = (row_stop - row_start, *shape[1:])
            offset = info.offset + row_start * row_bytes
        else:
            offset = info.offset
        out = torch.empty(shape, dtype=to_torch(info.dtype))
        if out.numel():
            pread_into(self._fd, out.view(-1).view(torch.uint8).numpy().data, offset, self.path)
        return out

    def read_array(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of the flattened tensor, as the NumPy dtype its bytes are held in."""
        storage = NUMPY_STORAGE[info.dtype]
        out = np.empty(stop - start, dtype=storage)
        if out.size:
            pread_into(self._fd, out.data.cast("B"), info.offset + start * storage.itemsize, self.path)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Checkpoint(TensorIndex):
    """A model folder opened lazily: tensor names, shapes and dtypes, and per-tensor reads.

    Inputs are only ever opened read-only.
    """

    def __init__(self, folder: Path, ref: str | None = None):
        self.folder = folder
        self.ref = ref or str(folder)
        self._files: dict[Path, SafetensorsFile] = {}
        self._bin_state: dict[Path, dict[str, Any]] = {}
        self._bin_lock = threading.Lock()
        self.tensors: dict[str, TensorInfo] = self._index()
        self.config: dict[str, Any] | None = read_json(self.folder / "config.json")

    @property
    def location(self) -> Path:
        """The file or folder the model is read from."""
        return self.folder

    def _index(self) -> dict[str, TensorInfo]:
        kind, path = weights_layout(self.folder)
        if kind == "safetensors-index":
            return self._index_sharded(path, self._safetensors_infos)
        if kind == "safetensors":
            return self._safetensors_infos(path)
        if kind == "bin-index":
            return self._index_sharded(path, self._bin_infos)
        return self._bin_infos(path)

    def _index_sharded(self, index_path: Path, infos_of: Callable[[Path], dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
        weight_map = index_shards(index_path)
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            for name, info in infos_of(self.folder / shard).items():
                if weight_map.get(name) == shard:
                    tensors[name] = info
        missing = [name for name in weight_map if name not in tensors]
        if missing:
            raise CheckpointError(f"{index_path}: tensor '{missing[0]}' is not in shard '{weight_map[missing[0]]}'")
        return tensors

    def _safetensors_infos(self, path: Path) -> dict[str, TensorInfo]:
        handle = SafetensorsFile(path)
        self._files[path] = handle
        return handle.tensors

    def _bin_infos(self, path: Path) -> dict[str, TensorInfo]:
        import torch

        state = self._load_bin(path)
        return {
            name: TensorInfo(name, tuple(tensor.shape), from_torch(tensor.dtype), path, -1)
            for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor)
        }

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        import torch

        with self._bin_lock:
            if path not in self._bin_state:
                try:
                    # weights_only: never run pickled code from an untrusted file. mmap keeps it lazy.
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    try:
                        state = torch.load(path, map_location="cpu", weights_only=True)
                    except Exception as exc:
                        raise CheckpointError(f"{path}: cannot load as a PyTorch checkpoint: {exc}") from None
                except Exception as exc:
                    raise CheckpointError(f"{path}: cannot load as a PyTorch checkpoint: {exc}") from None
                if not isinstance(state, dict):
                    raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
                self._bin_state[path] = state
            return self._bin_state[path]

    # -- public -------------------------------------------------------------------------------

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        """The tensor (or a block of its rows) as a new CPU tensor in its stored dtype."""
        info = self.info(name)
        if info.offset >= 0:
            return self._files[info.file].read(info, row_start, row_stop)
        tensor = self._load_bin(info.file)[name]
        if row_stop is not None:
            tensor = tensor[row_start:row_stop]
        return tensor.clone()

    def read_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of a flattened safetensors tensor (see :meth:`SafetensorsFile.read_array`)."""
        info = self.info(name)
        if not info.in_safetensors:
            raise CheckpointError(f"model '{self.ref}': tensor '{name}' is not in a safetensors file")
        return self._files[info.file].read_array(info, start, stop)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._bin_state.clear()



def open_checkpoint(ref: str | os.PathLike[str], relative_to: Path | None = None) -> Checkpoint | GGUFCheckpoint | AdaptedCheckpoint:
    """Open a model lazily: a folder of safetensors or ``.bin`` weights (or a cached hub id), a
    ``.gguf`` file, a folder holding exactly one ``.gguf`` file, or any of these with a PEFT LoRA
    applied on the fly (``MODEL+ADAPTER``, :mod:`mergeforge.checkpoint.adapted`).

    Example:
        >>> with open_checkpoint("path/to/model") as ckpt:
        ...     weight = ckpt.read("model.embed_tokens.weight")
    """
    from mergeforge.checkpoint.gguf_reader import GGUFCheckpoint, gguf_file_of

    ref = str(ref)
    parts = split_adapter_reference(ref, relative_to)
    if parts is not None:
        from mergeforge.checkpoint.adapted import AdaptedCheckpoint

        model_ref, adapter_ref = parts
        return AdaptedCheckpoint.open(ref, open_checkpoint(model_ref, relative_to), adapter_ref, relative_to)
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute() and relative_to is not None and (relative_to / candidate).exists():
        candidate = relative_to / candidate
    if candidate.is_file():
        if candidate.suffix != ".gguf":
            raise CheckpointError(f"model '{ref}': is a file; give a model folder or a .gguf file")
        return GGUFCheckpoint(candidate, ref)
    folder = resolve_model_path(ref, relative_to)
    gguf_path = gguf_file_of(folder)
    if gguf_path is not None:
        return GGUFCheckpoint(gguf_path, ref)
    return Checkpoint(folder, ref)
