"""WUDI-merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors", arXiv:2503.08099).

The paper shows that a linear layer's task vector τᵢ (rows: output units) lies approximately in
the span of that task's inputs, so the rows of τᵢ can stand in for the task's data. The merged
task vector τ of each weight matrix minimises the interference it causes on every task's inputs,

    L(τ) = Σᵢ ‖(τ − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F,

starting from the task-arithmetic sum Σᵢ τᵢ and running Adam (lr 1e-5, 300 steps in the paper),
and the model is θ_base + τ (no scaling coefficient). Tensors that are not matrices get the mean
task vector, as in the paper's implementation.

The gradient 2 Σᵢ (τ − τᵢ)τᵢᵀτᵢ / ‖τᵢ‖² is computed directly (no autograd), so each Adam step
costs two matrix products per task instead of a forward and a backward pass.
"""

from __future__ import annotations

import torch

from mergeforge.methods.registry import BaseUse, Param, register_method
from mergeforge.methods.tsv import mean_task_vector

# torch.optim.Adam's defaults, which the paper's implementation uses.
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


class InterferenceGradient:
    """∇L(τ) = 2 Σᵢ wᵢ (τ − τᵢ) τᵢᵀ τᵢ with wᵢ = 1/‖τᵢ‖².

    The difference τ − τᵢ is formed first, as the paper's loss does: expanding the sum into
    τA − B cancels catastrophically near the optimum, and Adam turns that rounding noise into full
    learning-rate steps. Each task's product is associated the cheaper way: with the cached
    cols x cols Gram matrix τᵢᵀτᵢ when the matrix is tall enough for it to be small.
    """

    def __init__(self, task_vectors: list[torch.Tensor]):
        self.task_vectors = [t for t in task_vectors if bool(t.any())]  # a zero task vector has no inputs
        self.weights = [2.0 / float(t.square().sum()) for t in self.task_vectors]
        rows, cols = task_vectors[0].shape
        # (τ − τᵢ)·Gᵢ costs rows·cols² per step; ((τ − τᵢ)τᵢᵀ)τᵢ costs 2·rows²·cols.
        use_gram = cols < 2 * rows
        self.grams = [t.mT @ t if use_gram else None for t in self.task_vectors]

    @property
    def empty(self) -> bool:
        return not self.task_vectors

    def __call__(self, merged: torch.Tensor) -> torch.Tensor:
        gradient = torch.zeros_like(merged)
        for task_vector, weight, gram in zip(self.task_vectors, self.weights, self.grams):
            difference = merged - task_vector
            product = difference @ gram if gram is not None else (difference @ task_vector.mT) @ task_vector
            gradient.add_(product, alpha=weight)
        return gradient


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
        "Non-matrix tensors: mean task vector. Each step costs matrix products per task: cheap on a GPU "
        "(--device cuda), slow for 7B-scale matrices on a CPU (see docs/methods.md)."
    ),
)
def wudi(tensors: list[torch.Tensor], base: torch.Tensor, *, iterations: int, lr: float) -> torch.Tensor:
    task_vectors = [tensor - base for tensor in tensors]
    merged = wudi_matrix(task_vectors, iterations, lr) if base.ndim == 2 else mean_task_vector(task_vectors)
    return merged.add_(base)
