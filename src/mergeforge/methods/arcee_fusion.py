"""Arcee Fusion: add only the task-vector entries whose importance is an upper outlier.

Arcee AI (2025), mergekit's ``arcee_fusion`` (no paper). The importance of entry (row r, col j)
is ``|δ_rj| · KL(softmax(θ₁,r) ‖ softmax(θ_base,r))``, the KL divergence taken between the
softmaxes of the row (last dimension) in the fine-tune and in the base. Entries whose importance
reaches ``median + 1.5·IQR`` (Tukey's upper fence) are taken from the fine-tune; the rest keep the
base value.

mergekit estimates the quartiles from a random sample of 10⁶ entries when a tensor is larger;
here they are exact order statistics (``sorted[⌊q·(n−1)⌋]``, the same index rule), computed with
a selection rather than a sort, so the result is deterministic and needs no seed.
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import BaseUse, register_method

SOFTMAX_FLOOR = 1e-8  # added to both distributions before the log, as mergekit does


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ_base| times the per-row KL divergence of their softmaxes (last dimension)."""
    other_probs = torch.softmax(other, dim=-1).add_(SOFTMAX_FLOOR)
    base_probs = torch.softmax(base, dim=-1).add_(SOFTMAX_FLOOR)
    row_divergence = (other_probs * (other_probs / base_probs).log_()).sum(dim=-1, keepdim=True)
    del other_probs, base_probs
    return (other - base).abs_().mul_(row_divergence)


def order_statistic(values: torch.Tensor, quantile: float) -> torch.Tensor:
    """``sorted(values)[⌊quantile·(n−1)⌋]``, by selection (O(n))."""
    flat = values.reshape(-1)
    index = int(quantile * (flat.numel() - 1))
    return flat.kthvalue(index + 1).values


def upper_fence(importance: torch.Tensor) -> torch.Tensor:
    """Tukey's upper fence: median + 1.5·(Q3 − Q1)."""
    first_quartile = order_statistic(importance, 0.25)
    median = order_statistic(importance, 0.5)
    third_quartile = order_statistic(importance, 0.75)
    return median + 1.5 * (third_quartile - first_quartile)


@register_method(
    "arcee_fusion",
    params=[],
    base=BaseUse.REQUIRED,
    min_models=1,
    max_models=1,
    math="s = |δ|·KL(softmax(θ₁)‖softmax(θ_base)) per row; θ_base + δ·[s ≥ median(s) + 1.5·IQR(s)]",
    citation="Arcee AI 2025; mergekit 'arcee_fusion'",
    notes=(
        "Needs the base and exactly one other model. The softmax runs over the last dimension, so "
        "a 1-D tensor (norm, bias) is one distribution. Quartiles are exact, not sampled."
    ),
)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    other = tensors[0]
    importance = fusion_importance(other, base)
    keep_mask = importance >= upper_fence(importance)
    del importance
    # mergekit's form, base + δ·mask with a float32 mask, rather than where(mask, θ₁, base): the two
    # agree exactly in float32 on 16-bit inputs; in 16-bit math (--math-dtype recipe) δ is rounded
    # first and the sum is float32, as in mergekit.
    return base + (other - base) * keep_mask.float()
