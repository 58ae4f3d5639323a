"""Reference tests for Consensus merging and TALL masks (Wang et al. 2024, arXiv:2405.07813):
mₜ = |τₜ| ≥ λₜ·|τ_MTL − τₜ| with τ_MTL = λΣτₜ; consensus keeps entries with Σₜ mₜ ≥ k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from methods_support import resolve_params, run_method, seeded

from mergeforge.errors import RecipeError
from mergeforge.methods import get_method, task_masks


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


def reference_masks(base, finetunes, tall_lambda, lam):
    deltas = [f - base for f in finetunes]
    multi = lam * sum(deltas)
    return [np.abs(d) >= tall_lambda * np.abs(multi - d) for d in deltas], deltas


def consensus_reference(base, finetunes, k, tall_lambda, lam):
    masks, deltas = reference_masks(base, finetunes, tall_lambda, lam)
    keep = np.sum(masks, axis=0) >= k
    return base + lam * keep * sum(deltas)


def finetunes_of(base: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    return [base + seeded(*base.shape, seed=seed + i) * (1 + i) for i in range(count)]


@pytest.mark.parametrize(("k", "tall_lambda", "lam"), [(2, 0.4, 1.0), (1, 0.6, 0.5), (3, 0.2, 0.3)])
def test_consensus_matches_the_paper(k, tall_lambda, lam):
    base = seeded(9, 7, seed=1)
    finetunes = finetunes_of(base, 4, seed=2)
    out = run_method("consensus", finetunes, base, k=k, tall_lambda=tall_lambda, **{"lambda": lam})
    expected = consensus_reference(f64(base), [f64(f) for f in finetunes], k, tall_lambda, lam)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_k_zero_is_task_arithmetic_and_k_above_the_task_count_is_the_base():
    base = seeded(5, 4, seed=3)
    finetunes = finetunes_of(base, 3, seed=4)
    task_arithmetic = run_method("task_arithmetic", finetunes, base, **{"lambda": 0.3})
    torch.testing.assert_close(run_method("consensus", finetunes, base, k=0, **{"lambda": 0.3}), task_arithmetic)
    torch.testing.assert_close(run_method("consensus", finetunes, base, k=4), base)


def test_a_selfish_entry_is_dropped():
    # Entry 0 matters to one task only; entry 1 to both: consensus with k = 2 keeps entry 1 only.
    base = torch.zeros(2)
    first = torch.tensor([1.0, 1.0])
    second = torch.tensor([0.0, 1.0])
    out = run_method("consensus", [first, second], base, k=2, tall_lambda=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0]))


def test_tall_mask_writes_the_multi_task_model_and_each_tasks_mask():
    base = seeded(6, 5, seed=5)
    finetunes = finetunes_of(base, 3, seed=6)
    method = get_method("tall_mask")
    params = resolve_params(method, 3, {"tall_lambda": 0.3, "lambda": 0.8})
    merged, side = method.run(finetunes, base, params)
    masks, deltas = reference_masks(f64(base), [f64(f) for f in finetunes], 0.3, 0.8)
    np.testing.assert_allclose(f64(merged), f64(base) + 0.8 * sum(deltas), rtol=1e-5, atol=1e-6)
    assert side[task_masks.MASKS].dtype == torch.uint8 and side[task_masks.MASKS].shape == (3, 4)
    torch.testing.assert_close(side[task_masks.SCALES], torch.ones(3))
    for index, mask in enumerate(masks):
        assert np.array_equal(task_masks.unpack(side[task_masks.MASKS][index], (6, 5)).numpy(), mask)


def test_runs_are_deterministic():
    base = seeded(8, 8, seed=7)
    finetunes = finetunes_of(base, 3, seed=8)
    assert torch.equal(run_method("consensus", finetunes, base), run_method("consensus", finetunes, base))


@pytest.mark.parametrize(("name", "value"), [("k", -1), ("k", 1.5), ("tall_lambda", -0.2)])
def test_bad_parameter_values_are_recipe_errors(name, value):
    with pytest.raises(RecipeError, match=name):
        get_method("consensus").param(name).check(value, "merge_method consensus")
