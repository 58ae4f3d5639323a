"""``mergeforge analyze`` and ``mergeforge lmc``: the foundations' commands (see docs/foundations.md)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("analyze")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--base", default=None, help="The base model; then INPUTS are the fine-tunes. Without it, INPUTS is one merge recipe.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for analysis.json, report.html and recommended.yml.")
@click.option("--density", type=float, default=0.2, show_default=True, help="TIES' and DARE's kept share, for their statistics.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the measured DARE draw.")
@click.option("--no-spectral", is_flag=True, help="Skip the singular spectra, effective ranks and SAR (the SVDs).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for the non-spectral statistics, one tensor each (default: one per core, at most 2).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def analyze_command(inputs: tuple[str, ...], base: str | None, out_dir: Path, density: float, seed: int, no_spectral: bool,
                    threads: int | None, overwrite: bool, quiet: bool) -> None:
    """Task-vector statistics of fine-tunes of one base, before merging them: cosines, relative
    norms, TIES sign conflicts, DARE's noise, spectra and subspace alignment (RECIPE, or --base B MODELS...)."""
    from mergeforge.analysis.analyze import analyze, describe_recommendation, models_of_recipe
    from mergeforge.errors import RecipeError

    relative_to = None
    if base is None:
        if len(inputs) != 1:
            raise RecipeError("analyze: give one merge recipe, or --base BASE and the models")
        recipe = Path(inputs[0])
        base, models = models_of_recipe(recipe)
        relative_to = recipe.parent
    else:
        models = list(inputs)
    echo = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    result = analyze(base, models, out_dir, density=density, seed=seed, spectral=not no_spectral, threads=threads,
                     overwrite=overwrite,
                     relative_to=relative_to, progress=echo)
    overall = result["overall"]
    cosine = overall["mean_pairwise_cosine"]
    click.echo(f"{len(models)} models, {len(result['tensors'])} tensors: mean pairwise cosine "
               f"{'n/a' if cosine is None else f'{cosine:.4f}'}, relative norms "
               f"{', '.join(f'{v:.2e}' for v in overall['relative_norm'])}, TIES sign conflicts "
               f"{100 * overall['sign_conflict_rate']:.1f}% at density {density}")
    click.echo(describe_recommendation(result["recommendation"]))
    click.echo(f"wrote {out_dir / 'report.html'}" + ("" if "skipped" in result["recommendation"]
                                                     else f" and {out_dir / 'recommended.yml'}"))


@click.command("lmc")
@click.argument("model_a", type=click.Path(path_type=Path))
@click.argument("model_b", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), default=None, help="Also the path A → base → B.")
@click.option("--tasks", "task_names", required=True, help="Task folders or names (as for mergeforge eval).")
@click.option("--task-root", type=click.Path(path_type=Path), default=None, help="Where task names are looked up.")
@click.option("--points", type=click.IntRange(min=2), default=11, show_default=True, help="Points per path, end points included.")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N examples of each task.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for lmc.json, lmc.png and report.html.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def lmc_command(model_a: Path, model_b: Path, base: Path | None, task_names: str, task_root: Path | None, points: int, split: str,
                limit: int | None, out_dir: Path, overwrite: bool, quiet: bool) -> None:
    """Loss and accuracy along the line between MODEL_A and MODEL_B, and the barrier."""
    from mergeforge.analysis.lmc import lmc
    from mergeforge.tasks.folders import resolve_tasks

    tasks = resolve_tasks(task_names, task_root, model_a)
    echo = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    result = lmc(model_a, model_b, tasks, base=base, points=points, split=split, max_examples=limit, out_dir=out_dir,
                 overwrite=overwrite, progress=echo)
    for name, path in result["paths"].items():
        for scope, values in [("mean", path), *path["tasks"].items()]:
            click.echo(f"{name}, {scope}: loss barrier {values['loss_barrier']:.4f}, "
                       f"accuracy barrier {100 * values['accuracy_barrier']:.1f} points")
    click.echo(f"wrote {out_dir / 'report.html'}")
