"""Scores: exact match / contains on generated text, and the loss of the answer given the prompt.

The loss is the mean negative log-likelihood per answer token (end-of-sequence included) under
teacher forcing, and perplexity is its exponential: the quantities lm-evaluation-harness reports
for a continuation, computed over the whole task rather than averaged per example.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

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


def _decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """A transformers causal LM's decoder and output head, so the head can run where it is needed."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Module) and decoder is not model:
        return decoder, head
    return None


def answer_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: list[torch.Tensor], prefix: Any = None) -> list[torch.Tensor]:
    """The logits at ``positions[row]`` of each row. A transformers causal LM runs its decoder,
    then its output head at those positions only (a 49k-token head over every prompt token is a
    large share of the pass); a model with its own ``answer_logits`` method (the bench's output
    ensemble) is asked for them; other models give their full logits. ``prefix`` is the
    key/value cache of tokens that precede every row (see :func:`_shared_prefix`)."""
    if hasattr(model, "answer_logits"):
        return model.answer_logits(input_ids, attention_mask, positions)
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        extra: dict[str, Any] = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(input_ids.shape[0])
            attention_mask = torch.cat([attention_mask.new_ones((input_ids.shape[0], cache.get_seq_length())), attention_mask], 1)
            extra = {_cache_argument(decoder): cache, "use_cache": True}
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        picked = head(torch.cat([hidden[row, index] for row, index in enumerate(positions)]))
        return list(torch.split(picked.float(), [len(index) for index in positions]))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return [logits[row, index].float() for row, index in enumerate(positions)]


def _cache_argument(decoder: torch.nn.Module) -> str:
    """The decoder's name for its key/value cache (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


# Chat prompts share their template's opening and the system message (14-22 tokens of SmolLM2's
# 33-56): the decoder runs over them once, and every batch starts from their cache.
MIN_SHARED_PREFIX = 4


def _shared_prefix(model: Any, prompt_ids: Sequence[Sequence[int]], device: torch.device) -> tuple[int, Any]:
    """The length of the token prefix every prompt shares (each keeps at least its last token),
    and the decoder's key/value cache over it; ``(0, None)`` when it is short or the model keeps
    no cache that batches can share."""
    parts = _decoder_and_head(model)
    if parts is None or not prompt_ids:
        return 0, None
    length = min(len(os.path.commonprefix([list(ids) for ids in prompt_ids])), min(len(ids) for ids in prompt_ids) - 1)
    if length < MIN_SHARED_PREFIX:
        return 0, None
    with torch.no_grad():
        output = parts[0](input_ids=torch.tensor([list(prompt_ids[0][:length])], device=device), use_cache=True)
    cache = getattr(output, _cache_argument(parts[0]), None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave") or not hasattr(cache, "get_seq_length"):
        return 0, None
    return length, cache


class AnswerScore(NamedTuple):
    """One example's teacher-forced pass over its reference answer."""

    nll: float  # the sum of the answer tokens' negative log-likelihood
    tokens: int  # their number
    first_miss: int | None  # the first answer position whose token is not the model's top choice (None: all are)
    predicted: int | None  # the model's top choice there

    @property
    def top(self) -> bool:
        """Every answer token is the model's top choice: greedy decoding emits exactly the answer."""
        return self.first_miss is None


def answer_scores(
    model: Any,  # a transformers causal LM
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 64,
    share_prefix: bool = True,
) -> list[AnswerScore]:
    """One teacher-forced pass: an :class:`AnswerScore` per example. Greedy decoding follows the
    answer up to its first miss, where it emits ``predicted``: its prefix is always the answer's own.
    With ``share_prefix``, the tokens all prompts start with run once (see :func:`_shared_prefix`)."""
    device = next(model.parameters()).device
    results = [AnswerScore(0.0, 0, 0, None)] * len(prompt_ids)
    shared, prefix = _shared_prefix(model, prompt_ids, device) if share_prefix else (0, None)
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
        # Each row holds the sequence after the shared prefix (whose cache stands for it), right-padded.
        width = max(len(prompt_ids[i]) + len(answer_ids[i]) for i in chunk) - shared
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        positions = []
        for row, index in enumerate(chunk):
            sequence = (list(prompt_ids[index]) + list(answer_ids[index]))[shared:]
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, : len(sequence)] = 1
            # The logits at position t predict token t + 1.
            prompt_length = len(prompt_ids[index]) - shared
            positions.append(torch.arange(prompt_length - 1, prompt_length - 1 + len(answer_ids[index])))
        with torch.no_grad():
            logits = answer_logits(model, input_ids.to(device), attention_mask.to(device), [p.to(device) for p in positions],
                                    prefix)
        for row, index in enumerate(chunk):
            answer = answer_ids[index]
            if not answer:
                continue
            targets = torch.tensor(answer, dtype=torch.long, device=logits[row].device)
            log_probs = torch.log_softmax(logits[row], dim=-1)
            nll = -log_probs[torch.arange(len(answer), device=targets.device), targets].sum()
            misses = (logits[row].argmax(dim=-1) != targets).nonzero()
            first = int(misses[0]) if len(misses) else None
            predicted = int(logits[row][first].argmax()) if first is not None else None
            results[index] = AnswerScore(float(nll), len(answer), first, predicted)
    return results


def forced_output(tokenizer: Any, answer: str, answer_ids: Sequence[int], score: AnswerScore, metric: str,
                  stop: Sequence[str], max_new_tokens: int) -> tuple[str, bool] | None:
    """The verdict greedy decoding would reach, when the teacher-forced pass already decides it:
    ``(output, complete)``, where ``output`` is the normalised generation (``complete``) or its
    first tokens (a wrong answer's start); ``None`` when only decoding can tell.

    Greedy decoding emits the answer's tokens up to ``score.first_miss`` and then ``score.predicted``:
    - no miss: the output is the answer itself (if its tokens fit in ``max_new_tokens``);
    - end of sequence at the miss: the output is the answer's prefix;
    - an exact-match task whose decoded text, with the predicted token, has already left the
      answer's text (and holds no stop string, whole or begun, that could still cut it): wrong,
      whatever follows. A token that only starts another tokenisation of the answer, a partial
      UTF-8 character, or a special token is left to decoding.
    """
    if score.first_miss is None:
        eos = 1 if tokenizer.eos_token_id is not None else 0
        return (normalise(answer, stop), True) if len(answer_ids) - eos <= max_new_tokens else None
    miss, predicted = score.first_miss, score.predicted
    if predicted is None or miss >= max_new_tokens:
        return None
    prefix = list(answer_ids[:miss])
    if predicted == tokenizer.eos_token_id:
        return normalise(tokenizer.decode(prefix, skip_special_tokens=True), stop), True
    if metric != "exact_match" or predicted in set(tokenizer.all_special_ids):
        return None
    text = tokenizer.decode([*prefix, predicted], skip_special_tokens=True)
    if "\ufffd" in text or any(marker and _may_stop(text, marker) for marker in stop):
        return None
    head = text.strip()
    return None if not head or answer.strip().startswith(head) else (head, False)


def _may_stop(text: str, marker: str) -> bool:
    """``marker`` occurs in ``text``, or ``text`` ends with a beginning of it."""
    return marker in text or any(text.endswith(marker[:k]) for k in range(1, len(marker)))
