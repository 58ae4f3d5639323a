"""Scores: exact match / contains on generated text, and the loss of the answer given the prompt.

The loss is the mean negative log-likelihood per answer token (end-of-sequence included) under
teacher forcing, and perplexity is its exponential: the quantities lm-evaluation-harness reports
for a continuation, computed over the whole task rather than averaged per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Upper bound on the logits tensor of one loss batch (elements), so a large vocabulary cannot
# exhaust memory: the batch shrinks instead.
_MAX_LOGIT_ELEMENTS = 1 << 27


def normalise(text: str, stop: Sequence[str] = ()) -> str:
    """Cut ``text`` at the first stop string and strip surrounding whitespace."""
    for marker in stop:
        if marker and marker in text:
            text = text[: text.index(marker)]
    return text.strip()


def is_correct(output: str, answer: str, metric: str) -> bool:
    if metric == "exact_match":
        return output == answer.strip()
    if metric == "contains":
        return answer.strip() in output
    raise ValueError(f"unknown metric {metric!r}")


def _answer_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   positions: list[torch.Tensor]) -> list[torch.Tensor]:
    """The logits at ``positions[row]`` of each row. A transformers causal LM runs its decoder,
    then its output head at those positions only (a 49k-token head over every prompt token is a
    large share of the pass); other models give their full logits."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module) and decoder is not model:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = head(torch.cat([hidden[row, index] for row, index in enumerate(positions)]))
        return list(torch.split(picked.float(), [len(index) for index in positions]))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return [logits[row, index].float() for row, index in enumerate(positions)]


def answer_scores(
    model: Any,  # a transformers causal LM
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 64,
) -> list[tuple[float, int, bool]]:
    """One teacher-forced pass. Per example: the sum of the answer tokens' negative
    log-likelihood, their number, and whether every answer token is the model's top choice
    (then greedy decoding emits exactly the answer: its prefix is always the answer's own)."""
    device = next(model.parameters()).device
    results: list[tuple[float, int, bool]] = [(0.0, 0, False)] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(answer_ids[i]))
    vocab_size = int(model.config.vocab_size)
    start = 0
    while start < len(order):
        # `order` is sorted by length, so the last candidate of the batch is its longest.
        last = order[min(len(order), start + batch_size) - 1]
        longest = len(prompt_ids[last]) + len(answer_ids[last])
        rows = max(1, min(batch_size, _MAX_LOGIT_ELEMENTS // max(1, longest * vocab_size)))
        chunk = order[start : start + rows]
        start += rows
        width = max(len(prompt_ids[i]) + len(answer_ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        positions = []
        for row, index in enumerate(chunk):
            sequence = list(prompt_ids[index]) + list(answer_ids[index])
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, : len(sequence)] = 1
            # The logits at position t predict token t + 1.
            prompt_length = len(prompt_ids[index])
            positions.append(torch.arange(prompt_length - 1, prompt_length - 1 + len(answer_ids[index])))
        with torch.no_grad():
            logits = _answer_logits(model, input_ids.to(device), attention_mask.to(device), [p.to(device) for p in positions])
        for row, index in enumerate(chunk):
            answer = answer_ids[index]
            if not answer:
                continue
            targets = torch.tensor(answer, dtype=torch.long, device=logits[row].device)
            log_probs = torch.log_softmax(logits[row], dim=-1)
            nll = -log_probs[torch.arange(len(answer), device=targets.device), targets].sum()
            results[index] = (float(nll), len(answer), bool((logits[row].argmax(dim=-1) == targets).all()))
    return results
