"""Reference tests for WUDI-merging (Cheng et al. 2025, arXiv:2503.08099): per matrix, Adam
(lr 1e-5, 300 steps) on L(τ) = Σᵢ ‖(τ − τᵢ)τᵢᵀ‖²_F / ‖τᵢ‖²_F from Σᵢτᵢ; θ_base + τ. The reference
runs the paper's loss through autograd and torch.optim.Adam, step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from methods_support import run_method, seeded

from mergeforge.errors import RecipeError
from mergeforge.methods import get_method


def interference_loss(merged: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    return sum(((merged - d) @ d.T).square().sum() / d.square().sum() for d in deltas)


def wudi_reference(base: torch.Tensor, finetunes: list[torch.Tensor], iterations: int, lr: float) -> torch.Tensor:
    deltas = [(f - base).double() for f in finetunes]
    merged = torch.nn.Parameter(sum(deltas))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(iterations):
        optimizer.zero_grad()
        interference_loss(merged, deltas).backward()
        optimizer.step()
    return base.double() + merged.detach()


@pytest.mark.parametrize(("shape", "iterations", "lr"), [((6, 9), 300, 1e-5), ((12, 5), 50, 1e-3), ((4, 30), 80, 1e-3)])
def test_matches_adam_on_the_papers_loss(shape, iterations, lr):
    base = seeded(*shape, seed=1)
    finetunes = [base + seeded(*shape, seed=2 + i, scale=0.01) for i in range(3)]
    out = run_method("wudi", finetunes, base, iterations=iterations, lr=lr)
    expected = wudi_reference(base, finetunes, iterations, lr)
    np.testing.assert_allclose(out.double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_the_optimisation_lowers_the_interference():
    base = seeded(10, 16, seed=3)
    finetunes = [base + seeded(10, 16, seed=4 + i, scale=0.01) for i in range(3)]
    deltas = [f - base for f in finetunes]
    start = run_method("wudi", finetunes, base, iterations=0) - base
    end = run_method("wudi", finetunes, base, iterations=200, lr=1e-3) - base
    torch.testing.assert_close(start, sum(deltas))
    assert interference_loss(end, deltas) < 0.5 * interference_loss(start, deltas)


def test_vectors_get_the_mean_task_vector():
    base = seeded(6, seed=5)
    finetunes = [base + seeded(6, seed=6 + i) for i in range(3)]
    expected = base + sum(f - base for f in finetunes) / 3
    torch.testing.assert_close(run_method("wudi", finetunes, base), expected)


def test_a_model_equal_to_the_base_is_left_out_of_the_loss():
    base = seeded(5, 7, seed=7)
    finetunes = [base + seeded(5, 7, seed=8, scale=0.01), base.clone()]
    out = run_method("wudi", finetunes, base, iterations=20, lr=1e-3)
    expected = wudi_reference(base, finetunes[:1], 20, 1e-3)
    np.testing.assert_allclose(out.double().numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_runs_are_deterministic():
    base = seeded(8, 8, seed=9)
    finetunes = [base + seeded(8, 8, seed=10 + i, scale=0.01) for i in range(3)]
    assert torch.equal(run_method("wudi", finetunes, base), run_method("wudi", finetunes, base))


@pytest.mark.parametrize(("name", "value"), [("iterations", -1), ("iterations", 2.5), ("lr", 0), ("lr", -1e-5)])
def test_bad_parameter_values_are_recipe_errors(name, value):
    with pytest.raises(RecipeError, match=name):
        get_method("wudi").param(name).check(value, "merge_method wudi")
