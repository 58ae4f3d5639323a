"""Reference tests for sce (Select, Calculate, Erase; FuseChat, arXiv:2408.07990): the expected
values are worked out by hand or with explicit NumPy loops."""

from __future__ import annotations

import numpy as np
import torch
from methods_support import run_method, seeded


def sce_reference(base: np.ndarray, finetunes: list[np.ndarray], select_topk: float) -> np.ndarray:
    deltas = np.stack([f - base for f in finetunes])  # models × entries
    if select_topk < 1:
        variance = deltas.var(axis=0)
        keep = int(select_topk * np.count_nonzero(variance))
        keep_mask = np.zeros(variance.size, dtype=bool)
        keep_mask[np.argsort(-variance.ravel())[:keep]] = True
        deltas = deltas * keep_mask.reshape(variance.shape)
    energies = np.array([np.mean(d**2) for d in deltas])
    coefficients = energies / energies.sum()
    elected = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    merged = np.zeros_like(base)
    for index in np.ndindex(base.shape):
        agreeing = [m for m in range(len(finetunes)) if np.sign(deltas[(m, *index)]) == elected[index]]
        total = sum(coefficients[m] for m in agreeing)
        if total != 0:
            merged[index] = sum(coefficients[m] * deltas[(m, *index)] for m in agreeing) / total
    return base + merged


def test_worked_example_without_selection():
    base = torch.zeros(4)
    first = torch.tensor([1.0, -2.0, 3.0, 0.0])
    second = torch.tensor([2.0, 1.0, -1.0, 0.0])
    # Energies: mean(δ₁²) = 14/4, mean(δ₂²) = 6/4 -> coefficients 0.7, 0.3.
    # Elected signs from δ₁+δ₂ = [3, −1, 2, 0] -> [+, −, +, +].
    # Entry 0: both agree -> (0.7·1 + 0.3·2)/1 = 1.3. Entry 1: only δ₁ -> −2. Entry 2: only δ₁ -> 3.
    # Entry 3: zeros never agree -> 0.
    out = run_method("sce", [first, second], base)
    torch.testing.assert_close(out, torch.tensor([1.3, -2.0, 3.0, 0.0]))


def test_matches_reference_with_full_selection():
    base = seeded(4, 5, seed=1)
    finetunes = [base + seeded(4, 5, seed=s, scale=0.1 * s) for s in (2, 3, 4)]
    out = run_method("sce", finetunes, base)
    expected = sce_reference(base.double().numpy(), [f.double().numpy() for f in finetunes], 1.0)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_matches_reference_with_top_variance_selection():
    base = seeded(6, 6, seed=10)
    finetunes = [base + seeded(6, 6, seed=s, scale=0.1) for s in (11, 12, 13)]
    out = run_method("sce", finetunes, base, select_topk=0.3)
    expected = sce_reference(base.double().numpy(), [f.double().numpy() for f in finetunes], 0.3)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # 30% of 36 positions -> 10 selected, all others keep the base value.
    assert int((out != base).sum()) == 10


def test_select_topk_zero_keeps_the_base():
    base = seeded(3, 3, seed=20)
    finetunes = [base + seeded(3, 3, seed=s) for s in (21, 22)]
    torch.testing.assert_close(run_method("sce", finetunes, base, select_topk=0.0), base)
