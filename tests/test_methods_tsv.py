"""Reference tests for TSV-M (Gargiulo et al. 2025, arXiv:2412.00081): per matrix, each task
matrix's top ⌊r/T⌋ singular triplets; the stacked singular vectors replaced by their nearest
orthogonal matrices (P Qᵀ of their SVD); θ_base + α·U⊥ diag(Σ) V⊥ᵀ. Non-matrices: mean task vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from methods_support import run_method, seeded

from mergeforge.errors import RecipeError
from mergeforge.methods import get_method


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


def nearest_orthogonal(matrix: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(matrix, full_matrices=False)
    return p @ qt


def tsv_reference(base: np.ndarray, finetunes: list[np.ndarray], alpha: float = 1.0) -> np.ndarray:
    deltas = [f - base for f in finetunes]
    keep = max(1, min(base.shape) // len(deltas))
    lefts, values, rights = [], [], []
    for delta in deltas:
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        lefts.append(u[:, :keep])
        values.append(s[:keep])
        rights.append(vt[:keep])
    left = nearest_orthogonal(np.hstack(lefts))
    right = nearest_orthogonal(np.vstack(rights))
    return base + alpha * left @ np.diag(np.concatenate(values)) @ right


def test_matches_the_paper_on_a_matrix_with_three_tasks():
    base = seeded(12, 9, seed=1)
    finetunes = [base + seeded(12, 9, seed=2 + i, scale=0.1) for i in range(3)]
    out = run_method("tsv", finetunes, base)
    np.testing.assert_allclose(f64(out), tsv_reference(f64(base), [f64(f) for f in finetunes]), rtol=1e-4, atol=1e-5)


def test_alpha_scales_the_merged_task_matrix():
    base = seeded(10, 14, seed=3)
    finetunes = [base + seeded(10, 14, seed=4 + i, scale=0.1) for i in range(2)]
    out = run_method("tsv", finetunes, base, **{"lambda": 0.7})
    expected = tsv_reference(f64(base), [f64(f) for f in finetunes], alpha=0.7)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-4, atol=1e-5)


def test_tasks_in_orthogonal_subspaces_do_not_interfere():
    # Task matrices with disjoint row and column supports: the stacked singular vectors are already
    # orthonormal, so TSV-M is the sum of each task's rank-⌊r/T⌋ truncation.
    base = torch.zeros(8, 8)
    first, second = torch.zeros(8, 8), torch.zeros(8, 8)
    first[:4, :4] = seeded(4, 4, seed=5)
    second[4:, 4:] = seeded(4, 4, seed=6)
    out = run_method("tsv", [first, second], base)
    expected = np.zeros((8, 8))
    for delta in (first, second):
        u, s, vt = np.linalg.svd(f64(delta))
        expected += u[:, :4] @ np.diag(s[:4]) @ vt[:4]
    np.testing.assert_allclose(f64(out), expected, rtol=1e-4, atol=1e-5)


def test_vectors_get_the_mean_task_vector():
    base = seeded(7, seed=7)
    finetunes = [base + seeded(7, seed=8 + i) for i in range(3)]
    out = run_method("tsv", finetunes, base, **{"lambda": 2.0})
    expected = f64(base) + 2.0 * np.mean([f64(f) - f64(base) for f in finetunes], axis=0)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_more_tasks_than_rank_keep_one_direction_each():
    base = seeded(3, 5, seed=9)
    finetunes = [base + seeded(3, 5, seed=10 + i, scale=0.1) for i in range(4)]
    out = run_method("tsv", finetunes, base)
    np.testing.assert_allclose(f64(out), tsv_reference(f64(base), [f64(f) for f in finetunes]), rtol=1e-4, atol=1e-5)


def test_runs_are_deterministic():
    base = seeded(16, 20, seed=11)
    finetunes = [base + seeded(16, 20, seed=12 + i, scale=0.1) for i in range(3)]
    assert torch.equal(run_method("tsv", finetunes, base), run_method("tsv", finetunes, base))


@pytest.mark.parametrize(("name", "value"), [("exact_svd", 2), ("exact_svd", "yes"), ("lambda", "big")])
def test_bad_parameter_values_are_recipe_errors(name, value):
    param = get_method("tsv").param(name)
    with pytest.raises(RecipeError, match=name):
        param.check(value, "merge_method tsv")
