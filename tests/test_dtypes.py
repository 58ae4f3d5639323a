"""dtype names and the NumPy conversions: bf16 widening is exact and narrowing rounds bit for bit as torch does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeforge.dtypes import (
    ITEMSIZE,
    TORCH_NAMES,
    bf16_to_f32,
    f32_to_bf16,
    from_f32,
    from_torch,
    parse_recipe_dtype,
    to_f32,
    to_torch,
)
from mergeforge.errors import RecipeError


def special_floats() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 1e-40, -1e-40, 1.00390625, 1.01171875]
    halfway = (np.arange(0x3F800000, 0x3F800000 + (1 << 22), 0x10000, dtype=np.uint32) | 0x8000).view(np.float32)
    return np.concatenate([np.array(values, dtype=np.float32), halfway, rng.standard_normal(5000).astype(np.float32),
                           rng.integers(0, 2**32, 5000, dtype=np.uint32).view(np.float32)])


def test_f32_to_bf16_matches_torch_bit_for_bit():
    values = special_floats()
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16(values), expected)
    np.testing.assert_array_equal(from_f32(values, "BF16"), expected)


def test_bf16_to_f32_is_exact():
    bits = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_to_f32(bits).view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(to_f32(bits, "BF16").view(np.uint32), expected.view(np.uint32))


def test_f32_to_f16_matches_torch_bit_for_bit():
    values = special_floats()
    values = values[~np.isnan(values)]
    expected = torch.from_numpy(values).to(torch.float16).numpy()
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(from_f32(values, "F16").view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("name", sorted(TORCH_NAMES))
def test_every_name_round_trips_through_torch_with_its_size(name):
    dtype = to_torch(name)
    assert from_torch(dtype) == name
    assert torch.empty((), dtype=dtype).element_size() == ITEMSIZE[name]


def test_recipe_spellings():
    assert [parse_recipe_dtype(v, "dtype") for v in ("bfloat16", "BF16", "fp16", "float", "float64", None)] == [
        "BF16", "BF16", "F16", "F32", "F64", None]
    with pytest.raises(RecipeError, match="out_dtype: unknown dtype 'int8'; use one of float32"):
        parse_recipe_dtype("int8", "out_dtype")
