"""Calibration data: read examples from JSONL files or task folders, tokenise, batch.

A calibration JSONL file holds one JSON object per line with either ``text`` (every token is
scored) or ``prompt`` and optionally ``answer`` (the answer is scored given the prompt; methods
that need unlabelled inputs, like AdaMerging, use the prompt only). A task folder is the
evaluator's format (``spec.json`` + ``<split>.jsonl``, see :mod:`mergeforge.tasks.folders`).

Prompts and answers are tokenised as the evaluator and the zoo's training do
(:mod:`mergeforge.tasks.encoding`): the prompt with the tokenizer's special tokens, the answer
without them and followed by end-of-sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeforge.calibration.config import CalibrationConfig
from mergeforge.errors import MergeforgeError, RecipeError
from mergeforge.tasks.jsonl import json_records


class CalibrationError(MergeforgeError):
    """Calibration data is missing or malformed, or the models cannot be run on it."""


@dataclass(frozen=True)
class CalibrationExample:
    """One calibration example: ``prompt`` alone is plain text (every token scored)."""

    prompt: str
    answer: str | None = None
    chat: bool = False  # the prompt is a user message, sent in the tokenizer's chat template
    system: str | None = None  # the system message sent with it


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example; ``scored[t]`` says whether token t counts in the log-likelihood."""

    input_ids: list[int]
    scored: list[bool]
    prompt_length: int  # tokens of the prompt alone (all tokens for plain text)


@dataclass(frozen=True)
class Batch:
    """Right-padded examples: ``attention_mask`` marks real tokens, ``scored_mask`` scored ones."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.scored_mask.to(device))


def read_jsonl(path: Path, samples: int) -> list[CalibrationExample]:
    """The first ``samples`` examples of a calibration JSONL file; errors name the file and line."""
    examples: list[CalibrationExample] = []
    for where, record in json_records(path, CalibrationError, "calibration data"):
        if len(examples) >= samples:
            break
        examples.append(_example_from(record, where))
    if not examples:
        raise CalibrationError(f"{path}: no calibration examples; add JSON lines with a 'text' or 'prompt' field")
    return examples


def _example_from(record: dict[str, Any], where: str) -> CalibrationExample:
    for key in ("text", "prompt", "answer"):
        if key in record and not isinstance(record[key], str):
            raise CalibrationError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
    if "text" in record:
        if not record["text"]:
            raise CalibrationError(f"{where}: field 'text' is empty")
        return CalibrationExample(record["text"])
    if "prompt" in record:
        if not record["prompt"]:
            raise CalibrationError(f"{where}: field 'prompt' is empty")
        return CalibrationExample(record["prompt"], record.get("answer"))
    raise CalibrationError(f"{where}: missing field 'text' or 'prompt'")


def read_task_folder(folder: Path, split: str, samples: int) -> list[CalibrationExample]:
    """The first ``samples`` examples of one split of an evaluator task folder."""
    from mergeforge.tasks.folders import load_task

    task = load_task(folder)
    return [CalibrationExample(example.prompt, example.answer, task.spec.chat, task.spec.system)
            for example in task.examples(split, samples)]


def read_source(source: str, config: CalibrationConfig, relative_to: Path | None, field: str) -> list[CalibrationExample]:
    """Examples of one data source (a JSONL file or a task folder), relative to the recipe."""
    path = Path(source).expanduser()
    # As for models: relative to the recipe's folder when it exists there, else to the working directory.
    if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path
    if path.is_dir():
        return read_task_folder(path, config.split, config.samples)
    if not path.is_file():
        raise CalibrationError(f"{field}: calibration data '{source}' not found (looked at {path}); give a JSONL file or a task folder")
    return read_jsonl(path, config.samples)


def load_examples(
    config: CalibrationConfig, input_refs: Sequence[str], relative_to: Path | None = None
) -> dict[str, list[CalibrationExample]]:
    """Each input model's calibration examples: one source for all models, or one per model."""
    data = config.data
    if isinstance(data, str):
        shared = read_source(data, config, relative_to, "calibration.data")
        return {ref: shared for ref in input_refs}
    unknown = [ref for ref in data if ref not in input_refs]
    if unknown:
        raise RecipeError(
            f"calibration.data: '{unknown[0]}' is not an input model; the keys must be the input models: {', '.join(input_refs)}"
        )
    missing = [ref for ref in input_refs if ref not in data]
    if missing:
        raise RecipeError(
            f"calibration.data: no data for input model '{missing[0]}'; give one entry per input model, or one file for all"
        )
    by_source: dict[str, list[CalibrationExample]] = {}
    for ref in input_refs:
        if data[ref] not in by_source:
            by_source[data[ref]] = read_source(data[ref], config, relative_to, f"calibration.data.{ref}")
    return {ref: by_source[data[ref]] for ref in input_refs}


def encode_examples(
    tokenizer: Any, examples: Sequence[CalibrationExample], max_length: int, prompts_only: bool = False
) -> list[EncodedExample]:
    """Tokenise examples; ``prompts_only`` drops the answers (unlabelled inputs). Longer examples
    keep their last ``max_length`` tokens, where the answer (or the end of the prompt) is."""
    from mergeforge.tasks.encoding import encode_answers, encode_prompts

    prompt_ids = [encode_prompts(tokenizer, [example.prompt], example.chat, example.system)[0] for example in examples]
    with_answer = [i for i, example in enumerate(examples) if example.answer is not None and not prompts_only]
    answer_ids = dict(zip(with_answer, encode_answers(tokenizer, [examples[i].answer or "" for i in with_answer])))
    encoded: list[EncodedExample] = []
    for index, prompt in enumerate(prompt_ids):
        if index in answer_ids:
            ids = prompt + answer_ids[index]
            scored = [False] * len(prompt) + [True] * len(answer_ids[index])
        else:
            ids, scored = list(prompt), [True] * len(prompt)
        cut = max(0, len(ids) - max_length)
        prompt_length = max(0, len(prompt) - cut)
        encoded.append(EncodedExample(ids[cut:], scored[cut:], prompt_length))
    return encoded


def make_batches(encoded: Sequence[EncodedExample], batch_size: int, pad_id: int) -> list[Batch]:
    """Right-padded batches of ``batch_size`` examples, in order."""
    batches: list[Batch] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(example.input_ids) for example in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored_mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, example in enumerate(chunk):
            length = len(example.input_ids)
            input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
            attention_mask[row, :length] = 1
            scored_mask[row, :length] = torch.tensor(example.scored, dtype=torch.bool)
        batches.append(Batch(input_ids, attention_mask, scored_mask))
    return batches


def pad_token_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else end-of-sequence, else 0 (masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def shared_sources(examples: Mapping[str, list[CalibrationExample]]) -> list[list[CalibrationExample]]:
    """The distinct example lists (one when every model shares one source), in model order."""
    distinct: list[list[CalibrationExample]] = []
    for listing in examples.values():
        if not any(listing is seen for seen in distinct):
            distinct.append(listing)
    return distinct
