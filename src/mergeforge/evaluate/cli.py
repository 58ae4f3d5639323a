"""``mergeforge eval MODEL_DIR --tasks ...``: score a model folder on JSONL tasks."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--tasks", "task_names", required=True,
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
def eval_command(model_dir: Path, task_names: str, task_root: Path | None, split: str, json_out: Path | None,
                 limit: int | None, batch_size: int, no_loss: bool, predictions: bool, device: str,
                 threads: int | None) -> None:
    """Score MODEL_DIR (a Hugging Face folder or a PEFT LoRA adapter folder) by exact match with
    greedy generation, and by the loss of the reference answers."""
    from mergeforge.errors import CheckpointError
    from mergeforge.evaluate.tasks import resolve_tasks

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
                            return_predictions=predictions, with_loss=not no_loss, threads=threads)
    result["model"] = str(model_dir)
    click.echo(format_result(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {json_out}", err=True)
