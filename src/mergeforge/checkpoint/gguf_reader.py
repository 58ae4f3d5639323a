"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints, tensor by tensor.

The file is memory-mapped by ``gguf.GGUFReader``; a tensor (or a block of its rows) is
dequantized only when it is read, with ``gguf.quants.dequantize``, so memory stays bounded by the
tensors a merge holds. Names are the Hugging Face names of the same architecture, llama's Q/K
rotary permutation is undone and Gemma's norm offset removed (:mod:`mergeforge.checkpoint.gguf_arch`).

F32, F16 and BF16 tensors keep their dtype; quantized tensors read as float32. ``config.json``
and the tokenizer files are derived from the metadata with transformers' GGUF converters, once
per file, into the mergeforge cache (:attr:`GGUFCheckpoint.folder`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergeforge.cache import cache_root
from mergeforge.checkpoint.gguf_arch import (
    NON_HF_TENSORS,
    Architecture,
    architecture,
    permuted_rows,
)
from mergeforge.checkpoint.reader import TensorIndex, TensorInfo
from mergeforge.checkpoint.safetensors_format import read_json
from mergeforge.dtypes import bf16_to_f32, to_torch
from mergeforge.errors import CheckpointError

if TYPE_CHECKING:
    import gguf
    import torch

FLOAT_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}  # GGUF type -> safetensors dtype read as-is


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file a model reference names: the file itself, or the one ``.gguf`` in a folder that
    holds no safetensors or ``.bin`` weights. None when it is not a GGUF reference."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir():
        return None
    found = sorted(path.glob("*.gguf"))
    if not found or any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
        return None
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise CheckpointError(f"{path}: holds {len(found)} GGUF files ({names}); name the one to use")
    return found[0]


@cache
def _reader_class() -> type[gguf.GGUFReader]:
    import gguf

    class Reader(gguf.GGUFReader):
        """``GGUFReader`` parsing over a plain ndarray view of its memmap: slicing a ``numpy.memmap``
        runs ``memmap.__array_finalize__`` in Python for each of the ~200k views a large vocabulary
        makes, which was 60% of the open time (3.6 s against 1.4-1.7 s for SmolLM2). Same fields
        and tensors; ``mapping`` keeps the memmap."""

        mapping: np.memmap

        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.memmap) -> None:
            self.mapping = value
            self._plain = value.view(np.ndarray)

    return Reader


