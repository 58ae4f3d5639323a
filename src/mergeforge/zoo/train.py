"""Training loops of the zoo: next-token pretraining, full fine-tuning and LoRA fine-tuning.

Plain PyTorch over a Hugging Face ``LlamaForCausalLM``: AdamW, linear warm-up then cosine decay,
gradient clipping. Everything random draws from generators seeded by the caller, and the zoo runs
with a fixed thread count, so one seed gives the same bytes.

Sequences are ``<bos> prompt answer <eos>``, right-padded; right padding needs no attention mask
under a causal model (pads come after every real token). Pretraining puts the loss on every token;
fine-tuning only on the answer and its end-of-sequence token. The output head is applied only at
the positions that carry a loss: for a 49k-token vocabulary it is a large share of a step, and
fine-tuning scores a handful of answer tokens per sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergeforge.tasks.encoding import encode_answers, encode_prompts

IGNORE_INDEX = -100  # the label value Hugging Face's causal-LM loss skips


@dataclass
class EncodedData:
    """A padded batch of training sequences and their labels."""

    input_ids: torch.Tensor  # [examples, max_length], right-padded
    labels: torch.Tensor  # same shape; IGNORE_INDEX where no loss is taken
    lengths: torch.Tensor  # [examples], real length of each sequence

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode_training_data(
    tokenizer: Any, examples: Sequence[tuple[str, str]], loss_on_prompt: bool, chat: bool = False,
    system: str | None = None,
) -> EncodedData:
    """Encode ``(prompt, answer)`` pairs; ``loss_on_prompt`` puts the loss on the prompt too;
    ``chat`` sends each prompt as a user message in the tokenizer's chat template."""
    prompts = encode_prompts(tokenizer, [prompt for prompt, _ in examples], chat, system)
    answers = encode_answers(tokenizer, [answer for _, answer in examples])
    max_length = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    input_ids = torch.full((len(examples), max_length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), max_length), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.empty(len(examples), dtype=torch.long)
    for row, (prompt_ids, answer_ids) in enumerate(zip(prompts, answers, strict=True)):
        sequence = prompt_ids + answer_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        # The first token (beginning of sequence) is never predicted.
        first_label = 1 if loss_on_prompt else len(prompt_ids)
        labels[row, first_label : len(sequence)] = input_ids[row, first_label : len(sequence)]
        lengths[row] = len(sequence)
    return EncodedData(input_ids, labels, lengths)


def concat_data(parts: Sequence[EncodedData], pad_token_id: int) -> EncodedData:
    """One dataset from several (e.g. all tasks for the multi-task model)."""
    max_length = max(part.input_ids.shape[1] for part in parts)

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, max_length - tensor.shape[1]), value=value)

    return EncodedData(
        torch.cat([pad(part.input_ids, pad_token_id) for part in parts]),
        torch.cat([pad(part.labels, IGNORE_INDEX) for part in parts]),
        torch.cat([part.lengths for part in parts]),
    )


@dataclass(frozen=True)
class TrainingSchedule:
    """Optimiser settings of one training run."""

    steps: int
    learning_rate: float
    batch_size: int
    warmup_fraction: float = 0.1
    final_lr_fraction: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    # Run each batch as two passes of similar lengths (same gradient, less padding): for batches
    # that mix tasks of very different lengths, such as the multi-task model's.
    split_by_length: bool = False

    def lr_at(self, step: int) -> float:
        warmup = max(1, int(self.steps * self.warmup_fraction))
        if step < warmup:
            return self.learning_rate * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.learning_rate * (self.final_lr_fraction + (1 - self.final_lr_fraction) * cosine)


def _batches(data: EncodedData, schedule: TrainingSchedule, seed: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Epochs of a seeded permutation; each batch is one pass trimmed to its longest sequence or,
    with ``split_by_length``, the two passes over its shorter and longer rows that pad least."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(schedule.steps):
        if order.numel() < schedule.batch_size:
            order = torch.cat([order, torch.randperm(len(data), generator=generator)])
        index, order = order[: schedule.batch_size], order[schedule.batch_size :]
        parts = [index]
        if schedule.split_by_length and len(index) > 1:
            lengths, by_length = data.lengths[index].sort(stable=True)
            padded = [k * int(lengths[k - 1]) + (len(index) - k) * int(lengths[-1]) for k in range(1, len(index))]
            split = 1 + min(range(len(padded)), key=padded.__getitem__)
            if padded[split - 1] < len(index) * int(lengths[-1]):
                parts = [index[by_length[:split]], index[by_length[split:]]]
        yield [(data.input_ids[part, : int(data.lengths[part].max())], data.labels[part, : int(data.lengths[part].max())])
               for part in parts]


def loss_on_labels(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The next-token cross-entropy over the positions whose label is not IGNORE_INDEX (their
    mean, or with ``reduction="sum"`` their sum), with the output head applied at those positions
    only (the mean is the model's own loss)."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state[:, :-1]
    logits = model.get_output_embeddings()(hidden[scored])
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored], reduction=reduction)


def train(
    model: torch.nn.Module,
    data: EncodedData,
    schedule: TrainingSchedule,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``model`` in place on ``data``; returns the mean loss of the last 10% of steps.

    Only parameters with ``requires_grad`` are trained (LoRA freezes the rest).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (5x faster than the loop for a 135M model on a CPU)
    optimizer = torch.optim.AdamW(
        parameters, lr=schedule.learning_rate, weight_decay=schedule.weight_decay, betas=(0.9, 0.98), fused=True
    )
    model.train()
    tail: list[float] = []
    tail_start = int(schedule.steps * 0.9)
    for step, passes in enumerate(_batches(data, schedule, seed)):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        if len(passes) == 1:
            loss = loss_on_labels(model, *passes[0])
            loss.backward()
        else:  # the batch's mean loss, as the sum over its passes' scored tokens
            scored = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in passes)
            loss = torch.zeros(())
            for input_ids, labels in passes:
                part = loss_on_labels(model, input_ids, labels, reduction="sum") / scored
                part.backward()
                loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(parameters, schedule.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if step >= tail_start:
            tail.append(value)
        if on_step is not None:
            on_step(step, value)
    model.eval()
    return sum(tail) / max(1, len(tail))
