"""Stored tensor bytes as NumPy arrays, without torch: safetensors dtype names, and the exact
conversions between bf16 and float32.

NumPy has no bfloat16, so bf16 tensors are held as their ``uint16`` bit patterns. Widening is
exact (the bits become the top half of a float32); narrowing rounds to nearest, ties to even,
with NaN written as ``0xFFFF``, which is bit for bit what torch's vectorised ``.to(torch.bfloat16)``
produces. float16 and float32 use NumPy's own types (IEEE rounding, as torch).
"""

from __future__ import annotations

import numpy as np

# safetensors dtype name -> the NumPy dtype its bytes are held in.
STORAGE: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
}
FLOATING = frozenset({"F64", "F32", "F16", "BF16"})
ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in STORAGE.items()} | {"F8_E4M3": 1, "F8_E5M2": 1}
# Recipe dtype names (as the planner accepts them) -> safetensors names.
RECIPE_DTYPES: dict[str, str] = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
}


def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bf16 bit patterns -> float32, exactly."""
    wide = np.left_shift(bits, 16, dtype=np.uint32, out=None if out is None else out.view(np.uint32))
    return wide.view(np.float32)


def f32_to_bf16(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even; NaN -> 0xFFFF (as torch)."""
    bits = values.view(np.uint32)
    # rounding bias: 0x7FFF plus the lowest kept bit, so exact halves round to even.
    biased = np.right_shift(bits, 16)
    np.bitwise_and(biased, 1, out=biased)
    biased += 0x7FFF
    biased += bits
    biased >>= 16
    result = biased.astype(np.uint16) if out is None else np.copyto(out, biased, casting="unsafe") or out
    nan = values != values
    if nan.any():
        result[nan] = 0xFFFF
    return result


def to_f32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A new float32 array with the values of ``stored`` (held as ``STORAGE[dtype]``)."""
    if dtype == "BF16":
        return bf16_to_f32(stored)
    return stored.astype(np.float32)


def from_f32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the storage array of ``dtype``, rounding as torch does."""
    if dtype == "BF16":
        return f32_to_bf16(values)
    return values.astype(STORAGE[dtype])
