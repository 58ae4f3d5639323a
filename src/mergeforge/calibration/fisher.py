"""The diagonal empirical Fisher information of a causal language model.

Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
arXiv:2111.09832) weighs each parameter of each model by its Fisher information. We use the
diagonal empirical Fisher over N calibration examples (x_n, y_n)::

    F[j] = 1/N · Σ_n ( ∂/∂θ_j log p_θ(y_n | x_n) )²

where log p_θ(y | x) is the summed log-likelihood of the scored tokens (the answer given the
prompt, or every token of plain text). The square is of each example's own gradient, so each
example gets its own backward pass (the square of a batch gradient would be a different thing).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from mergeforge.calibration.data import EncodedExample


def sequence_log_likelihood(model: torch.nn.Module, input_ids: torch.Tensor, scored_mask: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over scored tokens t ≥ 1 of log p(token_t | tokens before t), one value per row.

    The output head runs only at the positions that predict a scored token (transformers'
    ``logits_to_keep``, where the model's forward takes it): the answer's few tokens, not the
    prompt's, for a vocabulary-sized head and its softmax. The value and its gradient are the
    same as from the full logits, since the other positions' terms are zero.
    """
    predicting = scored_mask[:, 1:].any(0).nonzero().flatten()  # position t - 1 predicts token t
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": predicting} if keeps else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    if not keeps:
        logits = logits[:, predicting]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    targets = input_ids[:, predicting + 1]
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * scored_mask[:, predicting + 1].to(token_log_probs.dtype)).sum(-1)


def diagonal_fisher(
    model: torch.nn.Module, examples: Sequence[EncodedExample], device: torch.device, progress: object | None = None
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of every floating-point parameter, on the CPU in float32.

    ``progress`` is an optional tqdm bar advanced once per example.
    """
    parameters = {name: p for name, p in model.named_parameters() if p.is_floating_point()}
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    counted = 0
    for example in examples:
        if not any(example.scored[1:]):
            continue  # a single-token example has nothing to predict
        input_ids = torch.tensor([example.input_ids], dtype=torch.long, device=device)
        scored = torch.tensor([example.scored], dtype=torch.bool, device=device)
        model.zero_grad(set_to_none=True)
        sequence_log_likelihood(model, input_ids, scored).sum().backward()
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                fisher[name].add_(parameter.grad.float().square())
        counted += 1
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
    model.zero_grad(set_to_none=True)
    if counted:
        for value in fisher.values():
            value.div_(counted)
    return {name: value.cpu() for name, value in fisher.items()}
