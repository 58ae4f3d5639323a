"""Reference tests for arcee_fusion: importance |δ|·KL(softmax(θ₁)‖softmax(θ_base)) per row, keep
the entries at or above median + 1.5·IQR (quantile q = sorted[⌊q(n−1)⌋])."""

from __future__ import annotations

import numpy as np
import torch
from methods_support import run_method, seeded


def softmax(rows: np.ndarray) -> np.ndarray:
    shifted = np.exp(rows - rows.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def arcee_fusion_reference(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    divergence = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    importance = np.abs(other - base) * divergence
    ordered = np.sort(importance.ravel())
    quantile = lambda level: ordered[int(level * (ordered.size - 1))]  # noqa: E731
    threshold = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    return np.where(importance >= threshold, other, base)


def test_matches_reference_on_a_matrix():
    base = seeded(16, 12, seed=1)
    # Rows change by different amounts, so the KL factor separates them.
    row_scale = torch.linspace(0.01, 1.0, 16).unsqueeze(1)
    other = base + seeded(16, 12, seed=2) * row_scale
    out = run_method("arcee_fusion", [other], base)
    expected = arcee_fusion_reference(base.double().numpy(), other.double().numpy())
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    kept = (out != base).sum().item()
    assert 0 < kept < base.numel()


def test_matches_reference_on_a_vector():
    base = seeded(50, seed=3)
    other = base + seeded(50, seed=4, scale=0.3)
    out = run_method("arcee_fusion", [other], base)
    expected = arcee_fusion_reference(base.double().numpy(), other.double().numpy())
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-7)


def test_a_large_isolated_change_is_taken_and_small_noise_is_not():
    base = seeded(8, 16, seed=5)
    other = base + seeded(8, 16, seed=6, scale=0.01)
    other[2, 3] += 5.0
    out = run_method("arcee_fusion", [other], base)
    assert out[2, 3] == other[2, 3]
    # Tukey's fence keeps only upper outliers: a small minority of the noisy entries.
    assert (out != base).float().mean() < 0.25
