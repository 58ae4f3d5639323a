"""``mergeforge bench``: every registered method over the zoo's experts; tables, JSON and a chart."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("bench")
@click.option("--zoo", "zoo_dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/zoo"), show_default=True,
              help="Zoo folder (built there first, or reused when its content hash matches).")
@click.option("--size", type=click.Choice(["tiny", "small", "smollm2", "smollm2-demo"]), default="small", show_default=True,
              help="Zoo size (smollm2: the SmolLM2-135M-Instruct zoo, see docs/zoo.md).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"), show_default=True,
              help="Where results.json, results.md and results.png go.")
@click.option("--methods", default=None, help="Comma-separated methods (default: every registered one).")
@click.option("--max-examples", type=int, default=None, help="Score only the first N examples of each split (faster, noisier).")
@click.option("--val-examples", type=int, default=None,
              help="Score only the first N validation examples in the grid searches (default: --max-examples).")
@click.option("--no-cross-scores", is_flag=True, help="Score each expert on its own task only (not on every task).")
@click.option("--no-ensemble", is_flag=True, help="Skip the output-ensemble baseline (one forward pass per expert).")
@click.option("--no-negation", is_flag=True, help="Skip the task-negation experiment.")
@click.option("--curve-methods", default=None, help="Comma-separated methods for the accuracy-vs-experts curve.")
@click.option("--no-curve", is_flag=True, help="Skip the accuracy-vs-experts curve.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the zoo and of the random methods.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def bench_command(zoo_dir: Path, size: str, out_dir: Path, methods: str | None, max_examples: int | None,
                  val_examples: int | None, no_cross_scores: bool, no_ensemble: bool, no_negation: bool,
                  curve_methods: str | None, no_curve: bool, seed: int, device: str) -> None:
    """Benchmark every merge method on the zoo: tune on validation, score on test, write the tables."""
    import logging

    from transformers.utils import logging as transformers_logging

    from mergeforge.bench.report import markdown, write_report
    from mergeforge.bench.runner import DEFAULT_CURVE_METHODS, run_bench
    from mergeforge.bench.suite import suite_from_zoo
    from mergeforge.methods.registry import get_method
    from mergeforge.zoo import build_zoo

    logging.getLogger("mergeforge").setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()  # one line per method instead of a bar per model load
    transformers_logging.set_verbosity_error()
    chosen = [name.strip() for name in methods.split(",") if name.strip()] if methods else None
    for name in chosen or []:
        get_method(name)  # an unknown name fails now, not after the zoo is built
    zoo = build_zoo(zoo_dir, size=size, seed=seed)
    suite = suite_from_zoo(zoo)
    curve = [] if no_curve else [name.strip() for name in curve_methods.split(",")] if curve_methods else DEFAULT_CURVE_METHODS
    result = run_bench(suite, chosen, max_examples=max_examples, val_examples=val_examples, device=device, seed=seed,
                       curve_methods=curve, expert_cross_scores=not no_cross_scores, ensemble=not no_ensemble,
                       negation=not no_negation, progress=lambda line: click.echo(line, err=True))
    result.settings["zoo"] = {"dir": str(zoo_dir), "size": size}
    paths = write_report(result, out_dir)
    click.echo(markdown(result))
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}", err=True)
