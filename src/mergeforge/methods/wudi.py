"""WUDI-merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors", arXiv:2503.08099).

The paper shows that a linear layer's task vector τᵢ (rows: output units) lies approximately in
the span of that task's inputs, so the rows of τᵢ can stand in for the task's data. The merged
task vector τ of each weight matrix minimises the interference it causes on every task's inputs,

    L(τ) = Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F,

starting from the task-arithmetic sum Σᵢ τᵢ and running Adam (lr 1e-5, 300 steps in the paper),
and the model is θ_base + τ (no scaling coefficient). Tensors that are not matrices get the mean
task vector, as in the paper's implementation.

The gradient 2 Σᵢ (τ − τᵢ)τᵢᵀτᵢ / ‖τᵢ‖² is computed directly (no autograd) and expanded, so each
Adam step costs one matrix product instead of two per task (see :class:`InterferenceGradient`).
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import BaseUse, Param, register_method
from mergeforge.methods.tsv import mean_task_vector

# torch.optim.Adam's defaults, which the paper's implementation uses.
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


class InterferenceGradient:
    """∇L(τ) = 2 Σᵢ wᵢ (τ − τᵢ) τᵢᵀ τᵢ with wᵢ = 1/‖τᵢ‖², expanded as τ·A − B:
    A = Σᵢ 2wᵢ τᵢᵀτᵢ and B = Σᵢ 2wᵢ τᵢτᵢᵀτᵢ are fixed, so a step costs one product, not one per task.

    Near the optimum τ·A and B nearly cancel, and Adam turns rounding noise in their difference
    into full learning-rate steps; in float64 that noise (about 1e-16 of τ·A) stays far below
    what forming each τ − τᵢ in float32 left (about 1e-7 of each term). τ·A is associated the
    cheaper way: with A itself (cols x cols: rows·cols² per step), or as (τ·Sᵀ)·S with S the
    stacked √(2wᵢ)·τᵢ (2·k·rows²·cols) when the matrix is much wider than tall.
    """

    def __init__(self, task_vectors: list[torch.Tensor]):
        scaled = [t.double() * (2.0 / float(t.double().square().sum())) ** 0.5 for t in task_vectors if bool(t.any())]
        self.empty = not scaled  # a zero task vector has no inputs
        self.gram: torch.Tensor | None = None
        self.stacked: torch.Tensor | None = None
        if self.empty:
            return
        rows, cols = scaled[0].shape
        if cols <= 2 * len(scaled) * rows:
            self.gram = sum((s.mT @ s for s in scaled), torch.zeros(cols, cols, dtype=torch.float64, device=scaled[0].device))
        else:
            self.stacked = torch.cat(scaled)
        # B = Σᵢ τᵢ·(√(2wᵢ)τᵢ)ᵀ(√(2wᵢ)τᵢ), each term associated the same cheaper way.
        self.offset = torch.zeros_like(scaled[0])
        for task_vector, s in zip((t for t in task_vectors if bool(t.any())), scaled):
            vector = task_vector.double()
            self.offset.add_(vector @ (s.mT @ s) if self.gram is not None else (vector @ s.mT) @ s)

    def __call__(self, merged: torch.Tensor) -> torch.Tensor:
        """The gradient at ``merged``, formed in float64 and returned in ``merged``'s dtype."""
        wide = merged.double()
        if self.gram is not None:
            product = wide @ self.gram
        else:
            assert self.stacked is not None
            product = (wide @ self.stacked.mT) @ self.stacked
        return product.sub_(self.offset).to(merged.dtype)


def wudi_matrix(task_vectors: list[torch.Tensor], iterations: int, lr: float) -> torch.Tensor:
    """WUDI's merged task vector for one weight matrix: Adam on L from Σᵢ τᵢ."""
    merged = torch.zeros_like(task_vectors[0])
    for task_vector in task_vectors:
        merged.add_(task_vector)
    gradient = InterferenceGradient(task_vectors)
    if iterations == 0 or gradient.empty:
        return merged
    # Adam as torch.optim.Adam computes it (betas 0.9/0.999, eps 1e-8, no weight decay), written out
    # so that no optimizer machinery (and its torch._dynamo import) runs per tensor.
    first_moment = torch.zeros_like(merged)
    second_moment = torch.zeros_like(merged)
    for step in range(1, iterations + 1):
        grad = gradient(merged)
        first_moment.lerp_(grad, 1 - ADAM_BETA1)
        second_moment.mul_(ADAM_BETA2).addcmul_(grad, grad, value=1 - ADAM_BETA2)
        denominator = (second_moment.sqrt() / (1 - ADAM_BETA2**step) ** 0.5).add_(ADAM_EPS)
        merged.addcdiv_(first_moment, denominator, value=-lr / (1 - ADAM_BETA1**step))
    return merged


@register_method(
    "wudi",
    float32_math=True,  # Adam steps of lr 1e-5 vanish in 16-bit arithmetic
    params=[
        Param("iterations", 300, kind="int", low=0, help="Adam steps (the paper's 300; 0 gives task arithmetic)"),
        Param("lr", 1e-5, low=0.0, low_open=True, help="Adam learning rate (the paper's 1e-5)"),
    ],
    base=BaseUse.REQUIRED,
    math="per matrix: τ = argmin Σᵢ ‖(τ − τᵢ)τᵢᵀ‖²/‖τᵢ‖² by Adam from Σᵢτᵢ; θ_base + τ",
    citation="Cheng et al. 2025, Whoever Started the Interference Should End It (WUDI-merging, ICML 2025, arXiv:2503.08099)",
    aliases=("wudi_merging",),
    notes=(
        "Non-matrix tensors: mean task vector. Each Adam step costs one float64 product of the matrix with a "
        "cols x cols one (rows·cols², or 2·k·rows²·cols when much wider than tall): cheap on a GPU "
        "(--device cuda), slow for 7B-scale matrices on a CPU (see docs/methods.md)."
    ),
)
def wudi(tensors: list[torch.Tensor], base: torch.Tensor, *, iterations: int, lr: float) -> torch.Tensor:
    task_vectors = [tensor - base for tensor in tensors]
    merged = wudi_matrix(task_vectors, iterations, lr) if base.ndim == 2 else mean_task_vector(task_vectors)
    return merged.add_(base)
