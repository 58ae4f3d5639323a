"""Model Stock: interpolate between the base and the average of the fine-tunes by a ratio set by
the angle between their task vectors.

Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models"
(arXiv:2403.19522), as implemented by mergekit's ``model_stock``: with N fine-tunes whose task
vectors meet at a mean pairwise cosine cos θ, the merged weight is
``t·mean(θᵢ) + (1−t)·θ_base`` with ``t = N·cos θ / (1 + (N−1)·cos θ)``.
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import BaseUse, Param, register_method


def as_rows(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The vectors whose angle is measured, along the last dimension: (``filter_wise``) each slice
    along the last dimension, with a 1-D tensor as a single row, or else the whole tensor
    flattened to 1-D. Flattened, not one row of a matrix, because torch's 16-bit sums round
    differently for the two layouts and mergekit 0.1.5 flattens."""
    if filter_wise:
        return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() >= 2 else tensor.reshape(1, -1)
    return tensor.reshape(-1)


def stock_ratio(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Per-row ``t = N·c / (1 + (N−1)·c)``, ``c`` the mean pairwise cosine of the rows.

    Pairs with a zero vector count as cosine 0 (the norm product is floored at 1e-6, as in
    mergekit). Where ``|1 + (N−1)·c| < 1e-6`` (the directions cancel exactly) ``t`` is set to 0,
    which returns the base. The steps and their order are mergekit 0.1.5's (elementwise products
    summed, the pairwise cosines averaged in one ``mean``), so 16-bit math rounds as it does.
    """
    count = len(task_vectors)
    norms = [torch.linalg.vector_norm(vector, dim=-1) for vector in task_vectors]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = (task_vectors[i] * task_vectors[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    mean_cosine = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * mean_cosine
    degenerate = denominator.abs() < 1e-6
    ratio = (count * mean_cosine) / torch.where(degenerate, torch.ones_like(denominator), denominator)
    return torch.where(degenerate, torch.zeros_like(ratio), ratio)


@register_method(
    "model_stock",
    params=[
        Param("filter_wise", False, kind="bool", help="one ratio per row (slice along the last dim) instead of per tensor"),
    ],
    base=BaseUse.REQUIRED,
    min_models=2,
    math="t·mean(θᵢ) + (1−t)·θ_base, t = N·cos θ / (1 + (N−1)·cos θ), cos θ the mean pairwise cosine of the δᵢ = θᵢ − θ_base",
    citation="Jang et al. 2024, Model Stock (arXiv:2403.19522); mergekit 'model_stock'",
    notes=(
        "Needs the base and at least two fine-tunes. Per tensor by default; filter_wise measures "
        "the angle per row (1-D tensors such as norms and biases are one row either way). "
        "Negative mean cosines give t < 0, as in mergekit. Computed in mergekit 0.1.5's order "
        "(the mean of the weights, not of the task vectors, interpolated with the base), so a "
        "16-bit --math-dtype recipe rounds as mergekit does."
    ),
)
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    base_rows = as_rows(base, filter_wise)
    rows = [as_rows(tensor, filter_wise) for tensor in tensors]
    ratio = stock_ratio([row - base_rows for row in rows]).unsqueeze(-1)
    mean_weight = torch.zeros_like(base_rows)
    for row in rows:
        mean_weight.add_(row)
    mean_weight.div_(len(rows))
    kept = (1 - ratio) * base_rows
    return mean_weight.mul_(ratio).add_(kept).reshape(base.shape)
