"""Tensor dtypes by their safetensors names (``"BF16"``, ``"F32"``, ...), without torch.

The plan, the writer and the NumPy executor speak only these names; torch dtypes appear only where
torch tensors are made (:func:`to_torch`, :func:`from_torch`). NumPy has no bfloat16, so bf16 data
is held as its ``uint16`` bit patterns: widening is exact (the bits become the top half of a
float32); narrowing rounds to nearest, ties to even, with NaN written as ``0xFFFF``, which is bit
for bit what torch's vectorised ``.to(torch.bfloat16)`` produces. float16 and float32 use NumPy's
own types (IEEE rounding, as torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mergeforge.errors import RecipeError

if TYPE_CHECKING:
    import torch

# Bytes per element of every safetensors dtype we read and write.
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "U32": 4, "U64": 8,
}
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# Each name's torch dtype attribute; also what config.json calls it (``torch_dtype: bfloat16``).
TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}

# Recipe spellings of ``dtype`` and ``out_dtype`` (mergekit's) -> names.
RECIPE_NAMES: dict[str, str] = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
}

# The NumPy dtype each name's bytes are held in (F8 has none: those tensors take the torch executor).
NUMPY_STORAGE: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
}


def is_floating(name: str) -> bool:
    return name in FLOATING


def parse_recipe_dtype(value: str | None, field_name: str) -> str | None:
    """The name of a recipe's ``dtype``/``out_dtype`` value (``None`` stays ``None``)."""
    if value is None:
        return None
    name = RECIPE_NAMES.get(str(value).lower())
    if name is None:
        raise RecipeError(f"{field_name}: unknown dtype '{value}'; use one of float32, float16, bfloat16, float64")
    return name


def promote(names: set[str] | frozenset[str]) -> str:
    """The floating dtype torch's type promotion gives a mix of ``names`` (bf16 with f16 is float32).

    float8 counts as float32: torch has no float8 arithmetic, so no method could compute in it.
    """
    floats = {name for name in names if is_floating(name)}
    if "F64" in floats:
        return "F64"
    if floats in ({"BF16"}, {"F16"}):
        return next(iter(floats))
    return "F32"


def to_torch(name: str) -> torch.dtype:
    import torch

    return getattr(torch, TORCH_NAMES[name])


def from_torch(dtype: torch.dtype) -> str:
    """The name of a torch dtype, e.g. ``torch.bfloat16`` -> ``"BF16"``."""
    text = str(dtype).removeprefix("torch.")
    for name, torch_name in TORCH_NAMES.items():
        if torch_name == text:
            return name
    raise ValueError(f"no safetensors dtype for {dtype}")


# -- NumPy conversions --------------------------------------------------------------------------


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> float32, exactly."""
    return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even; NaN -> 0xFFFF (as torch)."""
    bits = values.view(np.uint32)
    # rounding bias: 0x7FFF plus the lowest kept bit, so exact halves round to even.
    biased = np.right_shift(bits, 16)
    np.bitwise_and(biased, 1, out=biased)
    biased += 0x7FFF
    biased += bits
    biased >>= 16
    result = biased.astype(np.uint16)
    nan = values != values
    if nan.any():
        result[nan] = 0xFFFF
    return result


def to_f32(stored: np.ndarray, name: str) -> np.ndarray:
    """A new float32 array with the values of ``stored`` (held as ``NUMPY_STORAGE[name]``)."""
    if name == "BF16":
        return bf16_to_f32(stored)
    return stored.astype(np.float32)


def from_f32(values: np.ndarray, name: str) -> np.ndarray:
    """float32 values -> the storage array of dtype ``name``, rounding as torch does."""
    if name == "BF16":
        return f32_to_bf16(values)
    return values.astype(NUMPY_STORAGE[name])
