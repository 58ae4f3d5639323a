"""Reference test for nearswap: w = clamp(t/|θ_base − θ₁|, 0, 1), (1−w)·θ_base + w·θ₁."""

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


def test_t_is_required_and_positive():
    with pytest.raises(RecipeError, match="'t'"):
        run_method("nearswap", [torch.ones(2)], torch.zeros(2), t=0.0)
