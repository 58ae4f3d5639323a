"""How a (prompt, answer) pair becomes token ids, shared by the evaluator and the zoo's training.

The prompt is encoded with the tokenizer's special tokens (a beginning-of-sequence token where the
tokenizer adds one); the answer is encoded without them and followed by the end-of-sequence token,
so the model is scored (and trained) on producing the answer and then stopping. Encoding the two
parts separately is the usual choice for continuation scoring (as lm-evaluation-harness does): the
boundary between prompt and answer never moves with the tokenizer's merges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens."""
    if not prompts:
        return []
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]


def encode_answers(tokenizer: Any, answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each answer, without special tokens, followed by end-of-sequence if any."""
    if not answers:
        return []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return [list(ids) + eos for ids in encoded]
