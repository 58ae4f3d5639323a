"""Reference tests for PCB-merging (Du et al. 2024, arXiv:2410.02396), following the authors'
reference implementation: magnitudes clipped to the 0.01%/99.99% order statistics; intra
exp(N·Norm(|τ|)²); inter tanh(τᵢ·Στⱼ); β clipped below its (1 − density) order statistic and
min-max normalised; τ = Σβᵢτᵢ/Σβᵢ; θ_base + λτ. Here per tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from methods_support import run_method, seeded

from mergeforge.errors import RecipeError
from mergeforge.methods import get_method


def normalized(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


def pcb_reference(base: np.ndarray, finetunes: list[np.ndarray], density: float, lam: float) -> np.ndarray:
    deltas = np.stack([(f - base).ravel() for f in finetunes])
    n, d = deltas.shape
    ordered = np.sort(np.abs(deltas), axis=1)
    low = ordered[:, int(d * 0.0001)][:, None]
    high = ordered[:, int(d * (1 - 0.0001) - 1)][:, None]
    clipped_abs = np.clip(np.abs(deltas), low, high)
    clipped = np.sign(deltas) * clipped_abs
    row_min, row_max = clipped_abs.min(axis=1, keepdims=True), clipped_abs.max(axis=1, keepdims=True)
    intra = np.exp(n * ((clipped_abs - row_min) / (row_max - row_min)) ** 2)
    inter = np.tanh(deltas * deltas.sum(axis=0))
    beta = intra * inter
    floor = np.sort(beta, axis=1)[:, int(d * (1 - density))][:, None]
    beta = np.maximum(beta, floor)
    scale = np.stack([normalized(row) for row in beta])
    merged = (clipped * scale).sum(axis=0) / np.maximum(scale.sum(axis=0), 1e-12)
    return base + lam * merged.reshape(base.shape)


def finetunes_of(base: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    shared = seeded(*base.shape, seed=seed, scale=0.5)
    return [base + shared + seeded(*base.shape, seed=seed + 1 + i) for i in range(count)]


@pytest.mark.parametrize(("shape", "density", "lam"), [((20, 30), 0.1, 1.0), ((40,), 0.5, 0.8), ((12, 9), 1.0, 1.2)])
def test_matches_the_reference_implementation(shape, density, lam):
    base = seeded(*shape, seed=1)
    finetunes = finetunes_of(base, 3, seed=2)
    out = run_method("pcb", finetunes, base, density=density, **{"lambda": lam})
    expected = pcb_reference(base.double().numpy(), [f.double().numpy() for f in finetunes], density, lam)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_lower_density_keeps_fewer_entries_of_each_task():
    base = torch.zeros(1000)
    finetunes = finetunes_of(base, 2, seed=3)
    sparse = run_method("pcb", finetunes, base, density=0.05)
    dense = run_method("pcb", finetunes, base, density=0.5)
    assert int((sparse != 0).sum()) < int((dense != 0).sum())
    assert int((sparse != 0).sum()) <= 2 * 50


def test_runs_are_deterministic():
    base = seeded(10, 10, seed=4)
    finetunes = finetunes_of(base, 3, seed=5)
    assert torch.equal(run_method("pcb", finetunes, base), run_method("pcb", finetunes, base))


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "all"])
def test_bad_densities_are_recipe_errors(value):
    with pytest.raises(RecipeError, match="density"):
        get_method("pcb").param("density").check(value, "merge_method pcb")
