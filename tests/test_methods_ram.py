"""Reference tests for ram and ramplus_tl (Reinforced Agent Merging, arXiv:2601.13572), worked by hand."""

from __future__ import annotations

import torch
from methods_support import run_method

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
# Task vectors:        unique₁ unique₂ shared  tiny    unique₁ none
FIRST = BASE + torch.tensor([0.5, 0.0, 2.0, 1e-7, -0.4, 0.0])
SECOND = BASE + torch.tensor([0.0, 3.0, 4.0, 0.0, 0.0, 0.0])


def test_ram_adds_unique_entries_and_averages_shared_ones():
    out = run_method("ram", [FIRST, SECOND], BASE)
    # Unique entries added in full, the shared one averaged, |δ| ≤ ε dropped.
    expected = BASE + torch.tensor([0.5, 3.0, 3.0, 0.0, -0.4, 0.0])
    torch.testing.assert_close(out, expected)


def test_ram_epsilon_decides_what_counts_as_changed():
    # With ε = 0.45, δ₁ = −0.4 no longer counts and 0.5 still does.
    out = run_method("ram", [FIRST, SECOND], BASE, epsilon=0.45)
    torch.testing.assert_close(out, BASE + torch.tensor([0.5, 3.0, 3.0, 0.0, 0.0, 0.0]))


def test_ramplus_scales_unique_entries_by_the_shared_to_unique_ratio():
    # Model 1 changed 3 entries: 2 unique, 1 shared -> ρ₁ = 0.5; model 2: 1 unique, 1 shared -> ρ₂ = 1.
    # With r = 0.5, α = 0.6: λ₁ = 1 + 0.5·0.5 = 1.25, λ₂ = 1 + 0.5·min(1, 0.6) = 1.3.
    out = run_method("ramplus_tl", [FIRST, SECOND], BASE, r=0.5, alpha=0.6)
    expected = BASE + torch.tensor([0.5 * 1.25, 3.0 * 1.3, 3.0, 0.0, -0.4 * 1.25, 0.0])
    torch.testing.assert_close(out, expected)


def test_ramplus_with_r_zero_is_ram():
    torch.testing.assert_close(
        run_method("ramplus_tl", [FIRST, SECOND], BASE, r=0.0), run_method("ram", [FIRST, SECOND], BASE)
    )


def test_ramplus_default_parameters():
    # Defaults r = 0.1, α = 0.2: both ratios are clipped to 0.2 -> λ = 1.02 for both models.
    out = run_method("ramplus_tl", [FIRST, SECOND], BASE)
    expected = BASE + torch.tensor([0.5 * 1.02, 3.0 * 1.02, 3.0, 0.0, -0.4 * 1.02, 0.0])
    torch.testing.assert_close(out, expected)


def test_ramplus_in_bf16_adds_the_boosted_unique_entries_in_float32():
    # As in mergekit 0.1.5, λ is float32 and widens δ·λ and its sum with the base to float32,
    # rounded to bf16 once at the end. Model 1: one unique, one shared entry -> ρ = 1, clipped to
    # α = 0.2, λ = 1 + 0.45·0.2 = 1.09; δ = 0.125 -> 1 + δ·λ = 1.13625, which rounds to bf16
    # 1.1328125 (17.44 steps of 2⁻⁷ above 1). Summing in bf16 instead (δ + δ·0.09 = 0.13623 lands
    # on a tie and rounds up to 0.13671875, then 1 + that ties again) would give 1.140625.
    base = torch.ones(4, dtype=torch.bfloat16)
    first = base + torch.tensor([0.125, 0.5, 0.0, 0.0], dtype=torch.bfloat16)
    second = base + torch.tensor([0.0, 0.25, 0.0, 0.0], dtype=torch.bfloat16)
    out = run_method("ramplus_tl", [first, second], base, r=0.45, alpha=0.2, compute_dtype=torch.bfloat16)
    # The shared entry is (0.5 + 0.25)/2 = 0.375 on the base, exact in bf16.
    assert torch.equal(out, torch.tensor([1.1328125, 1.375, 1.0, 1.0], dtype=torch.bfloat16))
