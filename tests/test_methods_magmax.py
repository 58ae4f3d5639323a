"""Reference tests for MagMax (Marczak et al. 2024, arXiv:2407.06322): each entry takes the task
vector value of largest magnitude, θ_base + λ·τ_MagMax, λ = 0.5 by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from methods_support import run_method, seeded

from mergeforge.errors import RecipeError
from mergeforge.methods import get_method


def magmax_reference(base: np.ndarray, finetunes: list[np.ndarray], lam: float) -> np.ndarray:
    deltas = np.stack([f - base for f in finetunes])
    chosen = np.abs(deltas).argmax(axis=0)
    return base + lam * np.take_along_axis(deltas, chosen[None], axis=0)[0]


@pytest.mark.parametrize("shape", [(6, 5), (11,)])
def test_matches_the_paper_with_its_default_lambda(shape):
    base = seeded(*shape, seed=1)
    finetunes = [base + seeded(*shape, seed=2 + i) for i in range(3)]
    out = run_method("magmax", finetunes, base)
    expected = magmax_reference(base.double().numpy(), [f.double().numpy() for f in finetunes], 0.5)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_the_largest_magnitude_wins_whatever_its_sign():
    base = torch.zeros(3)
    first = torch.tensor([1.0, -3.0, 0.5])
    second = torch.tensor([-2.0, 2.0, 0.25])
    out = run_method("magmax", [first, second], base, **{"lambda": 1.0})
    torch.testing.assert_close(out, torch.tensor([-2.0, -3.0, 0.5]))


def test_ties_go_to_the_earlier_model():
    base = torch.zeros(2)
    out = run_method("magmax", [torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0])], base, **{"lambda": 1.0})
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0]))


def test_runs_are_deterministic():
    base = seeded(8, 8, seed=3)
    finetunes = [base + seeded(8, 8, seed=4 + i) for i in range(3)]
    assert torch.equal(run_method("magmax", finetunes, base), run_method("magmax", finetunes, base))


def test_a_non_number_lambda_is_a_recipe_error():
    with pytest.raises(RecipeError, match="lambda"):
        get_method("magmax").param("lambda").check("half", "merge_method magmax")
