"""``mergeforge demo``: the README's main command. Builds (once; then cached) the reduced zoo of a
real pretrained LLM, SmolLM2-135M-Instruct with three task experts fine-tuned from it, merges the
experts with three methods, evaluates every model on the held-out test splits and prints one table.
``--size tiny`` runs the same on the generated tiny zoo (the tests' zoo) in about a minute.

Methods: a plain average of the experts (model soups, Wortsman et al., arXiv:2203.05482), task
arithmetic (Ilharco et al., arXiv:2212.04089) and TIES (Yadav et al., arXiv:2306.01708). Baselines:
the base model, each expert on its own task, and the multi-task model. "norm." is the mean over
tasks of the score divided by the expert's score on that task (FusionBench's normalised accuracy).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

# The demo's recipes, as mergekit YAML would write them (the experts are filled in at run time).
# The task-arithmetic scale and the TIES density are the usual starting points of the papers
# (lambda about 0.3-0.5 for several tasks; keep the top 20% of each task vector, lambda 1);
# `mergeforge bench` tunes them on the validation split instead.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "average": {"merge_method": "linear", "model_parameters": {"weight": 1.0}, "parameters": {"normalize": True}, "with_base": False},
    "task_arithmetic": {"merge_method": "task_arithmetic", "model_parameters": {"weight": 1.0}, "parameters": {"lambda": 0.4}, "with_base": True},
    "ties": {"merge_method": "ties", "model_parameters": {"weight": 1.0, "density": 0.2}, "parameters": {"lambda": 1.0, "normalize": False}, "with_base": True},
}


def demo_recipe(method: str, base: Path, experts: list[Path]) -> dict[str, Any]:
    """The recipe (a mergekit-style dict) of one demo method."""
    spec = DEMO_METHODS[method]
    recipe: dict[str, Any] = {
        "merge_method": spec["merge_method"],
        "models": [{"model": str(path), "parameters": dict(spec["model_parameters"])} for path in experts],
        "parameters": dict(spec["parameters"]),
        "dtype": "float32",
    }
    if spec["with_base"]:
        recipe["base_model"] = str(base)
    return recipe


def _baselines(zoo: Any, workdir: Path, limit: int | None, scores: Any) -> dict[str, dict[str, float]]:
    """The base's, the experts' and the multi-task model's scores. They depend only on the zoo and
    the number of examples, so they are kept in ``workdir/baselines.json`` and read back on the
    next run (the merges are redone and rescored every time)."""
    import json

    path = workdir / "baselines.json"
    key = {"zoo": zoo.content_hash, "limit": limit}
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return dict(saved["rows"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    rows: dict[str, dict[str, float]] = {"base": scores(zoo.base.path, zoo.skills)}
    rows["expert (own task)"] = {task: scores(model.path, [task])[task] for model in zoo.experts if (task := model.task)}
    if zoo.by_role("multitask"):
        rows["multi-task model"] = scores(zoo.multitask.path, zoo.skills)
    workdir.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps({"key": key, "rows": rows}, indent=2) + "\n")
    temp.replace(path)
    return rows


def run_demo(workdir: Path | None = None, size: str = "smollm2-demo", seed: int = 0, limit: int | None = None,
             echo: Any = print) -> dict[str, Any]:
    """Build the zoo, merge, evaluate; returns ``{"zoo", "rows": {label: {task: score}}, "table"}``."""
    from mergeforge.cache import cache_root
    from mergeforge.engine.api import merge
    from mergeforge.evaluate.api import evaluate_model, load_model_and_tokenizer
    from mergeforge.evaluate.report import format_table
    from mergeforge.tasks.folders import load_task
    from mergeforge.zoo.build import build_zoo

    started = time.perf_counter()
    zoo = build_zoo(None, size=size, seed=seed, log=echo)
    workdir = workdir if workdir is not None else cache_root() / "demo" / zoo.root.name
    skills = zoo.skills
    tasks = {name: load_task(zoo.task_dir(name)) for name in skills}

    def scores(model_dir: Path, names: list[str]) -> dict[str, float]:
        model, tokenizer = load_model_and_tokenizer(model_dir)
        result = evaluate_model(model, [tasks[name] for name in names], split="test", max_examples=limit,
                                tokenizer=tokenizer, with_loss=False, scoring="forced")
        return {name: entry["score"] for name, entry in result["tasks"].items()}

    rows = _baselines(zoo, workdir, limit, scores)
    experts = [model.path for model in zoo.experts]
    for method in DEMO_METHODS:
        out = workdir / f"merged-{method}"
        result = merge(demo_recipe(method, zoo.base.path, experts), out, overwrite=True, quiet=True)
        echo(f"merged {len(experts)} experts with {method} ({result.method}) in {result.seconds:.2f} s -> {out}")
        rows[f"merge: {method}"] = scores(out, skills)
    reference = rows["expert (own task)"]
    table = format_table(list(rows.items()), skills)
    normalised = {
        label: sum(values[task] / reference[task] for task in skills if reference[task] > 0) / len(skills)
        for label, values in rows.items()
    }
    lines = table.splitlines()
    lines[0] += " norm. |"
    lines[1] += "------:|"
    for index, label in enumerate(rows, start=2):
        lines[index] += f" {100 * normalised[label]:5.1f} |"
    table = "\n".join(lines)
    available = len(tasks[skills[0]].examples("test"))
    split_size = min(limit, available) if limit is not None else available
    echo("")
    echo(f"Exact-match accuracy (%) on the held-out test split ({split_size} examples per task), zoo {zoo.size} seed {zoo.seed}:")
    echo(table)
    echo(f"(demo took {time.perf_counter() - started:.1f} s; zoo in {zoo.root})")
    return {"zoo": zoo, "rows": rows, "normalised": normalised, "table": table}


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the merged models go (default: under ~/.cache/mergeforge/demo).")
@click.option("--size", type=click.Choice(["smollm2-demo", "smollm2", "tiny", "small"]), default="smollm2-demo", show_default=True,
              help="Zoo: smollm2-demo (3 experts of SmolLM2-135M-Instruct; about 10 minutes the first time), smollm2 "
                   "(the full real zoo), tiny (generated, a minute) or small.")
@click.option("--seed", type=int, default=0, show_default=True, help="Zoo seed.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Score the first N test examples per task (the smollm2 zoos have 80, the tiny zoo 200).")
def demo_command(workdir: Path | None, size: str, seed: int, limit: int) -> None:
    """Build a zoo of fine-tunes of a real LLM (cached), merge its experts three ways, evaluate, print the table."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the demo prints its own lines, not a bar per model load
    transformers_logging.set_verbosity_error()
    run_demo(workdir, size, seed, limit, echo=lambda line: click.echo(line))


__all__ = ["demo_command", "run_demo", "demo_recipe", "DEMO_METHODS"]
