"""The calibrated router (``gate_mode: calibrated``, a mergeforge extension of mergekit-moe's modes).

mergekit's ``hidden`` rows are the base's mean hidden states *before* attention and its norm,
with no scale fitted, while a Mixtral router sees the *post-attention-norm* hidden state of the
MoE itself. Here each layer's router is fitted on exactly that input:

1. layer by layer, from the first: the assembled MoE (routers already fitted below ``l``) runs the
   experts' prompts, and the input of layer ``l``'s MoE block is taken at every prompt token;
2. the router rows are the ridge regression of the one-hot expert labels on those inputs,
   ``W = Yᵀ X (Xᵀ X + λ·mean(diag Xᵀ X)·I)⁻¹`` (closed form, as DUME fits its routers); ridge
   rather than logistic regression because it needs one linear solve per layer and no iterations,
   and rather than LDA because it needs no per-class covariance on a few hundred tokens;
3. a temperature per layer, folded into the rows, minimises the cross-entropy of the softmax
   over the experts on the same tokens (a scale that ``hidden`` leaves to chance).

Tokens the experts' prompts all share (a chat template's opening) carry no label signal; they are
fitted like the others, and their targets average out.
"""

from __future__ import annotations

import math
from typing import Any

import torch

RIDGE = 1e-2
TEMPERATURES = tuple(2.0**k for k in range(-4, 11))  # searched on a log grid, then refined


class _Stop(Exception):
    """Raised by the capture hook: nothing above the last block asked for is needed."""


def block_inputs(model: Any, blocks: list[torch.nn.Module], encoded: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The input of each of ``blocks`` (in order, from the bottom) at every real token of the
    prompts, ``[tokens, hidden]`` each, from one forward pass that stops after the last of them."""
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach())
        if len(captured) == len(blocks):
            raise _Stop

    handles = [block.register_forward_pre_hook(hook) for block in blocks]
    try:
        with torch.no_grad():
            model(**encoded)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    mask = encoded["attention_mask"].bool()
    return [states.reshape(mask.shape + (-1,))[mask].float() for states in captured]


def ridge_rows(inputs: torch.Tensor, labels: torch.Tensor, experts: int, ridge: float = RIDGE) -> torch.Tensor:
    """Rows ``W`` [experts, hidden] of the ridge regression of one-hot ``labels`` on ``inputs``."""
    x = inputs.double()
    targets = torch.nn.functional.one_hot(labels, experts).double()
    gram = x.T @ x
    regulariser = ridge * gram.diagonal().mean().clamp_min(1e-12)
    solution = torch.linalg.solve(gram + regulariser * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ targets)
    return solution.T.float()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The scale of ``logits`` that minimises the softmax cross-entropy of ``labels``."""

    def loss(scale: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits * scale, labels))

    best = min(TEMPERATURES, key=loss)
    low, high = math.log(best / 2), math.log(best * 2)
    for _ in range(30):  # golden-section refinement in log scale
        a, b = low + 0.382 * (high - low), low + 0.618 * (high - low)
        if loss(math.exp(a)) < loss(math.exp(b)):
            high = b
        else:
            low = a
    return math.exp((low + high) / 2)


def calibrate_routers(model: Any, tokenizer: Any, prompts: list[list[str]], ridge: float = RIDGE) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fit every layer's router of the loaded MoE ``model`` (in place) on ``prompts[e]``, the
    prompts of expert ``e``. Returns the rows ``[layers, experts, hidden]`` and a report.

    The prompts' residual stream is carried from layer to layer: layer ``l`` runs on the stream
    as the layers below (with their routers fitted) left it, up to its router for the fit, then
    whole with the fitted router, so the fit costs about one forward pass, not one per layer."""
    from mergeforge.moe.gates import encode_prompts
    from mergeforge.moe.selftest import moe_block

    experts = len(prompts)
    encoded = [encode_prompts(tokenizer, group) for group in prompts]
    decoder = model.model
    layers = decoder.layers
    with torch.no_grad():
        streams = [decoder.embed_tokens(batch["input_ids"]) for batch in encoded]
    rows: list[torch.Tensor] = []
    report: dict[str, Any] = {"ridge": ridge, "layers": []}
    try:
        for layer in layers:
            block = moe_block(layer)
            decoder.layers = torch.nn.ModuleList([layer])
            inputs = [block_inputs(decoder, [block], {"inputs_embeds": stream, "attention_mask": batch["attention_mask"]})[0]
                      for stream, batch in zip(streams, encoded, strict=True)]
            x = torch.cat(inputs)
            labels = torch.cat([torch.full((len(part),), e, dtype=torch.long) for e, part in enumerate(inputs)])
            weights = ridge_rows(x, labels, experts, ridge)
            scale = fit_temperature(x @ weights.T, labels)
            weights = weights * scale
            router: torch.Tensor = getattr(block.gate, "weight")  # noqa: B009 - a module's parameter, untyped
            with torch.no_grad():
                router.copy_(weights.to(router.dtype))
            predicted = (x @ weights.T).argmax(-1)
            report["layers"].append({"temperature": scale, "token_accuracy": float((predicted == labels).float().mean()),
                                     "tokens": len(labels)})
            rows.append(weights)
            streams = [_layer_output(decoder, layer, stream, batch["attention_mask"]) for stream, batch in zip(streams, encoded, strict=True)]
    finally:
        decoder.layers = layers
    return torch.stack(rows), report


def _layer_output(decoder: Any, layer: torch.nn.Module, stream: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The residual stream leaving ``layer`` (before the final norm), run as the decoder's only
    layer on the ``stream`` entering it: positions and the causal mask are the decoder's own."""
    captured: list[torch.Tensor] = []

    def take(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handle = layer.register_forward_hook(take)
    try:
        with torch.no_grad():
            decoder(inputs_embeds=stream, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return captured[0]
