"""SCE merging: Select the task-vector entries that vary most across models, Calculate one
coefficient per model from its energy, Erase the entries whose sign disagrees with the majority.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (arXiv:2408.07990), section on SCE,
as implemented by mergekit's ``sce``:

1. Select: keep the ``select_topk`` fraction of positions (among those with non-zero variance) where
   the task vectors' variance across models is largest; zero the rest in every task vector.
2. Calculate: model i's coefficient is its mean squared (selected) task vector, normalised so the
   coefficients sum to 1.
3. Erase: elect a sign per entry from the sum of the task vectors (TIES' rule); each model keeps
   only the entries that agree, and the agreeing entries are averaged with the coefficients.
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import BaseUse, Param, register_method
from mergeforge.methods.sparsify import topk_mask
from mergeforge.methods.task_vectors import INT8_MASK


def high_variance_mask(task_vectors: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """Positions of the ``int(select_topk · #nonzero-variance)`` largest across-model variances."""
    count = len(task_vectors)
    mean = torch.zeros_like(task_vectors[0])
    for task_vector in task_vectors:
        mean.add_(task_vector)
    mean.div_(count)
    variance = torch.zeros_like(mean)
    for task_vector in task_vectors:
        variance.add_((task_vector - mean).square_())
    variance.div_(count)  # population variance, as mergekit's torch.var(unbiased=False)
    keep = int(select_topk * int(torch.count_nonzero(variance)))
    return topk_mask(variance, keep)


@register_method(
    "sce",
    params=[
        Param("select_topk", 1.0, low=0.0, high=1.0, help="fraction of highest-variance positions kept"),
        INT8_MASK,
    ],
    base=BaseUse.REQUIRED,
    min_models=1,
    math="δᵢ ⊙ top-k variance mask; cᵢ ∝ mean(δᵢ²), Σcᵢ = 1; elect sign(Σδᵢ); θ_base + Σ cᵢ·agreeᵢ·δᵢ / Σ cᵢ·agreeᵢ",
    citation="Wan et al. 2024, FuseChat / SCE (arXiv:2408.07990); mergekit 'sce'",
    notes=(
        "No per-model weights: the coefficients come from the task vectors. select_topk 1 keeps "
        "every position. Treats every tensor (matrices, norms, biases) the same way, as one block."
    ),
)
def sce(tensors: list[torch.Tensor], base: torch.Tensor, *, select_topk: float, int8_mask: bool) -> torch.Tensor:
    task_vectors = [tensor - base for tensor in tensors]
    if select_topk < 1:
        keep_mask = high_variance_mask(task_vectors, select_topk)
        for task_vector in task_vectors:
            task_vector.mul_(keep_mask)

    energies = [float(task_vector.square().mean()) for task_vector in task_vectors]
    energy_sum = sum(energies)
    if energy_sum == 0:
        coefficients = [1.0 / len(energies)] * len(energies)
    else:
        coefficients = [energy / energy_sum for energy in energies]

    sign_sum = torch.zeros_like(base)
    for task_vector in task_vectors:
        sign_sum.add_(task_vector)
    elected_positive = sign_sum >= 0
    del sign_sum

    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for task_vector, coefficient in zip(task_vectors, coefficients, strict=True):
        # An entry agrees when its sign is the elected one; zeros never agree.
        agrees = torch.where(elected_positive, task_vector > 0, task_vector < 0)
        merged.add_(task_vector * agrees, alpha=coefficient)
        divisor.add_(agrees.to(base.dtype), alpha=coefficient)
    divisor[divisor == 0] = 1
    return merged.div_(divisor).add_(base)
