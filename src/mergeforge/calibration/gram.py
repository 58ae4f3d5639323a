"""Gram matrices of the inputs of every linear layer, for RegMean.

RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023, arXiv:2212.09849) merges each linear layer from the Gram matrix G = XᵀX of the inputs
X (one row per token) that the layer sees on calibration data. Forward hooks on every linear
layer collect them; padding positions are left out. Linear layers are ``torch.nn.Linear``
(weight ``[out, in]``) and the ``Conv1D`` of GPT-2-style models in transformers (weight ``[in, out]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mergeforge.calibration.data import Batch


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, int]]:
    """``{"<module>.weight": (module, input_dim)}`` for every linear layer; ``input_dim`` is the
    weight dimension that multiplies the input (1 for ``nn.Linear``, 0 for ``Conv1D``)."""
    layers: dict[str, tuple[torch.nn.Module, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[f"{name}.weight"] = (module, 1)
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
            layers[f"{name}.weight"] = (module, 0)
    return layers


def linear_input_grams(
    model: torch.nn.Module, batches: Sequence[Batch], progress: object | None = None
) -> dict[str, torch.Tensor]:
    """``{"<linear module>.weight": Σ_tokens x xᵀ}`` (float64, on the CPU) for every linear layer.

    The sum runs over every non-padding token of every batch (RegMean's XᵀX, unnormalised).
    Consecutive layers fed the very same input tensor (a decoder's q/k/v projections, its gate and
    up projections) share one Gram matrix object: computed once, held once. At ten SmolLM2-135M
    models that is 8.1 GB of float64 instead of 10.5.
    ``progress`` is an optional tqdm bar advanced once per batch.
    """
    grams: dict[str, torch.Tensor] = {}
    current_mask: list[torch.Tensor] = []  # the token mask of the batch being run, for the hooks
    # The last input seen, as (tensor, layer that owns its Gram): layers that share an input run
    # one after the other. The tensor is held so that identity (``is``) cannot be confused by a
    # freed tensor's reused id; holding only the last one keeps a single activation alive.
    last: list[tuple[torch.Tensor, str]] = []
    shares: dict[str, str] = {}  # layer -> the layer whose Gram it shares (same input every batch)

    def hook_for(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def record_input(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            owner = last[0][1] if last and last[0][0] is args[0] else None
            first_batch = name not in grams and name not in shares
            if owner is not None and owner != name and (first_batch or shares.get(name) == owner):
                shares[name] = owner
                return
            if name in shares:
                raise RuntimeError(f"linear_input_grams: {name} shared {shares[name]}'s input on one batch and not on another")
            last[:] = [(args[0], name)]
            inputs = args[0].detach()
            rows = inputs.reshape(-1, inputs.shape[-1])
            mask = current_mask[0].reshape(-1)
            if mask.numel() == rows.shape[0]:
                rows = rows[mask]
            rows = rows.double()
            gram = rows.T @ rows
            if name in grams:
                grams[name].add_(gram)
            else:
                grams[name] = gram

        return record_input

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, (module, _) in linear_layers(model).items()]
    try:
        with torch.no_grad():
            for batch in batches:
                current_mask[:] = [batch.attention_mask.bool()]
                last.clear()
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                if progress is not None:
                    progress.update(1)  # type: ignore[attr-defined]
    finally:
        for handle in handles:
            handle.remove()
    owned = {name: gram.cpu() for name, gram in grams.items()}
    return {name: owned[shares.get(name, name)] for name in linear_layers(model) if shares.get(name, name) in owned}
