"""WUDI-merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors", arXiv:2503.08099).

The paper shows that a linear layer's task vector τᵢ (rows: output units) lies approximately in
the span of that task's inputs, so the rows of τᵢ can stand in for the task's data. The merged
task vector τ of each weight matrix minimises the interference it causes on every task's inputs,

    L(τ) = Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F,

starting from the task-arithmetic sum Σᵢ τᵢ and running Adam (lr 1e-5, 300 steps in the paper),
and the model is θ_base + τ (no scaling coefficient). Tensors that are not matrices get the mean
task vector, as in the paper's implementation.

The gradient is 2(τA − B) with A = Σᵢ τᵢᵀτᵢ / ‖τᵢ‖² and B = Σᵢ τᵢτᵢᵀτᵢ / ‖τᵢ‖², both computed
once, so each Adam step costs one matrix product instead of a forward and backward pass per task.
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import BaseUse, Param, register_method
from mergeforge.methods.tsv import mean_task_vector


class InterferenceGradient:
    """∇L(τ) = 2 Σᵢ wᵢ (τ − τᵢ) τᵢᵀ τᵢ with wᵢ = 1/‖τᵢ‖², in whichever association is cheaper."""

    def __init__(self, task_vectors: list[torch.Tensor]):
        self.task_vectors = [t for t in task_vectors if bool(t.any())]  # a zero task vector has no inputs
        self.weights = [1.0 / float(t.square().sum()) for t in self.task_vectors]
        rows, cols = task_vectors[0].shape
        # τA costs rows·cols² per step; Σᵢ (τ τᵢᵀ) τᵢ costs 2·N·rows²·cols.
        self.use_gram = cols <= 2 * len(self.task_vectors) * rows
        self.target = torch.zeros_like(task_vectors[0])  # B
        self.gram = torch.zeros(cols, cols, dtype=task_vectors[0].dtype, device=task_vectors[0].device) if self.use_gram else None
        for task_vector, weight in zip(self.task_vectors, self.weights):
            if rows <= cols:
                self.target.add_((task_vector @ task_vector.mT) @ task_vector, alpha=weight)
            else:
                self.target.add_(task_vector @ (task_vector.mT @ task_vector), alpha=weight)
            if self.gram is not None:
                self.gram.add_(task_vector.mT @ task_vector, alpha=weight)

    @property
    def empty(self) -> bool:
        return not self.task_vectors

    def __call__(self, merged: torch.Tensor) -> torch.Tensor:
        if self.gram is not None:
            product = merged @ self.gram
        else:
            product = torch.zeros_like(merged)
            for task_vector, weight in zip(self.task_vectors, self.weights):
                product.add_((merged @ task_vector.mT) @ task_vector, alpha=weight)
        return product.sub_(self.target).mul_(2)


def wudi_matrix(task_vectors: list[torch.Tensor], iterations: int, lr: float) -> torch.Tensor:
    """WUDI's merged task vector for one weight matrix: Adam on L from Σᵢ τᵢ."""
    merged = torch.zeros_like(task_vectors[0])
    for task_vector in task_vectors:
        merged.add_(task_vector)
    gradient = InterferenceGradient(task_vectors)
    if iterations == 0 or gradient.empty:
        return merged
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    for _ in range(iterations):
        merged.grad = gradient(merged)
        optimizer.step()
    merged.grad = None
    return merged


@register_method(
    "wudi",
    params=[
        Param("iterations", 300, kind="int", low=0, help="Adam steps (the paper's 300; 0 gives task arithmetic)"),
        Param("lr", 1e-5, low=0.0, low_open=True, help="Adam learning rate (the paper's 1e-5)"),
    ],
    base=BaseUse.REQUIRED,
    math="per matrix: τ = argmin Σᵢ ‖(τ − τᵢ)τᵢᵀ‖²/‖τᵢ‖² by Adam from Σᵢτᵢ; θ_base + τ",
    reference="Cheng et al. 2025, Whoever Started the Interference Should End It (WUDI-merging, ICML 2025, arXiv:2503.08099)",
    aliases=("wudi_merging",),
    notes=(
        "Non-matrix tensors: mean task vector. Each step costs one product of the matrix with a cols x cols "
        "matrix: cheap on a GPU (--device cuda), slow for 7B-scale matrices on a CPU (see docs/methods.md)."
    ),
)
def wudi(tensors: list[torch.Tensor], base: torch.Tensor, *, iterations: int, lr: float) -> torch.Tensor:
    task_vectors = [tensor - base for tensor in tensors]
    merged = wudi_matrix(task_vectors, iterations, lr) if base.ndim == 2 else mean_task_vector(task_vectors)
    return merged.add_(base)
