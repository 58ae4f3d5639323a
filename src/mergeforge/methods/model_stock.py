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
    """The vectors whose angle is measured: the whole tensor as one row, or (``filter_wise``) each
    slice along the last dimension, with 1-D tensors as a single row."""
    if filter_wise and tensor.dim() >= 2:
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor.reshape(1, -1)


def stock_ratio(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Per-row ``t = N·c / (1 + (N−1)·c)``, ``c`` the mean pairwise cosine of the rows.

    Pairs with a zero vector count as cosine 0 (mergekit clamps the norm product at 1e-6). The
    mean pairwise cosine of N vectors is at least −1/(N−1), so the denominator is ≥ 0; where it
    vanishes (the directions cancel exactly) ``t`` is set to 0, which returns the base.
    """
    count = len(task_vectors)
    norms = [torch.linalg.vector_norm(vector, dim=-1) for vector in task_vectors]
    cosine_sum = torch.zeros_like(norms[0])
    for i in range(count):
        for j in range(i + 1, count):
            dot = torch.linalg.vecdot(task_vectors[i], task_vectors[j], dim=-1)
            cosine_sum += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    mean_cosine = cosine_sum / (count * (count - 1) / 2)
    denominator = 1 + (count - 1) * mean_cosine
    degenerate = denominator <= 1e-6
    ratio = count * mean_cosine / torch.where(degenerate, torch.ones_like(denominator), denominator)
    return torch.where(degenerate, torch.zeros_like(ratio), ratio)


@register_method(
    "model_stock",
    params=[
        Param("filter_wise", False, kind="bool", help="one ratio per row (slice along the last dim) instead of per tensor"),
    ],
    base=BaseUse.REQUIRED,
    min_models=2,
    math="θ_base + t·mean(δᵢ), t = N·cos θ / (1 + (N−1)·cos θ), cos θ the mean pairwise cosine of the δᵢ",
    citation="Jang et al. 2024, Model Stock (arXiv:2403.19522); mergekit 'model_stock'",
    notes=(
        "Needs the base and at least two fine-tunes. Per tensor by default; filter_wise measures "
        "the angle per row (1-D tensors such as norms and biases are one row either way). "
        "Negative mean cosines give t < 0, as in mergekit."
    ),
)
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    base_rows = as_rows(base, filter_wise)
    task_vectors = [as_rows(tensor, filter_wise) - base_rows for tensor in tensors]
    ratio = stock_ratio(task_vectors).unsqueeze(-1)
    mean_task_vector = torch.zeros_like(base_rows)
    for task_vector in task_vectors:
        mean_task_vector.add_(task_vector)
    mean_task_vector.div_(len(task_vectors))
    return mean_task_vector.mul_(ratio).add_(base_rows).reshape(base.shape)
