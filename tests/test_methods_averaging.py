"""Reference tests for linear, slerp and passthrough (formulas in float64 NumPy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from methods_support import run_method, seeded

from mergeforge.errors import MethodError


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


def test_linear_is_the_normalised_weighted_sum():
    tensors = [seeded(3, 4, seed=s) for s in (1, 2, 3)]
    weights = [0.2, 0.5, 1.3]
    out = run_method("linear", tensors, weight=weights)
    expected = sum(w * f64(t) for w, t in zip(weights, tensors, strict=True)) / sum(weights)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-6, atol=1e-7)


def test_linear_without_normalize_is_the_plain_weighted_sum():
    tensors = [seeded(5, seed=s) for s in (4, 5)]
    out = run_method("linear", tensors, weight=[2.0, -0.5], normalize=False)
    np.testing.assert_allclose(f64(out), 2.0 * f64(tensors[0]) - 0.5 * f64(tensors[1]), rtol=1e-6, atol=1e-7)


def test_linear_refuses_to_normalise_weights_that_sum_to_zero():
    with pytest.raises(MethodError, match="normalize: false"):
        run_method("linear", [seeded(2, seed=6), seeded(2, seed=7)], weight=[1.0, -1.0])


def test_slerp_follows_the_great_circle():
    start, end = seeded(4, 4, seed=8), seeded(4, 4, seed=9)
    a, b = f64(start).ravel(), f64(end).ravel()
    cos_omega = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = math.acos(cos_omega)
    t = 0.3
    expected = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    out = run_method("slerp", [end], start, t=t)
    np.testing.assert_allclose(f64(out).ravel(), expected, rtol=1e-5, atol=1e-6)


def test_slerp_of_nearly_parallel_tensors_is_lerp():
    start = seeded(6, seed=10)
    end = 2 * start
    out = run_method("slerp", [end], start, t=0.25)
    np.testing.assert_allclose(f64(out), 0.75 * f64(start) + 0.25 * f64(end), rtol=1e-6)


def test_passthrough_copies_and_scales():
    tensor = seeded(3, 3, seed=11)
    torch.testing.assert_close(run_method("passthrough", [tensor]), tensor)
    torch.testing.assert_close(run_method("passthrough", [tensor], scale=0.5), 0.5 * tensor)
