"""Reference tests for the task-vector family (task arithmetic, TIES, DARE, Model Breadcrumbs,
DELLA), against mergekit's semantics: deterministic methods exactly, random ones statistically
(a fixed seed, so each check is deterministic, with bounds of several binomial standard errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from methods_support import run_method, seeded

from mergeforge.errors import MethodError


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


def ties_reference(base, finetunes, weights, density, normalize=True, lambda_=1.0):
    """TIES in NumPy: trim each task vector to its top-k magnitudes, elect the sign of the weighted
    sum, average the agreeing weighted entries (divide by the agreeing weights when normalize)."""
    weighted = []
    for finetune, weight in zip(finetunes, weights, strict=True):
        delta = (finetune - base).ravel()
        keep = int(density * delta.size)
        trimmed = np.zeros_like(delta)
        top = np.argsort(-np.abs(delta))[:keep]
        trimmed[top] = delta[top]
        weighted.append(weight * trimmed)
    weighted = np.stack(weighted)
    elected_positive = weighted.sum(axis=0) >= 0
    agrees = np.where(elected_positive, weighted > 0, weighted < 0)
    merged = (weighted * agrees).sum(axis=0)
    if normalize:
        divisor = (np.asarray(weights)[:, None] * agrees).sum(axis=0)
        divisor[divisor == 0] = 1
        merged = merged / divisor
    return base + lambda_ * merged.reshape(base.shape)


# ---------------------------------------------------------------- task arithmetic


def test_task_arithmetic_adds_the_scaled_weighted_task_vectors():
    base = seeded(3, 5, seed=1)
    finetunes = [seeded(3, 5, seed=s) for s in (2, 3)]
    out = run_method("task_arithmetic", finetunes, base, weight=[0.7, -0.2], **{"lambda": 0.5})
    deltas = [f64(f) - f64(base) for f in finetunes]
    expected = f64(base) + 0.5 * (0.7 * deltas[0] - 0.2 * deltas[1])
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_normalize_divides_by_the_weight_sum():
    base = seeded(4, seed=4)
    finetunes = [seeded(4, seed=s) for s in (5, 6)]
    out = run_method("task_arithmetic", finetunes, base, weight=[1.0, 3.0], normalize=True)
    expected = f64(base) + (1.0 * (f64(finetunes[0]) - f64(base)) + 3.0 * (f64(finetunes[1]) - f64(base))) / 4.0
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- TIES


def test_ties_worked_example():
    base = torch.zeros(4)
    first = torch.tensor([1.0, -2.0, 0.5, 3.0])
    second = torch.tensor([-3.0, 1.0, 0.4, -1.0])
    # density 0.5 keeps the two largest magnitudes: δ₁ -> [0, −2, 0, 3], δ₂ -> [−3, 1, 0, 0].
    # Elected signs of the sum [−3, −1, 0, 3]: [−, −, + (zero counts as +), +].
    # Entry 0: only δ₂ agrees -> −3; entry 1: only δ₁ -> −2; entry 2: nothing kept -> 0; entry 3: δ₁ -> 3.
    out = run_method("ties", [first, second], base, weight=[1.0, 1.0], density=0.5)
    torch.testing.assert_close(out, torch.tensor([-3.0, -2.0, 0.0, 3.0]))


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(normalize):
    base = seeded(6, 6, seed=10)
    finetunes = [base + seeded(6, 6, seed=s, scale=0.1) for s in (11, 12, 13)]
    weights, density = [1.0, 0.5, 2.0], 0.4
    out = run_method("ties", finetunes, base, weight=weights, density=density, normalize=normalize, **{"lambda": 0.8})
    expected = ties_reference(f64(base), [f64(f) for f in finetunes], weights, density, normalize, 0.8)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_int8_mask_is_accepted_and_changes_nothing():
    base = seeded(5, 5, seed=14)
    finetunes = [base + seeded(5, 5, seed=s) for s in (15, 16)]
    plain = run_method("ties", finetunes, base, density=0.5)
    torch.testing.assert_close(run_method("ties", finetunes, base, density=0.5, int8_mask=True), plain)


# ---------------------------------------------------------------- Model Breadcrumbs


def magnitude_ladder(seed: int, size: int = 20) -> torch.Tensor:
    """Magnitudes 1..size in shuffled order with random signs, so ranks are unambiguous."""
    rng = np.random.default_rng(seed)
    values = np.arange(1, size + 1, dtype=np.float64) * rng.choice([-1.0, 1.0], size)
    return torch.tensor(rng.permutation(values), dtype=torch.float32)


def test_breadcrumbs_drops_the_largest_gamma_and_the_smallest():
    base = torch.zeros(20)
    delta = magnitude_ladder(seed=20)
    # 20 entries, density 0.5 keeps 10; gamma 0.1 drops the top 2 (19, 20), so 8 smallest go too.
    out = run_method("breadcrumbs", [base + delta], base, weight=[1.5], density=0.5, gamma=0.1)
    keep = (delta.abs() >= 9) & (delta.abs() <= 18)
    torch.testing.assert_close(out, 1.5 * delta * keep)


def test_breadcrumbs_drops_fewer_outliers_when_gamma_plus_density_exceeds_one():
    base = torch.zeros(20)
    delta = magnitude_ladder(seed=21)
    # density 0.95 keeps 19, so only the single largest can go although gamma asks for 2.
    out = run_method("breadcrumbs", [base + delta], base, weight=[1.0], density=0.95, gamma=0.1)
    torch.testing.assert_close(out, delta * (delta.abs() < 20))


def test_breadcrumbs_ties_applies_sign_consensus_without_normalising():
    base = torch.zeros(20)
    first = magnitude_ladder(seed=22)
    second = -0.5 * first  # opposite signs, half the size: the first model wins every election
    out = run_method("breadcrumbs_ties", [first, second], base, weight=[1.0, 1.0], density=0.5, gamma=0.1)
    keep = (first.abs() >= 9) & (first.abs() <= 18)
    torch.testing.assert_close(out, first * keep)


# ---------------------------------------------------------------- DARE


def test_dare_linear_keeps_about_density_and_rescales_to_the_l1_norm():
    base = seeded(100, 100, seed=30)
    delta = seeded(100, 100, seed=31, scale=0.1)
    density = 0.3
    out = run_method("dare_linear", [base + delta], base, weight=[2.0], density=density)
    change = out - base
    kept = change != 0
    fraction = kept.float().mean().item()
    assert abs(fraction - density) < 5 * (density * (1 - density) / delta.numel()) ** 0.5
    scale = delta.abs().sum() / delta[kept].abs().sum()
    torch.testing.assert_close(change[kept], 2.0 * delta[kept] * scale, rtol=1e-4, atol=1e-6)


def test_dare_linear_without_rescale_keeps_the_raw_entries():
    base = seeded(50, 50, seed=32)
    delta = seeded(50, 50, seed=33)
    out = run_method("dare_linear", [base + delta], base, weight=[1.0], density=0.5, rescale=False)
    kept = (out - base).abs() > 0
    torch.testing.assert_close(out[kept], (base + delta)[kept])
    torch.testing.assert_close(out[~kept], base[~kept])


def test_dare_ties_elects_the_dominant_sign_among_the_surviving_entries():
    base = torch.zeros(200, 100)
    strong = seeded(200, 100, seed=34).abs() + 0.1
    weak = -strong / 3  # always the losing sign where both survive (rescales are ~1/density each)
    density = 0.5
    out = run_method("dare_ties", [strong, weak], base, weight=[1.0, 1.0], density=density)
    positive, negative = out > 0, out < 0
    n = out.numel()
    sigma = (0.25 / n) ** 0.5
    # Strong survives w.p. p; weak shows only where strong was dropped: p(1−p); else nothing.
    assert abs(positive.float().mean().item() - density) < 6 * sigma
    assert abs(negative.float().mean().item() - density * (1 - density)) < 6 * sigma
    strong_scale = strong.abs().sum() / strong[positive].abs().sum()
    torch.testing.assert_close(out[positive], strong[positive] * strong_scale, rtol=1e-4, atol=1e-6)
    weak_scales = out[negative] / weak[negative]
    assert weak_scales.std() < 1e-4 and abs(weak_scales.mean().item() - 1 / density) < 0.05


def test_dare_ties_with_one_model_is_dare_linear():
    base = seeded(30, 30, seed=35)
    finetune = base + seeded(30, 30, seed=36)
    torch.testing.assert_close(
        run_method("dare_ties", [finetune], base, density=0.4, seed=7),
        run_method("dare_linear", [finetune], base, density=0.4, seed=7),
    )


# ---------------------------------------------------------------- DELLA


def test_della_keep_probability_rises_with_magnitude_rank():
    base = torch.zeros(400, 400)
    delta = seeded(400, 400, seed=40)
    density, epsilon = 0.5, 0.2
    out = run_method("della_linear", [delta], base, weight=[1.0], density=density, epsilon=epsilon, rescale=False)
    kept = out != 0
    rank_fraction = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
    bottom, top = rank_fraction < 0.25, rank_fraction >= 0.75
    # p(rank r) = density − ε + 2ε·r, averaged over a quarter of the ranks.
    assert abs(kept[bottom].float().mean().item() - (density - epsilon + 2 * epsilon * 0.125)) < 0.01
    assert abs(kept[top].float().mean().item() - (density - epsilon + 2 * epsilon * 0.875)) < 0.01
    assert abs(kept.float().mean().item() - density) < 0.01
    torch.testing.assert_close(out[kept], delta[kept])


def test_della_rescales_and_normalises_like_ties():
    base = seeded(60, 60, seed=41)
    delta = seeded(60, 60, seed=42)
    out = run_method("della", [base + delta], base, weight=[3.0], density=0.6, epsilon=0.1, **{"lambda": 0.5})
    change = out - base
    kept = change.abs() > 1e-6
    scale = delta.abs().sum() / delta[kept].abs().sum()
    # One model: sign consensus keeps every surviving entry and normalize divides the weight out.
    torch.testing.assert_close(change[kept], 0.5 * delta[kept] * scale, rtol=1e-4, atol=1e-5)


def test_della_rejects_density_and_epsilon_outside_zero_one():
    with pytest.raises(MethodError, match="density ± epsilon"):
        run_method("della", [torch.ones(4, 4)], torch.zeros(4, 4), density=0.1, epsilon=0.15)
