"""Server-side aggregation as model merging, without Flower: the pure part of the strategy.

A round's client models are merged with the global model as their base, so each client's update
θᵢ − θ_global is a task vector and any catalogue method aggregates them (FedAvg, McMahan et al.
2017, arXiv:1602.05629, is ``linear`` weighted by example counts). Keeping this apart from
:mod:`mergeforge.federated.strategy` lets tests and other runtimes use it without ``flwr``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergeforge.errors import RecipeError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergeforge.federated")

StateDict = Mapping[str, "torch.Tensor"]


@dataclass(frozen=True)
class Rejection:
    """A client update left out of a round, and why (logged and reported)."""

    client: str
    reason: str


def update_problem(update: StateDict, reference: StateDict) -> str | None:
    """Why a client's model cannot be merged with the global ``reference``, or None if it can.

    Checked before merging so that one broken client costs its own update, not the round: the
    planner would refuse the whole merge on a missing tensor or a shape mismatch, and a NaN or an
    infinity would spread into every entry a weighted method touches.
    """
    import torch

    missing = [name for name in reference if name not in update]
    if missing:
        return f"missing tensor '{missing[0]}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    unexpected = [name for name in update if name not in reference]
    if unexpected:
        return f"unexpected tensor '{unexpected[0]}'"
    for name, tensor in update.items():
        if tuple(tensor.shape) != tuple(reference[name].shape):
            return f"tensor '{name}' has shape {tuple(tensor.shape)}, the global model's is {tuple(reference[name].shape)}"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"tensor '{name}' holds NaN or infinite values"
    return None


def takes_weights(method: str) -> bool:
    """Whether ``method`` has a per-model ``weight``, which then carries the example counts."""
    from mergeforge.methods import get_method

    param = get_method(method).param("weight")
    return param is not None and param.per_model


def uses_base(method: str) -> bool:
    """Whether ``method`` measures from a base (task vectors); others merge the client models
    directly, which for translation-equivariant methods (linear, median) is the same thing."""
    from mergeforge.methods import BaseUse, get_method

    return get_method(method).base != BaseUse.NONE


def check_method(method: str, parameters: Mapping[str, Any] | None) -> None:
    """Fail at construction, not in round 1, on an unknown method or parameter."""
    from mergeforge.methods import get_method

    spec = get_method(method)  # raises RecipeError naming the closest method
    for name in parameters or {}:
        if name == "weight" and takes_weights(method):
            raise RecipeError(f"aggregator '{method}': 'weight' cannot be set; the weights come from example counts")
        if spec.param(name) is None:
            raise RecipeError(f"aggregator '{method}' has no parameter '{name}'")
    if spec.calibrate is not None:
        raise RecipeError(f"aggregator '{method}' is data-aware; the server holds no data to calibrate it on")


def merge_updates(
    method: str,
    global_state: StateDict,
    client_states: Sequence[StateDict],
    example_counts: Sequence[float],
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The new global model: ``method`` over the client models, with the global model as base.

    Arguments:
        method: a catalogue method (``linear`` is FedAvg).
        global_state: the model the clients started the round from.
        client_states: the clients' models after local training (already validated).
        example_counts: each client's number of training examples; they weight methods that
            take a per-model ``weight`` (normalised to sum to 1, so FedAvg is a weighted mean).
        parameters: the method's global parameters (``density``, ``trim``, ``lambda``, ...).
        seed: the seed of random methods (DARE).

    Returns:
        The merged state dict, in the global model's dtypes.
    """
    from mergeforge.engine.api import merge_state_dicts

    if not client_states:
        raise RecipeError("merge_updates: no client model to merge")
    total = float(sum(example_counts))
    model_parameters: list[Mapping[str, Any] | None] = [None] * len(client_states)
    if takes_weights(method):
        if total <= 0:
            raise RecipeError("merge_updates: the clients' example counts sum to zero")
        model_parameters = [{"weight": float(count) / total} for count in example_counts]
    merged = merge_state_dicts(method, client_states, base=global_state if uses_base(method) else None,
                               parameters=parameters, model_parameters=model_parameters, seed=seed)
    return {name: merged[name].to(global_state[name].dtype) for name in global_state}
