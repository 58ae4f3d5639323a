"""Lazy, per-tensor reading of Hugging Face checkpoints: ``model.safetensors``, sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` (loaded with ``weights_only``).

Safetensors headers are parsed and validated here (the file is untrusted input): header length
within the file and under 100 MB, JSON that is an object, known dtypes, byte sizes that match the
shapes, and data offsets that tile the data buffer exactly, with no holes or overlaps. Tensor bytes
are read with ``pread`` straight into the tensor's own memory: nothing is memory-mapped, so what a
merge holds in RAM is exactly the tensors it is working on, and threads read in parallel.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeforge.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, without reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset in ``file`` (safetensors), -1 for .bin

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    done = 0
    total = len(buffer)
    while done < total:
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count <= 0:
            raise CheckpointError(f"{path}: file ended early while reading tensor data (truncated?)")
        done += count


class SafetensorsFile:
    """One validated safetensors file, read tensor by tensor with ``pread``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            self.metadata, self.tensors = self._parse_header()
        except Exception:
            os.close(self._fd)
            raise

    def _parse_header(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        path = self.path
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file: {size} bytes is too short for a header")
        header_length = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if header_length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt safetensors file: header length {header_length} exceeds the 100 MB limit")
        if 8 + header_length > size:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: header length {header_length} runs past the end of the file ({size} bytes)"
            )
        raw = os.pread(self._fd, header_length, 8)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKey) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors file: header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors file: header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{path}: corrupt safetensors file: __metadata__ must map strings to strings")
        data_start = 8 + header_length
        spans: list[tuple[int, int, str]] = []
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype_name = entry["dtype"]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
            except (TypeError, KeyError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors file: tensor '{name}' has a malformed header entry") from None
            if dtype_name not in DTYPES:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype '{dtype_name}'")
            if any(d < 0 for d in shape) or begin < 0 or end < begin:
                raise CheckpointError(f"{path}: corrupt safetensors file: tensor '{name}' has negative sizes or offsets")
            info = TensorInfo(name, shape, DTYPES[dtype_name], path, data_start + begin)
            if end - begin != info.nbytes:
                raise CheckpointError(
                    f"{path}: corrupt safetensors file: tensor '{name}' spans {end - begin} bytes but its shape "
                    f"{list(shape)} of {dtype_name} needs {info.nbytes}"
                )
            spans.append((begin, end, name))
            tensors[name] = info
        spans.sort()
        position = 0
        for begin, end, name in spans:
            if begin != position:
                problem = "overlaps the previous tensor" if begin < position else "leaves a hole before it"
                raise CheckpointError(f"{path}: corrupt safetensors file: data offsets of tensor '{name}' {problem}")
            position = end
        if data_start + position != size:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: tensors end at byte {data_start + position} but the file has "
                f"{size} bytes (truncated or padded)"
            )
        return metadata, tensors

    def read(self, info: TensorInfo, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        """Read a tensor, or rows ``[row_start, row_stop)`` of its first dimension, into new memory."""
        shape = info.shape
        if row_stop is not None:
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            shape = (row_stop - row_start, *shape[1:])
            offset = info.offset + row_start * row_bytes
        else:
            offset = info.offset
        out = torch.empty(shape, dtype=info.dtype)
        if out.numel():
            _pread_into(self._fd, memoryview(out.view(-1).view(torch.uint8).numpy()), offset, self.path)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"duplicate key '{key}'")
        result[key] = value
    return result


class Checkpoint:
    """A model folder opened lazily: tensor names, shapes and dtypes, and per-tensor reads.

    Inputs are only ever opened read-only.
    """

    def __init__(self, folder: Path, ref: str | None = None):
        self.folder = folder
        self.ref = ref or str(folder)
        self._files: dict[Path, SafetensorsFile] = {}
        self._bin_state: dict[Path, dict[str, torch.Tensor]] = {}
        self._bin_lock = threading.Lock()
        self.tensors: dict[str, TensorInfo] = self._index()
        self.config: dict[str, Any] | None = self._read_json("config.json")

    def _read_json(self, name: str) -> Any:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None

    def _index(self) -> dict[str, TensorInfo]:
        folder = self.folder
        if (folder / SAFETENSORS_INDEX).is_file():
            return self._index_sharded(SAFETENSORS_INDEX, self._safetensors_infos)
        if (folder / SAFETENSORS_SINGLE).is_file():
            return self._safetensors_infos(folder / SAFETENSORS_SINGLE)
        singles = sorted(folder.glob("*.safetensors"))
        if len(singles) == 1:
            return self._safetensors_infos(singles[0])
        if (folder / BIN_INDEX).is_file():
            return self._index_sharded(BIN_INDEX, self._bin_infos)
        if (folder / BIN_SINGLE).is_file():
            return self._bin_infos(folder / BIN_SINGLE)
        raise CheckpointError(
            f"{folder}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
        )

    def _index_sharded(self, index_name: str, infos_of) -> dict[str, TensorInfo]:
        index_path = self.folder / index_name
        index = self._read_json(index_name)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: missing 'weight_map'")
        tensors: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = self.folder / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path}: lists shard '{shard}', which does not exist")
            for name, info in infos_of(shard_path).items():
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
        state = self._load_bin(path)
        return {
            name: TensorInfo(name, tuple(tensor.shape), tensor.dtype, path, -1)
            for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor)
        }

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
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

    def names(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"model '{self.ref}': tensor '{name}' not found") from None

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        """The tensor (or a block of its rows) as a new CPU tensor in its stored dtype."""
        info = self.info(name)
        if info.offset >= 0:
            return self._files[info.file].read(info, row_start, row_stop)
        tensor = self._load_bin(info.file)[name]
        if row_stop is not None:
            tensor = tensor[row_start:row_stop]
        return tensor.clone()

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._bin_state.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def resolve_model_path(ref: str, relative_to: Path | None = None) -> Path:
    """The local folder for a model reference: a path, or a hub id (``org/name[@revision]``)
    found in the local Hugging Face cache. Never downloads."""
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute() and relative_to is not None and (relative_to / candidate).is_dir():
        candidate = relative_to / candidate
    if candidate.is_dir():
        return candidate.resolve()
    name, _, revision = ref.partition("@")
    if "+" in name and not Path(name).exists():
        raise CheckpointError(f"model '{ref}': 'model+lora' references are not supported yet; merge the LoRA into the model first")
    if _HUB_ID.match(name) and not Path(name).exists():
        repo = hub_cache_dir() / f"models--{name.replace('/', '--')}"
        revision = revision or "main"
        commit = revision
        ref_file = repo / "refs" / revision
        if ref_file.is_file():
            commit = ref_file.read_text().strip()
        snapshot = repo / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot.resolve()
        raise CheckpointError(
            f"model '{ref}': no such folder, and not in the local Hugging Face cache ({hub_cache_dir()}); "
            f"mergeforge never downloads: fetch it first (e.g. `huggingface-cli download {name}`) or give a local path"
        )
    raise CheckpointError(f"model '{ref}': folder not found")


def open_checkpoint(ref: str | os.PathLike[str], relative_to: Path | None = None) -> Checkpoint:
    """Open a model folder (or cached hub id) lazily.

    Example:
        >>> with open_checkpoint("path/to/model") as ckpt:
        ...     weight = ckpt.read("model.embed_tokens.weight")
    """
    ref = str(ref)
    return Checkpoint(resolve_model_path(ref, relative_to), ref)
