"""Batched greedy generation with left padding.

Prompts are grouped by length (so little padding is wasted), left-padded with an attention mask,
and decoded greedily by ``model.generate``; the position of every prompt's last token is then the
same, which is what batched decoding needs. Each output is cut at the first end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def greedy_generate(
    model: Any,  # a transformers causal LM
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
    batch_size: int = 64,
) -> list[list[int]]:
    """The greedy continuation (token ids, end-of-sequence excluded) of every prompt, in order."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            ids = prompt_ids[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
        for row, index in enumerate(chunk):
            continuation = generated[row, width:].tolist()
            # generate pads a row only after its end-of-sequence token, so this cut drops both.
            if eos_token_id is not None and eos_token_id in continuation:
                continuation = continuation[: continuation.index(eos_token_id)]
            outputs[index] = continuation
    return outputs
