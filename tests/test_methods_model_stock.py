"""Reference tests for model_stock: t = N·cos θ / (1 + (N−1)·cos θ) from the mean pairwise cosine
of the task vectors, output t·mean(θᵢ) + (1−t)·θ_base (Jang et al. 2024, arXiv:2403.19522)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from methods_support import run_method, seeded


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def model_stock_reference(base: np.ndarray, finetunes: list[np.ndarray]) -> np.ndarray:
    """Whole-array Model Stock in float64."""
    deltas = [(f - base).ravel() for f in finetunes]
    count = len(finetunes)
    mean_cos = np.mean([cosine(a, b) for a, b in itertools.combinations(deltas, 2)])
    t = count * mean_cos / (1 + (count - 1) * mean_cos)
    return t * np.mean(finetunes, axis=0) + (1 - t) * base


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


def correlated_finetunes(base: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    # A shared direction plus noise, so the cosines are clearly positive and t is informative.
    shared = seeded(*base.shape, seed=seed, scale=0.1)
    return [base + shared + seeded(*base.shape, seed=seed + 1 + i, scale=0.08) for i in range(count)]


def test_two_finetunes_use_t_equal_2cos_over_1_plus_cos():
    base = seeded(6, 5, seed=1)
    finetunes = correlated_finetunes(base, 2, seed=2)
    out = run_method("model_stock", finetunes, base)
    delta_a, delta_b = (f64(f) - f64(base) for f in finetunes)
    cos = cosine(delta_a.ravel(), delta_b.ravel())
    t = 2 * cos / (1 + cos)
    assert 0 < t < 1
    expected = t * (f64(finetunes[0]) + f64(finetunes[1])) / 2 + (1 - t) * f64(base)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_three_finetunes_use_the_mean_pairwise_cosine():
    base = seeded(4, 7, seed=10)
    finetunes = correlated_finetunes(base, 3, seed=11)
    out = run_method("model_stock", finetunes, base)
    expected = model_stock_reference(f64(base), [f64(f) for f in finetunes])
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)


def test_filter_wise_uses_one_ratio_per_row():
    base = seeded(5, 6, seed=20)
    finetunes = correlated_finetunes(base, 3, seed=21)
    out = run_method("model_stock", finetunes, base, filter_wise=True)
    expected = np.stack(
        [model_stock_reference(f64(base)[r], [f64(f)[r] for f in finetunes]) for r in range(5)]
    )
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-6)
    whole = run_method("model_stock", finetunes, base, filter_wise=False)
    assert not torch.allclose(out, whole)


def test_filter_wise_treats_a_vector_as_one_row():
    base = seeded(9, seed=30)
    finetunes = correlated_finetunes(base, 2, seed=31)
    torch.testing.assert_close(
        run_method("model_stock", finetunes, base, filter_wise=True),
        run_method("model_stock", finetunes, base, filter_wise=False),
    )


def test_orthogonal_task_vectors_give_the_base():
    base = seeded(2, 2, seed=40)
    finetunes = [base + torch.tensor([[1.0, 0.0], [0.0, 0.0]]), base + torch.tensor([[0.0, 2.0], [0.0, 0.0]])]
    torch.testing.assert_close(run_method("model_stock", finetunes, base), base)


def test_cancelling_directions_fall_back_to_the_base_instead_of_exploding():
    base = seeded(3, seed=41)
    delta = torch.tensor([1.0, -2.0, 0.5])
    out = run_method("model_stock", [base + delta, base - delta], base)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base)


def test_bf16_math_interpolates_the_mean_weight_in_mergekits_order():
    # In 16-bit math the order of the steps shows: t·mean(θᵢ) + (1−t)·θ_base with the mean of
    # the weights (mergekit 0.1.5), not θ_base + t·mean(δᵢ). Reference: those steps in float64,
    # each result rounded to bf16 as a bf16 torch operation rounds it.
    def bf16(value: torch.Tensor) -> torch.Tensor:
        return value.to(torch.bfloat16).double()

    base = seeded(256, seed=7, scale=0.02).bfloat16()
    finetunes = [(base.float() + seeded(256, seed=8 + i, scale=0.002)).bfloat16() for i in range(2)]
    out = run_method("model_stock", finetunes, base, compute_dtype=torch.bfloat16)
    base64, first, second = (t.double() for t in (base, *finetunes))
    delta_a, delta_b = bf16(first - base64), bf16(second - base64)
    norm_product = bf16(bf16(delta_a.norm()) * bf16(delta_b.norm()))
    cos = bf16(bf16((bf16(delta_a * delta_b)).sum()) / norm_product)
    t = bf16(bf16(2 * cos) / bf16(1 + cos))
    mean = bf16(bf16(first + second) / 2)
    expected = bf16(bf16(t * mean) + bf16(bf16(1 - t) * base64))
    assert torch.equal(out.double(), expected)
