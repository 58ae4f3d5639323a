"""Do two merged checkpoints agree to bf16 rounding?

Both folders are read tensor by tensor (NumPy, no torch). Two bf16 values agree when they are
equal or adjacent representable numbers (one unit in the last place): that is what computing the
same float32 result and rounding it, with products and sums fused or rounded in another order,
can produce. Where a sum cancels to nearly zero, float32 rounding noise of the order of 2^-24 of
the summands can land on different tiny bf16 values (far apart in ulps, not in value); differences
smaller than 2^-16 of the tensor's largest magnitude are therefore counted as equal in value and
reported separately.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Agreement:
    tensors: int
    elements: int
    equal: int  # elements with identical bits
    max_ulp: int  # largest distance in bf16 units in the last place, among significant differences
    worst_tensor: str
    tiny: int = 0  # elements that differ by less than 2^-16 of the tensor's largest magnitude
    topk_ties: int = 0  # elements that differ where a task vector's magnitude equals its top-k threshold

    @property
    def agrees(self) -> bool:
        return self.max_ulp <= 1

    def summary(self) -> str:
        if self.tensors == 0:
            return "no tensors compared"
        share = 100.0 * self.equal / max(self.elements, 1)
        verdict = "agree" if self.agrees else "DIFFER"
        worst = f" ({self.worst_tensor})" if self.max_ulp > 1 else ""
        tiny = f", {self.tiny} near-zero cancellations" if self.tiny else ""
        ties = f", {self.topk_ties} at top-k threshold ties" if self.topk_ties else ""
        return f"{verdict}: {share:.2f}% bit-identical, max {self.max_ulp} ulp{worst}{tiny}{ties}"


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


def _threshold_ties(name: str, inputs: list[dict], topk_counts: Callable[[int], list[int]]) -> np.ndarray:
    """Positions where some task vector's magnitude equals its k-th largest, for each k of
    ``topk_counts(n)``: there any exact top-k may keep or drop the entry, and tools break such
    ties differently."""
    base = (_read(inputs[0][name]).astype(np.uint32) << 16).view(np.float32)
    at_threshold = np.zeros(base.size, dtype=bool)
    for index in inputs[1:]:
        magnitude = np.abs((_read(index[name]).astype(np.uint32) << 16).view(np.float32) - base)
        n = magnitude.size
        for k in topk_counts(n):
            if 0 < k < n:
                threshold = np.partition(magnitude, n - k)[n - k]
                at_threshold |= magnitude == threshold
    return at_threshold


def compare_folders(first: Path, second: Path, topk_inputs: list[Path] | None = None,
                    topk_counts: Callable[[int], list[int]] | None = None) -> Agreement:
    """Compare every bf16 tensor. With ``topk_inputs`` (base first, then the models) and
    ``topk_counts`` (tensor size -> the k of each top-k the method takes), differences at top-k
    threshold ties are counted apart (TIES, Breadcrumbs)."""
    left, right = _tensor_index(first), _tensor_index(second)
    inputs = [_tensor_index(folder) for folder in topk_inputs] if topk_inputs else None
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
        if not ulp.size:
            continue
        values_a = (a.astype(np.uint32) << 16).view(np.float32)
        values_b = (b.astype(np.uint32) << 16).view(np.float32)
        scale = max(float(np.abs(values_a).max()), float(np.abs(values_b).max()))
        tiny = (ulp > 1) & (np.abs(values_a - values_b) < scale * 2.0**-16)
        result.tiny += int(np.count_nonzero(tiny))
        ulp[tiny] = 0
        if inputs is not None and topk_counts is not None and ulp.max() > 1:
            at_ties = _threshold_ties(name, inputs, topk_counts) & (ulp > 1)
            result.topk_ties += int(np.count_nonzero(at_ties))
            ulp[at_ties] = 0
        worst = int(ulp.max())
        if worst > result.max_ulp:
            result.max_ulp, result.worst_tensor = worst, name
    return result
