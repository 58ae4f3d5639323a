"""Reference tests for Iso-C and Iso-CTS (Marczak et al. 2025, arXiv:2502.04959).

Iso-C: Σᵢ Δᵢ = U Σ Vᵀ → θ_base + α·σ̄ U Vᵀ. Iso-CTS: the top k directions of the sum, plus each
task's top (r − k)/T directions of Δᵢ − U_k U_kᵀ Δᵢ, stacked, made orthonormal, and given the
mean of the kept singular values. Non-matrices: mean task vector."""

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


def iso_c_reference(base: np.ndarray, finetunes: list[np.ndarray], alpha: float = 1.0) -> np.ndarray:
    total = sum(f - base for f in finetunes)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return base + alpha * s.mean() * u @ vt


def iso_cts_reference(base: np.ndarray, finetunes: list[np.ndarray], fraction: float, alpha: float = 1.0) -> np.ndarray:
    deltas = [f - base for f in finetunes]
    rank, tasks = min(base.shape), len(deltas)
    task_specific = round((rank - int(rank * fraction)) / tasks) * tasks
    common = rank - task_specific
    per_task = task_specific // tasks
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    lefts, values, rights = [u[:, :common]], [s[:common]], [vt[:common]]
    projector = np.eye(base.shape[0]) - u[:, :common] @ u[:, :common].T
    for delta in deltas:
        tu, ts, tvt = np.linalg.svd(projector @ delta, full_matrices=False)
        lefts.append(tu[:, :per_task])
        values.append(ts[:per_task])
        rights.append(tvt[:per_task])
    left, right = nearest_orthogonal(np.hstack(lefts)), nearest_orthogonal(np.vstack(rights))
    return base + alpha * np.concatenate(values).mean() * left @ right


def finetunes_of(base: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    shared = seeded(*base.shape, seed=seed, scale=0.1)
    return [base + shared + seeded(*base.shape, seed=seed + 1 + i, scale=0.05) for i in range(count)]


def test_iso_c_matches_the_paper():
    base = seeded(10, 13, seed=1)
    finetunes = finetunes_of(base, 3, seed=2)
    out = run_method("iso_c", finetunes, base, **{"lambda": 1.3})
    np.testing.assert_allclose(f64(out), iso_c_reference(f64(base), [f64(f) for f in finetunes], 1.3), rtol=1e-4, atol=1e-5)


def test_iso_c_flattens_the_spectrum():
    base = seeded(9, 6, seed=3)
    finetunes = finetunes_of(base, 2, seed=4)
    singular_values = np.linalg.svd(f64(run_method("iso_c", finetunes, base)) - f64(base), compute_uv=False)
    np.testing.assert_allclose(singular_values, singular_values.mean(), rtol=1e-4)


@pytest.mark.parametrize(("shape", "tasks", "fraction"), [((12, 10), 2, 0.8), ((10, 16), 3, 0.5), ((8, 8), 4, 0.0)])
def test_iso_cts_matches_the_paper(shape, tasks, fraction):
    base = seeded(*shape, seed=5)
    finetunes = finetunes_of(base, tasks, seed=6)
    out = run_method("iso_cts", finetunes, base, common_space_fraction=fraction, **{"lambda": 0.9})
    expected = iso_cts_reference(f64(base), [f64(f) for f in finetunes], fraction, 0.9)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-4, atol=1e-5)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base = seeded(7, 11, seed=7)
    finetunes = finetunes_of(base, 3, seed=8)
    torch.testing.assert_close(
        run_method("iso_cts", finetunes, base, common_space_fraction=1.0), run_method("iso_c", finetunes, base), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_vectors_get_the_mean_task_vector(name):
    base = seeded(5, seed=9)
    finetunes = [base + seeded(5, seed=10 + i) for i in range(3)]
    expected = f64(base) + np.mean([f64(f) - f64(base) for f in finetunes], axis=0)
    np.testing.assert_allclose(f64(run_method(name, finetunes, base)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_runs_are_deterministic(name):
    base = seeded(12, 12, seed=11)
    finetunes = finetunes_of(base, 3, seed=12)
    assert torch.equal(run_method(name, finetunes, base), run_method(name, finetunes, base))


@pytest.mark.parametrize("value", [-0.1, 1.5, "most", float("nan")])
def test_bad_common_space_fractions_are_recipe_errors(value):
    with pytest.raises(RecipeError, match="common_space_fraction"):
        get_method("iso_cts").param("common_space_fraction").check(value, "merge_method iso_cts")
