"""``mergeforge evolve SEARCH.yml OUT_DIR``: search a merge's parameters, export the winner."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("evolve")
@click.argument("search", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the search saved in OUT_DIR (the same SEARCH; its budget may grow).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Workers scoring candidates: processes (default 1; N > 1: steady-state, a lag-1 pipeline of "
                   "generations), or with --ray-address the Ray actors (default: one per free CPU).")
@click.option("--ray-address", metavar="auto|HOST:PORT", default=None,
              help="Score candidates on Ray actors of the running cluster there (the --workers pipeline; "
                   "pip install 'mergeforge[ray]').")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def evolve_command(search: Path, out_dir: Path, resume: bool, workers: int | None, ray_address: str | None,
                   quiet: bool) -> None:
    """Search the parameters of a merge (CMA-ES, candidates merged and scored in memory).

    SEARCH names the models, base and method, the searched parameters and their bounds, the
    fitness (weighted task scores on the search split), the budget and the seed; see
    docs/evolve.md. OUT_DIR receives journal.jsonl, optimizer.pkl, winner.yml (a plain recipe:
    `mergeforge merge winner.yml DIR --seed SEED`), model/ (the winner merged from it),
    report.json, report.md and convergence.png.
    """
    import logging

    from mergeforge.evolve.config import load_search_config

    load_search_config(search)  # a bad search file fails here, before transformers is imported
    from transformers.utils import logging as transformers_logging

    from mergeforge.evolve.api import run_search

    logging.getLogger("mergeforge").setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    report = run_search(search, out_dir, resume=resume, workers=workers, ray_address=ray_address,
                        progress=None if quiet else (lambda line: click.echo(line, err=True)))
    best = report["best"]
    click.echo(f"best fitness {best['fitness']:.4f} (evaluation {best['evaluation']} of {report['evaluations']}); "
               f"re-merged from {out_dir / 'winner.yml'}: {report['reproduction']['fitness']:.4f}; report in {out_dir / 'report.md'}")
