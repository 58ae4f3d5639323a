"""Do two merged checkpoints agree to bf16 rounding?

Both folders are read tensor by tensor (NumPy, no torch). Two bf16 values agree when they are
equal or adjacent representable numbers (one unit in the last place): that is what computing the
same float32 result and rounding it, with sums taken in a different order, can produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Agreement:
    tensors: int
    elements: int
    equal: int  # elements with identical bits
    max_ulp: int  # largest distance in bf16 units in the last place
    worst_tensor: str

    @property
    def agrees(self) -> bool:
        return self.max_ulp <= 1

    def summary(self) -> str:
        if self.tensors == 0:
            return "no tensors compared"
        share = 100.0 * self.equal / max(self.elements, 1)
        verdict = "agree" if self.agrees else "DIFFER"
        return f"{verdict}: {share:.3f}% bit-identical, max {self.max_ulp} ulp ({self.worst_tensor})"


def _tensor_index(folder: Path) -> dict[str, tuple[Path, str, list[int], int]]:
    index: dict[str, tuple[Path, str, list[int], int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            index[name] = (path, entry["dtype"], entry["shape"], 8 + length + entry["data_offsets"][0])
    return index


def _read(entry: tuple[Path, str, list[int], int]) -> np.ndarray:
    path, dtype, shape, offset = entry
    count = int(np.prod(shape)) if shape else 1
    return np.fromfile(path, dtype=np.uint16 if dtype in ("BF16", "F16") else np.uint8, count=count, offset=offset)


def _ordered(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> integers in the order of the values (so adjacent floats differ by 1)."""
    signed = bits.astype(np.int32)
    return np.where(signed & 0x8000, 0x8000 - signed, signed)


def compare_folders(first: Path, second: Path) -> Agreement:
    left, right = _tensor_index(first), _tensor_index(second)
    result = Agreement(0, 0, 0, 0, "")
    for name, entry in left.items():
        if name not in right:
            # mergekit drops a tied lm_head; a missing tensor is a disagreement otherwise.
            if name == "lm_head.weight":
                continue
            return Agreement(result.tensors, result.elements, result.equal, 1 << 16, f"{name} missing")
        if entry[1] != "BF16" or right[name][1] != "BF16":
            continue
        a, b = _read(entry), _read(right[name])
        ulp = np.abs(_ordered(a) - _ordered(b))
        result.tensors += 1
        result.elements += a.size
        result.equal += int(np.count_nonzero(a == b))
        worst = int(ulp.max()) if ulp.size else 0
        if worst > result.max_ulp:
            result.max_ulp, result.worst_tensor = worst, name
    return result