def open_reader(path: Path) -> gguf.GGUFReader:
    """``gguf.GGUFReader`` on ``path``, with every way a file can be broken reported as one
    :class:`CheckpointError` that names it."""

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic {head[:4]!r}, expected b'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    try:
        reader = _reader_class()(path)
    except ValueError as exc:
        message = str(exc)
        if "GGMLQuantizationType" in message:
            raise CheckpointError(f"{path}: a tensor has an unknown GGML type ({message}); update the gguf package") from None
        raise CheckpointError(f"{path}: not a valid GGUF file ({message})") from None
    except (IndexError, OverflowError, UnicodeDecodeError, KeyError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(
                f"{path}: truncated: tensor '{tensor.name}' ends at byte {tensor.data_offset + tensor.n_bytes}, the file has {size}"
            )
    return reader


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    """A metadata value (None when absent)."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


class GGUFCheckpoint(TensorIndex):
    """A GGUF file seen through the interface the planner and the torch executor read (its memory
    map is released with the reader).

    Example:
        >>> with GGUFCheckpoint(Path("model.Q8_0.gguf")) as ckpt:
        ...     q = ckpt.read("model.layers.0.self_attn.q_proj.weight")   # float32, HF row order
    """

    def __init__(self, path: Path, ref: str | None = None):
        self.path = path.resolve()
        self.ref = ref or str(path)
        self.reader = open_reader(self.path)
        where = str(self.path)
        arch_name = field_value(self.reader, "general.architecture")
        if not isinstance(arch_name, str):
            raise CheckpointError(f"{where}: metadata has no general.architecture")
        self.arch: Architecture = architecture(arch_name, where)
        heads = field_value(self.reader, f"{arch_name}.attention.head_count")
        if not isinstance(heads, int):
            raise CheckpointError(f"{where}: metadata has no {arch_name}.attention.head_count")
        kv_heads = field_value(self.reader, f"{arch_name}.attention.head_count_kv")
        self.heads, self.kv_heads = heads, kv_heads if isinstance(kv_heads, int) else heads
        self.gguf_types: dict[str, str] = {}  # HF name -> GGUF tensor type (Q4_1, F32, ...)
        self._tensors: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        readable: set[str] = set()
        for tensor in self.reader.tensors:
            hf = self.arch.hf_name(tensor.name)
            if hf is None:
                if tensor.name in NON_HF_TENSORS:
                    continue
                raise CheckpointError(f"{where}: tensor '{tensor.name}' has no Hugging Face name in architecture '{arch_name}'")
            kind = tensor.tensor_type.name
            if kind not in readable:
                _check_readable(tensor.tensor_type, tensor.name, where)
                readable.add(kind)
            dtype = FLOAT_TYPES.get(kind, "F32")
            if self.arch.norm_offset and self.arch.is_norm(hf):
                dtype = "F32"  # the offset is removed in float32
            shape = tuple(reversed([int(d) for d in tensor.shape]))
            self.tensors[hf] = TensorInfo(hf, shape, dtype, self.path, -1)
            self.gguf_types[hf] = kind
            self._tensors[hf] = tensor

    # -- the TensorSource interface ------------------------------------------------------------

    @property
    def location(self) -> Path:
        return self.path

    def read_numpy(self, name: str, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """The tensor (or rows ``[row_start, row_stop)``) in Hugging Face layout: float32 for
        quantized tensors, else the stored float type (BF16 as its uint16 bits)."""
        import gguf

        info = self.info(name)
        tensor = self._tensors[name]
        kind = self.gguf_types[name]
        rows = info.shape[0] if info.shape else 1
        stop = rows if row_stop is None else row_stop
        heads = self.arch.qk_heads(name, self.heads, self.kv_heads)
        data = tensor.data.reshape(rows, -1) if len(info.shape) > 1 else tensor.data.reshape(-1)
        picked = data[permuted_rows(rows, heads)[row_start:stop]] if heads else data[row_start:stop]
        values: np.ndarray
        if kind == "BF16":
            values = np.ascontiguousarray(picked).view(np.uint16)
        elif kind in FLOAT_TYPES:
            values = np.array(picked)
        else:
            values = gguf.quants.dequantize(picked, tensor.tensor_type)
        if self.arch.norm_offset and self.arch.is_norm(name):
            values = (bf16_to_f32(values) if kind == "BF16" else values.astype(np.float32)) - np.float32(self.arch.norm_offset)
        shape = (stop - row_start, *info.shape[1:]) if info.shape else ()
        values = values.reshape(shape)
        self._release(tensor)
        return values

    def read_float32(self, name: str) -> np.ndarray:
        """The whole tensor as float32 NumPy in Hugging Face layout (BF16 widened), without torch."""
        values = self.read_numpy(name)
        return bf16_to_f32(values) if self.tensors[name].dtype == "BF16" else values.astype(np.float32, copy=False)

    def _release(self, tensor: Any) -> None:
        """Drop the tensor's mapped pages from this process once read (they stay in the page cache),
        so resident memory is bounded by the tensors in flight, not by the file size."""
        mapping = getattr(getattr(self.reader, "mapping", None), "_mmap", None)  # open_reader's memmap, its mmap.mmap
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.data_offset - tensor.data_offset % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        import torch

        values = self.read_numpy(name, row_start, row_stop)
        dtype = self.tensors[name].dtype
        out = torch.from_numpy(np.ascontiguousarray(values))
        return out.view(to_torch(dtype)) if dtype == "BF16" else out

    def raw_tensor(self, gguf_name: str) -> Any:
        """A tensor of the file by its GGUF name (e.g. ``rope_freqs.weight``), as stored."""
        for tensor in self.reader.tensors:
            if tensor.name == gguf_name:
                return tensor
        return None

    # -- Hugging Face files ----------------------------------------------------------------------

    @cached_property
    def folder(self) -> Path:
        """A folder holding ``config.json`` and the tokenizer files derived from the metadata (cached)."""
        stat = self.path.stat()
        key = hashlib.sha256(f"{self.path}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_root() / "gguf" / f"{self.path.stem}-{key}"
        if not (target / "config.json").is_file():
            derive_hf_files(self.path, target)
        return target

    @cached_property
    def config(self) -> dict[str, Any] | None:
        return read_json(self.folder / "config.json")


def _check_readable(kind: gguf.GGMLQuantizationType, tensor: str, where: str) -> None:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), kind)
    except NotImplementedError:
        raise CheckpointError(
            f"{where}: tensor '{tensor}' is {kind.name}, which the gguf package cannot dequantize; requantize the file "
            "(e.g. to Q8_0 with llama-quantize)"
        ) from None


def derive_hf_files(path: Path, target: Path) -> None:
    """``config.json`` and the tokenizer files of a GGUF file, with transformers' converters."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    staging = target.parent / f".{target.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: transformers cannot derive a config and tokenizer from its metadata ({exc})") from None
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    finally:
        transformers_logging.set_verbosity(verbosity)
        shutil.rmtree(staging, ignore_errors=True)
