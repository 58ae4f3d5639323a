"""``evaluate_model``: exact-match accuracy and answer loss of a causal LM on held-out tasks."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mergeforge.errors import CheckpointError
from mergeforge.evaluate.generation import greedy_generate
from mergeforge.evaluate.scoring import answer_scores, forced_output, is_correct, normalise
from mergeforge.tasks.encoding import encode_answers, encode_prompts
from mergeforge.tasks.folders import Task, TaskError, load_task

TaskLike = Task | str | Path
SMALL_MODEL_PARAMETERS = 100_000_000


@contextlib.contextmanager
def scoring_threads(model: torch.nn.Module, threads: int | None = None,
                    small_below: int = SMALL_MODEL_PARAMETERS) -> Iterator[None]:
    """torch's intra-op threads while scoring ``model``: ``threads`` when given, else one for a
    model under ``small_below`` parameters (its matrices are too small to split, and thread
    hand-offs then dominate), else torch's default. The previous setting is restored."""
    previous = torch.get_num_threads()
    if threads is None and sum(p.numel() for p in model.parameters()) < small_below:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_model_and_tokenizer(model_dir: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder, offline.

    ``model_dir`` is a Hugging Face folder (``config.json`` + weights), or a PEFT LoRA adapter
    folder (``adapter_config.json``), which is merged into its base model (read from
    ``base_model_name_or_path``, relative to the adapter folder or the working directory).
    The tokenizer is read from ``model_dir``, else from the adapter's base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeforge.checkpoint.peft import (
        is_adapter_folder,
        load_adapter_model,
        read_adapter,
        resolve_base,
    )

    folder = Path(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    adapter = is_adapter_folder(folder)
    if not adapter and not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (nor adapter_config.json); pass a Hugging Face model folder")
    tokenizer_folder = folder
    if adapter and not (folder / "tokenizer_config.json").is_file():
        tokenizer_folder = resolve_base(folder, read_adapter(folder)[0])
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{tokenizer_folder}: cannot load a tokenizer ({exc}); save one beside the model") from None
    try:
        if adapter:
            model = load_adapter_model(folder)
        else:
            dtype = torch.float32 if device == "cpu" else "auto"
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load the model ({exc})") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return model.to(device).eval(), tokenizer


def _as_tasks(tasks: TaskLike | Sequence[TaskLike]) -> list[Task]:
    if isinstance(tasks, (Task, str, Path)):
        tasks = [tasks]
    resolved = [task if isinstance(task, Task) else load_task(task) for task in tasks]
    if not resolved:
        raise TaskError("no task given; pass at least one task folder or Task")
    return resolved


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0  # masked out everywhere it is used


def evaluate_model(
    model_or_dir: torch.nn.Module | str | Path,
    tasks: TaskLike | Sequence[TaskLike],
    split: str = "test",
    batch_size: int = 64,
    max_examples: int | None = None,
    tokenizer: Any = None,
    return_predictions: bool = False,
    with_loss: bool = True,
    threads: int | None = None,
    scoring: str = "generate",
) -> dict[str, Any]:
    """Score a model on tasks by greedy generation and by the loss of the reference answers.

    Arguments:
        model_or_dir: a model folder, or a loaded causal LM (then pass ``tokenizer`` too, unless
            the model's ``name_or_path`` is a folder holding one).
        tasks: task folders (with ``spec.json``) or :class:`Task` objects.
        split: which JSONL split to score (``test`` by default; ``val`` for tuning).
        batch_size: prompts per generation / loss batch.
        max_examples: score only the first N examples of each task.
        return_predictions: include every prompt, reference and output in the result.
        with_loss: also compute the answer loss and perplexity (one extra forward pass).
        threads: torch threads while scoring; default 1 for models under 100M parameters
            (they gain nothing from intra-op threads, and lose a factor of 20 when the cores are
            shared with other processes), else torch's setting.
        scoring: ``generate`` decodes every prompt greedily. ``forced`` first runs one
            teacher-forced pass: an example whose every answer token (and the end of sequence)
            is the model's top choice is one that greedy decoding answers exactly, so it is
            correct without decoding; an example whose top choice at its first miss already
            leaves the answer's text (or ends it early) is wrong without decoding
            (:func:`~mergeforge.evaluate.scoring.forced_output`); only the rest are generated,
            and with ``return_predictions`` the wrong ones too, for their full outputs. Same
            verdicts as ``generate`` (up to floating-point ties), at the cost of one forward
            pass plus the undecided examples' decoding. The result counts, per task, how many examples needed decoding
            (``generated``) and how many of those were correct after all (``generated_correct``:
            a different tokenisation of the answer, or a stop before the end of sequence).

    Returns:
        ``{"model", "split", "tasks": {name: {"metric", "score", "correct", "n", "loss",
        "perplexity", "answer_tokens"}}, "mean_score", "seconds"}``.

    Example:
        >>> result = evaluate_model("zoo/models/expert_reverse", ["zoo/tasks/reverse"])
        >>> result["tasks"]["reverse"]["score"]
    """
    started = time.perf_counter()
    task_list = _as_tasks(tasks)
    if isinstance(model_or_dir, (str, Path)):
        model, tokenizer = load_model_and_tokenizer(model_or_dir)
        model_name = str(model_or_dir)
    else:
        model = model_or_dir
        model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        if tokenizer is None:
            source = getattr(model, "name_or_path", "")
            if not source or not Path(source).is_dir():
                raise CheckpointError("evaluate_model got a model object without a tokenizer; pass tokenizer=")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    was_training = model.training
    model.eval()
    try:
        with scoring_threads(model, threads):
            results = _score_tasks(model, tokenizer, task_list, split, batch_size, max_examples, return_predictions, with_loss,
                                   scoring)
    finally:
        if was_training:
            model.train()
    return {
        "model": model_name,
        "split": split,
        "tasks": results,
        "mean_score": sum(r["score"] for r in results.values()) / len(results),
        "seconds": time.perf_counter() - started,
    }


SCORING = ("generate", "forced")


def _score_tasks(model: Any, tokenizer: Any, task_list: list[Task], split: str, batch_size: int,
                 max_examples: int | None, return_predictions: bool, with_loss: bool, scoring: str) -> dict[str, Any]:
    if scoring not in SCORING:
        raise TaskError(f"scoring '{scoring}': choose one of {', '.join(SCORING)}")
    pad_id, eos_id = _pad_id(tokenizer), tokenizer.eos_token_id
    results: dict[str, Any] = {}
    for task in task_list:
        examples = task.examples(split, max_examples)
        prompt_ids = encode_prompts(tokenizer, [e.prompt for e in examples], task.spec.chat, task.spec.system)
        forced = None
        if with_loss or scoring == "forced":
            answer_ids = encode_answers(tokenizer, [e.answer for e in examples])
            forced = answer_scores(model, prompt_ids, answer_ids, pad_id, batch_size)
        outputs: list[str | None] = [None] * len(examples)
        if scoring == "forced":
            assert forced is not None
            for i, (e, score, ids) in enumerate(zip(examples, forced, answer_ids, strict=True)):
                verdict = forced_output(tokenizer, e.answer, ids, score, task.spec.metric, task.spec.stop, task.spec.max_new_tokens)
                # A wrong answer's first tokens settle the score, not the predictions asked for.
                if verdict is not None and (verdict[1] or not return_predictions):
                    outputs[i] = verdict[0]
        todo = [i for i, out in enumerate(outputs) if out is None]
        generated = greedy_generate(model, [prompt_ids[i] for i in todo], task.spec.max_new_tokens, pad_id, eos_id, batch_size)
        for i, ids in zip(todo, generated, strict=True):
            outputs[i] = normalise(tokenizer.decode(ids, skip_special_tokens=True), task.spec.stop)
        correct = [is_correct(out or "", e.answer, task.spec.metric) for out, e in zip(outputs, examples, strict=True)]
        entry: dict[str, Any] = {
            "metric": task.spec.metric,
            "score": sum(correct) / len(examples),
            "correct": sum(correct),
            "n": len(examples),
        }
        if scoring == "forced":
            entry.update(generated=len(todo), generated_correct=sum(correct[i] for i in todo))
        if with_loss:
            assert forced is not None
            total, count = sum(s.nll for s in forced), sum(s.tokens for s in forced)
            mean = total / max(1, count)
            entry.update(loss=mean, perplexity=math.exp(min(mean, 700.0)), answer_tokens=count)
        if return_predictions:
            entry["predictions"] = [
                {"prompt": e.prompt, "answer": e.answer, "output": out, "correct": ok}
                for e, out, ok in zip(examples, outputs, correct, strict=True)
            ]
        results[task.name] = entry
    return results
