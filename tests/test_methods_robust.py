"""The robust aggregators ``median`` and ``trimmed_mean`` against NumPy and SciPy's definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergeforge import merge_tensors
from mergeforge.errors import RecipeError


def numpy_trimmed_mean(values: np.ndarray, trim: float) -> np.ndarray:
    """scipy.stats.trim_mean's rule: drop int(trim·N) values at each end of each column."""
    cut = int(trim * len(values))
    ordered = np.sort(values, axis=0)
    return ordered[cut: len(values) - cut].mean(axis=0)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_median_is_numpys_median_for_odd_and_even_counts(count):
    rng = np.random.default_rng(count)
    values = rng.normal(size=(count, 5, 3)).astype(np.float32)
    merged = merge_tensors("median", [torch.from_numpy(v) for v in values])
    np.testing.assert_allclose(merged.numpy(), np.median(values, axis=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("count", "trim"), [(5, 0.2), (4, 0.25), (10, 0.1), (10, 0.35), (3, 0.2), (6, 0.0)])
def test_trimmed_mean_drops_the_extremes_like_scipy(count, trim):
    rng = np.random.default_rng(count)
    values = rng.normal(size=(count, 17)).astype(np.float32)
    merged = merge_tensors("trimmed_mean", [torch.from_numpy(v) for v in values], trim=trim)
    np.testing.assert_allclose(merged.numpy(), numpy_trimmed_mean(values, trim), rtol=1e-6, atol=1e-6)


def test_one_outlier_does_not_move_the_median_or_the_trimmed_mean():
    honest = [torch.full((4,), 1.0), torch.full((4,), 1.1), torch.full((4,), 0.9), torch.full((4,), 1.0)]
    outlier = torch.full((4,), 1e6)
    assert float(merge_tensors("median", [*honest, outlier]).max()) == pytest.approx(1.0)
    assert float(merge_tensors("trimmed_mean", [*honest, outlier], trim=0.2).max()) == pytest.approx(1.0333, rel=1e-3)
    assert float(merge_tensors("linear", [*honest, outlier], weight=1.0).max()) > 1e5


def test_trim_is_validated_by_the_registry():
    with pytest.raises(RecipeError, match=r"'trim' = 0.5 is outside its valid range \[0, 0.5\)"):
        merge_tensors("trimmed_mean", [torch.zeros(2)] * 4, trim=0.5)


def test_mergeforge_methods_lists_both(tmp_path):
    from conftest import run_cli

    listing = run_cli("methods")
    assert listing.returncode == 0, listing.stderr
    assert "median" in listing.stdout and "trimmed_mean" in listing.stdout
    assert "- trim (global, default 0.2, range [0, 0.5)): fraction of inputs dropped at each end" in listing.stdout
