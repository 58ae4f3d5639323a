"""The safetensors file format without torch: header validation, the weight files of a model
folder, model references, and the layout of files we write.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets"}`` (plus an optional ``__metadata__``), then the data. Headers
are untrusted input, so everything is checked: header length within the file and under 100 MB,
JSON that is an object without duplicate keys, known dtypes, byte sizes that match the shapes, and
data offsets that tile the data exactly, with no holes or overlaps.

The reader (:mod:`mergeforge.checkpoint.reader`) and the writer use this module, so there is one
definition of what a valid file is and of where each byte goes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.dtypes import ITEMSIZE
from mergeforge.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str  # safetensors name: BF16, F32, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"duplicate key '{key}'")
        result[key] = value
    return result


def parse_header(fd: int, path: Path) -> tuple[dict[str, str], dict[str, HeaderEntry]]:
    """Read and validate the header of the open safetensors file ``fd``."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise CheckpointError(f"{path}: corrupt safetensors file: {size} bytes is too short for a header")
    header_length = int.from_bytes(os.pread(fd, 8, 0), "little")
    if header_length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: corrupt safetensors file: header length {header_length} exceeds the 100 MB limit")
    if 8 + header_length > size:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: header length {header_length} runs past the end of the file ({size} bytes)"
        )
    raw = os.pread(fd, header_length, 8)
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
    entries: dict[str, HeaderEntry] = {}
    for name, item in header.items():
        try:
            dtype_name = item["dtype"]
            shape = tuple(int(d) for d in item["shape"])
            begin, end = (int(v) for v in item["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors file: tensor '{name}' has a malformed header entry") from None
        if dtype_name not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype '{dtype_name}'")
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise CheckpointError(f"{path}: corrupt safetensors file: tensor '{name}' has negative sizes or offsets")
        entry = HeaderEntry(name, dtype_name, shape, data_start + begin)
        if end - begin != entry.nbytes:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: tensor '{name}' spans {end - begin} bytes but its shape "
                f"{list(shape)} of {dtype_name} needs {entry.nbytes}"
            )
        spans.append((begin, end, name))
        entries[name] = entry
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
    return metadata, entries


def pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset`` (``pread`` releases the GIL)."""
    done = 0
    total = len(buffer)
    while done < total:
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count <= 0:
            raise CheckpointError(f"{path}: file ended early while reading tensor data (truncated?)")
        done += count


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def weights_layout(folder: Path) -> tuple[str, Path]:
    """How a model folder stores its weights: ``("safetensors" | "safetensors-index" | "bin" |
    "bin-index", path)``, in the order a loader prefers them."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return "safetensors-index", folder / SAFETENSORS_INDEX
    if (folder / SAFETENSORS_SINGLE).is_file():
        return "safetensors", folder / SAFETENSORS_SINGLE
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return "safetensors", singles[0]
    if (folder / BIN_INDEX).is_file():
        return "bin-index", folder / BIN_INDEX
    if (folder / BIN_SINGLE).is_file():
        return "bin", folder / BIN_SINGLE
    raise CheckpointError(
        f"{folder}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def index_shards(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file name) of a sharded index, checked."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: missing 'weight_map'")
    for shard in sorted(set(weight_map.values())):
        if not (index_path.parent / shard).is_file():
            raise CheckpointError(f"{index_path}: lists shard '{shard}', which does not exist")
    return weight_map


# -- model references -------------------------------------------------------------------------

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


ADAPTER_SEPARATOR = "+"


def split_adapter_reference(ref: str, relative_to: Path | None = None) -> tuple[str, str] | None:
    """``(model, adapter)`` of a ``model+adapter`` reference, or None for a plain one.

    A path that exists is plain even with a ``+`` in its name; otherwise the reference splits at
    its one ``+``, as mergekit's ``ModelReference`` does (more than one is an error).
    """
    if ADAPTER_SEPARATOR not in ref:
        return None
    candidate = Path(ref).expanduser()
    if candidate.exists() or (relative_to is not None and not candidate.is_absolute() and (relative_to / candidate).exists()):
        return None
    parts = ref.split(ADAPTER_SEPARATOR)
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"model '{ref}': a model reference is MODEL or MODEL+ADAPTER, with one '+' "
                              "(a path with a '+' in it must exist)")
    return parts[0], parts[1]


# -- writing ----------------------------------------------------------------------------------

# The safetensors library orders tensors by its dtype enum, descending, then by name; matching it
# makes our files byte-identical to its own (and every tensor aligned to its element size).
_DTYPE_RANK = {name: rank for rank, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
)}


def header_bytes(tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header of a file holding ``(name, dtype name, shape)`` tensors, and each tensor's
    offset in the data section."""
    ordered = sorted(tensors, key=lambda t: (-_DTYPE_RANK[t[1]], t[0]))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets: dict[str, int] = {}
    position = 0
    for name, dtype, shape in ordered:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        offsets[name] = position
        position += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets
