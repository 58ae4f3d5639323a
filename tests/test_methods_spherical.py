"""Reference tests for nuslerp, multislerp and karcher: expected values from the formulas, in
float64 NumPy, written independently of the implementation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from methods_support import run_method, seeded

from mergeforge.errors import MethodError


def slerp_reference(t: float, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Shoemake's SLERP of two vectors, lengths carried along: (sin((1−t)Ω)a + sin(tΩ)b)/sin Ω."""
    cos_omega = start @ end / (np.linalg.norm(start) * np.linalg.norm(end))
    omega = math.acos(max(-1.0, min(1.0, cos_omega)))
    return (math.sin((1 - t) * omega) * start + math.sin(t * omega) * end) / math.sin(omega)


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


# ---------------------------------------------------------------- nuslerp


def test_nuslerp_flatten_is_slerp_of_whole_tensors():
    first, second = seeded(4, 3, seed=1), seeded(4, 3, seed=2)
    out = run_method("nuslerp", [first, second], weight=[1.0, 3.0])
    expected = slerp_reference(0.75, f64(first).ravel(), f64(second).ravel()).reshape(4, 3)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_nuslerp_without_flatten_interpolates_each_last_dim_vector():
    first, second = seeded(4, 3, seed=3), seeded(4, 3, seed=4)
    out = run_method("nuslerp", [first, second], weight=[2.0, 1.0], nuslerp_flatten=False)
    expected = np.stack([slerp_reference(1 / 3, f64(first)[r], f64(second)[r]) for r in range(4)])
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_nuslerp_row_wise_interpolates_along_dim_zero():
    first, second = seeded(4, 3, seed=5), seeded(4, 3, seed=6)
    out = run_method("nuslerp", [first, second], weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    expected = np.stack([slerp_reference(0.5, f64(first)[:, c], f64(second)[:, c]) for c in range(3)], axis=1)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_nuslerp_with_base_slerps_the_task_vectors():
    base, first, second = seeded(5, 2, seed=7), seeded(5, 2, seed=8), seeded(5, 2, seed=9)
    out = run_method("nuslerp", [first, second], base, weight=[0.4, 0.6])
    delta_first, delta_second = (f64(first) - f64(base)).ravel(), (f64(second) - f64(base)).ravel()
    expected = f64(base) + slerp_reference(0.6, delta_first, delta_second).reshape(5, 2)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_nuslerp_colinear_vectors_fall_back_to_lerp():
    first = seeded(6, seed=10)
    out = run_method("nuslerp", [first, 3 * first], weight=[1.0, 1.0])
    np.testing.assert_allclose(f64(out), 2 * f64(first), rtol=1e-6)


def test_nuslerp_weights_summing_to_zero_give_the_midpoint():
    first, second = seeded(6, seed=11), seeded(6, seed=12)
    out = run_method("nuslerp", [first, second], weight=[1.0, -1.0])
    np.testing.assert_allclose(f64(out), slerp_reference(0.5, f64(first), f64(second)), rtol=1e-5, atol=1e-6)


def test_nuslerp_reproduces_slerp_with_weights_one_minus_t_and_t():
    start, end = seeded(3, 4, seed=13), seeded(3, 4, seed=14)
    nu = run_method("nuslerp", [start, end], weight=[0.7, 0.3])
    classic = run_method("slerp", [end], start, t=0.3)
    torch.testing.assert_close(nu, classic, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- multislerp


def multislerp_reference(points: list[np.ndarray], weights: list[float], eps: float = 1e-8) -> np.ndarray:
    """Multi-SLERP as described by its author, step by step: project to the unit sphere, map to the
    tangent plane at the normalised weighted mean, average there, map back, scale by the mean norm."""
    weights_array = np.asarray(weights) / sum(weights)
    norms = np.array([np.linalg.norm(p) for p in points])
    units = [p / (n + eps) for p, n in zip(points, norms, strict=True)]
    mean = sum(w * u for w, u in zip(weights_array, units, strict=True))
    mean = mean / np.linalg.norm(mean)
    tangents = [u - (u @ mean) * mean for u in units]
    tangent = sum(w * v for w, v in zip(weights_array, tangents, strict=True))
    tangent_norm = np.linalg.norm(tangent) + eps
    on_sphere = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return on_sphere * float(weights_array @ norms)


def test_multislerp_matches_the_tangent_space_algorithm():
    points = [seeded(3, 5, seed=s) for s in (20, 21, 22)]
    weights = [0.5, 1.0, 2.5]
    out = run_method("multislerp", points, weight=weights)
    expected = multislerp_reference([f64(p).ravel() for p in points], weights).reshape(3, 5)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_multislerp_with_base_averages_task_vectors():
    base = seeded(8, seed=23)
    points = [seeded(8, seed=s) for s in (24, 25, 26, 27)]
    out = run_method("multislerp", points, base, weight=[1.0, 1.0, 2.0, 1.0])
    deltas = [f64(p) - f64(base) for p in points]
    expected = f64(base) + multislerp_reference(deltas, [1.0, 1.0, 2.0, 1.0])
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_multislerp_of_two_equal_norm_points_is_their_geodesic_midpoint():
    first, second = seeded(10, seed=28), seeded(10, seed=29)
    second = second * (first.norm() / second.norm())
    out = run_method("multislerp", [first, second], weight=[1.0, 1.0])
    np.testing.assert_allclose(f64(out), slerp_reference(0.5, f64(first), f64(second)), rtol=1e-5, atol=1e-6)


def test_multislerp_without_weight_normalisation_scales_the_norm():
    first, second = seeded(10, seed=30), seeded(10, seed=31)
    normalised = run_method("multislerp", [first, second], weight=[1.0, 3.0])
    raw = run_method("multislerp", [first, second], weight=[1.0, 3.0], normalize_weights=False)
    # Same direction (the weights' scale cancels in the normalised mean), norm Σwᵢ‖θᵢ‖ = 4× larger.
    torch.testing.assert_close(raw, 4 * normalised, rtol=1e-5, atol=1e-6)


def test_multislerp_in_bf16_follows_mergekits_steps_and_roundings():
    # In 16-bit math, as in mergekit 0.1.5: the weights are bf16, every product and quotient is
    # rounded to bf16, each sum over models or over a vector is taken wide and rounded once, and
    # the tangent step (zero in exact arithmetic) is applied. Reference: those steps in float64,
    # rounded to bf16 after each.
    def bf(value: np.ndarray | float) -> np.ndarray:
        return torch.as_tensor(value, dtype=torch.float64).to(torch.bfloat16).double().numpy()

    points = [(seeded(64, seed=s, scale=0.02)).bfloat16() for s in (40, 41, 42)]
    out = run_method("multislerp", points, weight=[0.3, 0.3, 0.4], compute_dtype=torch.bfloat16)
    eps = 1e-8
    p = [t.double().numpy() for t in points]
    weights = bf(np.array([0.3, 0.3, 0.4]))
    weights = bf(weights / bf(weights.sum()))
    norms = [bf(np.sqrt((x * x).sum())) for x in p]
    units = [bf(x / bf(n + eps)) for x, n in zip(p, norms, strict=True)]
    mean = bf(sum(bf(u * w) for u, w in zip(units, weights, strict=True)))
    mean = bf(mean / bf(np.sqrt((mean * mean).sum())))
    tangents = [bf(u - bf(bf(bf(u * mean).sum()) * mean)) for u in units]
    tangent = bf(sum(bf(v * w) for v, w in zip(tangents, weights, strict=True)))
    tangent_norm = bf(bf(np.sqrt((tangent * tangent).sum())) + eps)
    on_sphere = bf(bf(mean * bf(np.cos(tangent_norm))) + bf(tangent * bf(bf(np.sin(tangent_norm)) / tangent_norm)))
    expected = bf(on_sphere * bf(sum(bf(n * w) for n, w in zip(norms, weights, strict=True))))
    np.testing.assert_array_equal(f64(out), expected)


def test_multislerp_rejects_weights_that_sum_to_zero():
    with pytest.raises(MethodError, match="sum to zero"):
        run_method("multislerp", [seeded(4, seed=32), seeded(4, seed=33)], weight=[1.0, -1.0])


# ---------------------------------------------------------------- karcher


def planar_points(angles: list[float], norms: list[float], seed: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """Points in a random 2-D plane of R¹², at the given angles and norms, as 3×4 tensors."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((12, 2)))
    return [
        torch.tensor(n * (math.cos(a) * basis[:, 0] + math.sin(a) * basis[:, 1]), dtype=torch.float32).reshape(3, 4)
        for a, n in zip(angles, norms, strict=True)
    ], basis


def test_karcher_mean_of_coplanar_points_is_at_the_mean_angle():
    # On a great circle, the Riemannian mean of points within a half circle sits at the mean angle.
    angles, norms = [0.1, 0.5, 1.2], [1.0, 2.0, 3.0]
    points, basis = planar_points(angles, norms, seed=40)
    out = run_method("karcher", points)
    mean_angle, mean_norm = sum(angles) / 3, sum(norms) / 3
    expected = mean_norm * (math.cos(mean_angle) * basis[:, 0] + math.sin(mean_angle) * basis[:, 1])
    np.testing.assert_allclose(f64(out).ravel(), expected, rtol=1e-5, atol=1e-5)


def test_karcher_without_iterations_is_the_normalised_mean_direction():
    points = [seeded(5, seed=s) for s in (41, 42, 43)]
    out = run_method("karcher", points, max_iter=0)
    units = [f64(p) / np.linalg.norm(f64(p)) for p in points]
    direction = sum(units) / np.linalg.norm(sum(units))
    expected = direction * np.mean([np.linalg.norm(f64(p)) for p in points])
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_karcher_ignores_zero_points_for_direction_but_counts_them_in_the_norm():
    angles, norms = [0.2, 0.8], [2.0, 4.0]
    points, basis = planar_points(angles, norms, seed=44)
    out = run_method("karcher", [*points, torch.zeros(3, 4)])
    expected = (6.0 / 3) * (math.cos(0.5) * basis[:, 0] + math.sin(0.5) * basis[:, 1])
    np.testing.assert_allclose(f64(out).ravel(), expected, rtol=1e-5, atol=1e-5)


def test_karcher_in_bf16_computes_in_bf16_with_float32_norms():
    # mergekit 0.1.5 computes karcher in the inputs' dtype: only the norms are float32. So under a
    # bf16 --math-dtype recipe the unit vectors, the mean, the dots, angles, tangent and iterate
    # are bf16. Reference: those steps in float64, rounded to bf16 after each (norms to float32).
    def bf(value: np.ndarray | float) -> np.ndarray:
        return torch.as_tensor(value, dtype=torch.float64).to(torch.bfloat16).double().numpy()

    def f32(value: np.ndarray | float) -> np.ndarray:
        return torch.as_tensor(value, dtype=torch.float64).to(torch.float32).double().numpy()

    def norm(x: np.ndarray) -> np.ndarray:
        return f32(np.sqrt((x * x).sum()))

    def bf16_fn(fn: Any, value: np.ndarray) -> np.ndarray:  # torch's bf16 arccos, sin
        return fn(torch.as_tensor(value).to(torch.bfloat16)).double().numpy()

    def f32_fn(fn: Any, value: np.ndarray) -> np.ndarray:  # torch's float32 sin, cos
        return fn(torch.as_tensor(value).to(torch.float32)).double().numpy()

    points = [seeded(8, seed=s, scale=0.05).bfloat16() for s in (45, 46, 47)]
    out = run_method("karcher", points, max_iter=2, compute_dtype=torch.bfloat16)
    alpha = 1 / 3
    p = [t.double().numpy() for t in points]
    norms = [norm(x) for x in p]
    units = [bf(x / n) for x, n in zip(p, norms, strict=True)]
    mean = np.zeros(8)
    for u in units:
        mean = bf(mean + bf(alpha * u))
    mean = bf(mean / norm(mean))
    for _ in range(2):
        tangent = np.zeros(8)
        for u in units:
            cos_theta = bf(np.clip(bf((mean * u).sum()), -1.0, 1.0))
            theta = bf16_fn(torch.arccos, cos_theta)
            factor = bf(alpha * bf(theta / bf16_fn(torch.sin, theta)))
            tangent = bf(tangent + bf(factor * bf(u - bf(cos_theta * mean))))
        tangent_norm = norm(tangent)
        # A float32 0-dim tensor times a bf16 tensor, in that order, is rounded to bf16 first.
        step = bf(bf(f32_fn(torch.sin, tangent_norm)) * bf(tangent / tangent_norm))
        mean = bf(bf(bf(f32_fn(torch.cos, tangent_norm)) * mean) + step)
        mean = bf(mean / norm(mean))
    expected = bf(bf(f32(sum(f32(alpha * n) for n in norms))) * mean)
    np.testing.assert_array_equal(f64(out), expected)
