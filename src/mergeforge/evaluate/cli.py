"""``mergeforge eval MODEL_DIR --tasks ...``: score a model folder on JSONL tasks; with
``--harness``, run lm-evaluation-harness instead (see mergeforge.evaluate.harness)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--tasks", "task_names", default=None,
              help="Comma-separated task folders (with spec.json) or task names; 'all' = every task of the task root.")
@click.option("--task-root", type=click.Path(path_type=Path), default=None,
              help="Folder of task folders that names refer to (default: the zoo's tasks/ when MODEL_DIR is in a zoo).")
@click.option("--split", default="test", show_default=True, help="Which JSONL split to score (train, val, test).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full result as JSON to this file.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N examples of each task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts per batch.")
@click.option("--no-loss", is_flag=True, help="Skip the answer loss / perplexity (one forward pass fewer).")
@click.option("--predictions", is_flag=True, help="Include every prompt, answer and output in the JSON.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: 1 for models under 100M parameters, else torch's default).")
@click.option("--scoring", type=click.Choice(["generate", "forced"]), default="generate", show_default=True,
              help="forced: one teacher-forced pass settles every example the model answers exactly; only the "
                   "others are generated (same verdicts, faster).")
@click.option("--harness", "harness_names", default=None,
              help="Run lm-evaluation-harness instead, on these comma-separated tasks: lm-eval YAML task names "
                   "under --include-path, and task folders or names as for --tasks (exported to lm-eval YAML).")
@click.option("--include-path", "include_paths", multiple=True, type=click.Path(path_type=Path),
              help="Folder of your own lm-eval task YAML files (repeatable); with --harness.")
@click.option("--export-harness", "export_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the task folders / names of --harness as lm-eval YAML into this folder and exit "
                   "(the model is not loaded).")
def eval_command(model_dir: Path, task_names: str | None, task_root: Path | None, split: str, json_out: Path | None,
                 limit: int | None, batch_size: int, no_loss: bool, predictions: bool, device: str,
                 threads: int | None, scoring: str, harness_names: str | None, include_paths: tuple[Path, ...],
                 export_dir: Path | None) -> None:
    """Score MODEL_DIR (a Hugging Face folder or a PEFT LoRA adapter folder) by exact match with
    greedy generation, and by the loss of the reference answers.

    With --harness, lm-evaluation-harness scores it instead (pip install 'mergeforge[lmeval]'),
    offline, on local YAML tasks and on mergeforge tasks exported to YAML."""
    from mergeforge.errors import CheckpointError
    from mergeforge.tasks.folders import TaskError, resolve_tasks

    if harness_names is not None:
        if task_names is not None:
            raise TaskError("pass either --tasks (mergeforge's evaluator) or --harness (lm-evaluation-harness), not both")
        _harness(model_dir, harness_names, include_paths, export_dir, task_root, split, json_out, limit, batch_size,
                 predictions, device, threads)
        return
    if include_paths or export_dir is not None:
        raise TaskError("--include-path and --export-harness go with --harness TASKS")
    if task_names is None:
        raise TaskError("no task given; pass --tasks (e.g. --tasks reverse,sort or --tasks all) or --harness")

    # Check every input before torch and transformers load, so mistakes fail in a moment.
    tasks = resolve_tasks(task_names, task_root, model_dir)
    for task in tasks:
        task.examples(split, limit)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model folder not found")

    from transformers.utils import logging as transformers_logging

    from mergeforge.evaluate.api import evaluate_model, load_model_and_tokenizer
    from mergeforge.evaluate.report import format_result

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    model, tokenizer = load_model_and_tokenizer(model_dir, device=device)
    result = evaluate_model(model, tasks, split=split, batch_size=batch_size, max_examples=limit, tokenizer=tokenizer,
                            return_predictions=predictions, with_loss=not no_loss, threads=threads, scoring=scoring)
    result["model"] = str(model_dir)
    click.echo(format_result(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {json_out}", err=True)


def _harness(model_dir: Path, harness_names: str, include_paths: tuple[Path, ...], export_dir: Path | None,
             task_root: Path | None, split: str, json_out: Path | None, limit: int | None, batch_size: int,
             predictions: bool, device: str, threads: int | None) -> None:
    """``--harness``: export to YAML (``--export-harness``) or run lm-evaluation-harness."""
    from mergeforge.tasks.folders import resolve_tasks

    if export_dir is not None:
        from mergeforge.evaluate.harness import export_lm_eval_task

        for task in resolve_tasks(harness_names, task_root, model_dir):
            click.echo(f"wrote {export_lm_eval_task(task, export_dir, split)}")
        return

    from mergeforge.evaluate.harness import (
        evaluate_with_harness,
        format_harness_result,
        require_lm_eval,
    )

    require_lm_eval()  # fail in a moment when lm_eval is missing, before transformers loads
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    result = evaluate_with_harness(model_dir, harness_names, include_path=list(include_paths) or None, limit=limit,
                                   batch_size=batch_size, split=split, task_root=task_root, device=device,
                                   threads=threads, return_predictions=predictions)
    click.echo(format_harness_result(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {json_out}", err=True)
