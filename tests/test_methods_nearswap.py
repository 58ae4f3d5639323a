"""Reference test for nearswap: w = clamp(t/max(|θ_base − θ₁|, 1e-6), 0, 1), w·θ₁ + (1−w)·θ_base."""

from __future__ import annotations

import pytest
import torch
from methods_support import run_method

from mergeforge.errors import RecipeError


def test_worked_example():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    other = torch.tensor([1.05, 1.2, 0.0, 1.0])
    # |diff| = 0.05 -> w = min(0.1/0.05, 1) = 1 -> 1.05;  0.2 -> w = 0.5 -> 1.1;
    # 1.0 -> w = 0.1 -> 0.9;  0 -> w = 1 -> 1.0.
    out = run_method("nearswap", [other], base, t=0.1)
    torch.testing.assert_close(out, torch.tensor([1.05, 1.1, 0.9, 1.0]))


def test_differences_below_1e6_are_floored_as_in_mergekit():
    # mergekit divides t by max(|diff|, 1e-6): with t = 1e-7, a difference of 5e-7 gets
    # w = 1e-7/1e-6 = 0.1 (not 1e-7/5e-7 = 0.2), and an equal entry w = 0.1 of nothing.
    base = torch.tensor([0.0, 2.0, 0.0])
    other = torch.tensor([5e-7, 2.0, 1e-5])
    out = run_method("nearswap", [other], base, t=1e-7)
    # 5e-7 -> 0.1·5e-7 = 5e-8;  equal -> 2.0;  1e-5 -> w = 0.01 -> 1e-7.
    torch.testing.assert_close(out, torch.tensor([5e-8, 2.0, 1e-7]), rtol=1e-5, atol=0.0)


def test_bf16_math_sums_the_two_products_as_mergekit_does():
    # θ_base = 1, θ₁ = 1.015625, t = 0.01: |diff| = 2⁻⁶, w = 0.01·64 = 0.64 -> bf16 0.640625.
    # w·θ₁ = 0.65063 -> bf16 0.65234375; (1 − w)·θ_base = 0.359375; the sum 1.01171875 is a bf16
    # tie and rounds to even, 1.015625. A lerp (1 + w·2⁻⁶ = 1.0100) would give 1.0078125.
    base = torch.tensor([1.0], dtype=torch.bfloat16)
    other = torch.tensor([1.015625], dtype=torch.bfloat16)
    out = run_method("nearswap", [other], base, t=0.01, compute_dtype=torch.bfloat16)
    assert torch.equal(out, torch.tensor([1.015625], dtype=torch.bfloat16))


def test_t_is_required_and_positive():
    with pytest.raises(RecipeError, match="'t'"):
        run_method("nearswap", [torch.ones(2)], torch.zeros(2), t=0.0)
