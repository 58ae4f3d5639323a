"""AdaMerging: task arithmetic with merging coefficients learned by entropy minimisation.

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024,
arXiv:2310.02575). The merged tensor is θ_0 + Σ_k λ_k τ_k with τ_k = θ_k − θ_0; the λ (one per
model, or one per model and parameter tensor with ``layer_wise``) are learned before the merge
by minimising the entropy of the merged model's next-token predictions on the unlabelled
calibration prompts (see :mod:`mergeforge.calibration.adamerging`): Adam from λ = 0.3, λ kept in
[0, 1]. The defaults (200 steps at lr 2.5e-3) let each λ travel as far as the paper's 500 steps at
lr 1e-3 (Adam moves a parameter by at most about lr per step), in fewer passes.

Tensors that are not parameters of the loaded model (e.g. saved buffers) take each model's mean
learned λ; with ``steps: 0`` (or no calibration statistics) every λ is ``init_lambda``, which is
task arithmetic with that scaling.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from mergeforge.errors import MethodError
from mergeforge.methods.registry import BaseUse, Param, register_method

if TYPE_CHECKING:
    from mergeforge.calibration.context import CalibrationContext

log = logging.getLogger("mergeforge")


def learn_lambdas(context: CalibrationContext) -> dict[str, list[float]]:
    """Load the base and the task vectors, learn λ on every model's prompts, key λ by tensor."""
    from mergeforge.calibration.adamerging import learn_coefficients
    from mergeforge.calibration.data import CalibrationError

    params = context.params
    assert context.base_ref is not None
    module = context.load_model(context.base_ref)
    base = {name: p.detach() for name, p in module.named_parameters() if p.is_floating_point()}
    # Every model's task vector of a tensor in one [n_models, *shape] block, filled model by model.
    task_vectors = {name: value.new_empty((len(context.input_refs), *value.shape)) for name, value in base.items()}
    for index, ref in enumerate(context.input_refs):
        model = context.load_model(ref)
        parameters = dict(model.named_parameters())
        missing = [name for name in base if name not in parameters or parameters[name].shape != base[name].shape]
        if missing:
            raise CalibrationError(f"model '{ref}': parameter '{missing[0]}' is missing or differs in shape from the base's")
        with torch.no_grad():
            for name, value in base.items():
                torch.sub(parameters[name], value, out=task_vectors[name][index])
        del model, parameters
    batches = context.union_batches(prompts_only=True)
    with context.progress_bar(params["steps"], "adamerging") as bar:
        learned = learn_coefficients(
            module, base, task_vectors, batches, layer_wise=params["layer_wise"], init_lambda=params["init_lambda"],
            steps=params["steps"], lr=params["lr"], progress=bar,
        )
    if learned.entropy:
        log.info("adamerging: prediction entropy %.4f at λ=%.2f, %.4f after %d steps",
                 learned.entropy[0], params["init_lambda"], learned.final_entropy, params["steps"])
    statistics = {name: learned.for_tensor(name) for name in learned.names}
    model_means = learned.coefficients.mean(0).tolist()
    for name in context.tensor_names:
        statistics.setdefault(name, model_means)
    return statistics


@register_method(
    "adamerging",
    params=[
        Param("layer_wise", True, kind="bool", help="one λ per model and parameter tensor (else one per model: task-wise)"),
        Param("init_lambda", 0.3, low=0, high=1, help="starting value of every λ (the paper's 0.3)"),
        Param("steps", 200, kind="int", low=0, high=100000, help="Adam steps of entropy minimisation (one batch each)"),
        Param("lr", 2.5e-3, low=0, low_open=True, help="Adam learning rate for λ (λ moves at most about lr per step)"),
    ],
    base=BaseUse.REQUIRED,
    math="θ₀ + Σₖ λₖ·(θₖ − θ₀), λ ∈ [0,1] (per model, or per model and tensor) minimising next-token entropy on prompts",
    citation="AdaMerging, Yang et al. ICLR 2024 (arXiv:2310.02575)",
    calibrate=learn_lambdas,
    notes="Data-aware: needs a top-level 'calibration:' field (prompts; answers are ignored). Holds the base and every "
    "task vector in memory while it learns λ. layer_wise, init_lambda, steps and lr are read once, from the "
    "top-level parameters.",
)
def adamerging(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    layer_wise: bool,
    init_lambda: float,
    steps: int,
    lr: float,
    statistics: list[float] | None = None,
) -> torch.Tensor:
    assert base is not None
    if statistics is not None and len(statistics) != len(tensors):
        raise MethodError(f"adamerging: statistics for {len(statistics)} models, but {len(tensors)} inputs")
    coefficients = statistics if statistics is not None else [init_lambda] * len(tensors)
    merged = base.clone()
    for tensor, coefficient in zip(tensors, coefficients):
        merged.add_(tensor - base, alpha=float(coefficient))
    return merged
