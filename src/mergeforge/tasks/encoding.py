"""How a (prompt, answer) pair becomes token ids, shared by the evaluator and the zoo's training.

The prompt is encoded with the tokenizer's special tokens (a beginning-of-sequence token where the
tokenizer adds one); the answer is encoded without them and followed by the end-of-sequence token,
so the model is scored (and trained) on producing the answer and then stopping. Encoding the two
parts separately is the usual choice for continuation scoring (as lm-evaluation-harness does): the
boundary between prompt and answer never moves with the tokenizer's merges.

A chat task (``chat: true`` in its spec) sends each prompt as a user message, after the task's
system message, through the tokenizer's chat template with the generation prompt appended; its
answer is then followed by the template's end-of-turn token, which is the chat model's
end-of-sequence token (``<|im_end|>`` for ChatML templates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = False, system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens (or in its chat template)."""
    if not prompts:
        return []
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            from mergeforge.tasks.folders import TaskError

            raise TaskError(f"{name}: the tokenizer has no chat template, and the task asks for one (chat: true)")
        head = [{"role": "system", "content": system}] if system is not None else []
        texts = [tokenizer.apply_chat_template([*head, {"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True) for prompt in prompts]
        # The template writes its own special tokens; adding the tokenizer's would double a BOS.
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]


def encode_answers(tokenizer: Any, answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each answer, without special tokens, followed by end-of-sequence if any."""
    if not answers:
        return []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    return [list(ids) + eos for ids in encoded]
