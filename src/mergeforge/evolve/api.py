"""``run_search``: one call from a search file to a finished output folder (what ``mergeforge
evolve`` runs): validate, load the sources once, search (or resume), then export, re-merge and
report."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mergeforge.errors import MergeforgeError, RecipeError
from mergeforge.evolve.config import SearchConfig, load_search_config, resolve_path
from mergeforge.evolve.journal import prepare_out_dir

SearchLike = SearchConfig | dict[str, Any] | str | os.PathLike[str]


def no_winner_message(out: Path, entries: list[dict[str, Any]], races: list[dict[str, Any]]) -> str:
    """Why a search has no winner: nothing ran, every candidate failed, or (with racing) every
    candidate that scored on its minibatch failed when re-scored on the whole search split."""
    if not entries:
        return f"{out}: every candidate failed (none ran); see journal.jsonl"
    failed = [entry for entry in entries if entry["fitness"] is None]
    if len(failed) < len(entries):
        error = next((line["error"] for line in races if line["error"]), "no race line")
        return f"{out}: every raced candidate failed on the whole search split ({error}); see race.jsonl"
    return f"{out}: every candidate failed ({failed[0]['error']}); see journal.jsonl"


def run_search(search: SearchLike, out_dir: str | os.PathLike[str], *, resume: bool = False,
               progress: Callable[[str], None] | None = None, workers: int | None = None,
               ray_address: str | None = None) -> dict[str, Any]:
    """Search a merge's parameters with CMA-ES and write the winner and the report to ``out_dir``.

    Arguments:
        search: the search file (YAML path), a dict of it, or a :class:`SearchConfig`.
        out_dir: an empty or new folder; with ``resume``, the folder of a search to continue
            (the same search; only its ``budget`` may change).
        progress: called with one line per generation and per final step (default: silent).
        workers: 1 (the default) scores candidates in this process; N > 1 in N worker processes,
            steady-state (:mod:`mergeforge.evolve.pool`: a lag-1 pipeline of generations, not the
            serial search; workers are spawned, so a calling script needs
            ``if __name__ == "__main__":``). With ``ray_address``: the number of Ray actors
            (default: one per free CPU of the cluster).
        ray_address: score candidates on Ray actors of the cluster there (``auto``, or
            ``HOST:PORT``; :mod:`mergeforge.evolve.ray_workers`): the same pipeline, so the same
            journal as ``workers=N`` processes. Ray is imported only then.

    Returns:
        The report (also ``out_dir/report.json``).

    Example:
        >>> run_search("search.yml", "runs/ties", progress=print)["best"]["fitness"]
    """
    from mergeforge.evolve.fitness import race_all
    from mergeforge.evolve.report import (
        WINNER,
        append_model_card,
        baseline_rows,
        convergence_plot,
        genome_plot,
        path_plot,
        remerge_winner,
        table,
        winner_recipe_text,
        write_report,
    )
    from mergeforge.evolve.search import search_loop

    say = progress or (lambda line: None)
    config, folder = load_search_config(search)
    config = absolute_paths(config, folder)
    import cma  # noqa: F401 - missing optional package: fail before any model is read
    if config.optimizer.name == "nsga2" and importlib.util.find_spec("pymoo") is None:
        raise MergeforgeError("optimizer 'nsga2' needs pymoo: pip install 'mergeforge[evolve]'")
    if any(term.lm_eval is not None for term in config.fitness):
        from mergeforge.evolve.candidates import check_lm_eval_terms

        check_lm_eval_terms(config)
    out = Path(out_dir)
    if workers is not None and workers < 1:
        raise RecipeError(f"--workers {workers}: give 1 or more")
    pipelined = ray_address is not None or (workers or 1) > 1
    if ray_address is not None:
        from mergeforge.evolve.ray_workers import INSTALL_HINT, check_reachable

        if importlib.util.find_spec("ray") is None:  # before any model is read
            raise MergeforgeError(f"--ray-address {ray_address}: Ray is not installed; {INSTALL_HINT}")
        check_reachable(ray_address)
    if resume:
        from mergeforge.evolve.pool import check_mode

        check_mode(out, pipelined)
    prepare_out_dir(out, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True), resume)
    started = time.perf_counter()
    try:
        pool = new_pool(config, folder, out)
    except RecipeError as exc:
        if not str(exc).startswith("field '"):
            raise
        source = str(search) if isinstance(search, (str, os.PathLike)) else "search config"
        raise RecipeError(f"{source}: {exc}") from None  # a field that needed the models to check (layer_groups)
    where = pool.space.labels[0] if config.is_layer_path else f"{len(pool.space.labels)} group(s)"
    say(f"{pool.space.dimensions} genes over {where}; sources loaded in {time.perf_counter() - started:.1f} s")
    executor = "this process"
    if pipelined:
        from mergeforge.evolve.pool import pooled_loop

        def start_executor() -> Any:
            nonlocal executor
            config_data = config.model_dump(mode="json")
            chosen: Any
            if ray_address is not None:
                from mergeforge.evolve.ray_workers import RayExecutor

                chosen = RayExecutor(ray_address, workers, config_data, folder, out)
            else:
                from mergeforge.evolve.pool import ProcessExecutor

                chosen = ProcessExecutor(workers or 1, config_data, folder, out)
            executor = chosen.description
            say(f"scoring on {executor}")
            return chosen

        entries, stopped = pooled_loop(pool, out, say, start_executor)
    else:
        entries, stopped = search_loop(pool, out, say)
    say(f"search ended: {stopped}")
    races = race_all(pool, out, entries)
    best = winning_entry(config, entries, races)
    terms = [t.key for t in config.fitness]
    report = summary(pool, entries, stopped)
    report["executor"] = executor
    if config.splits.race_size:
        report["racing"] = {"minibatch": config.splits.minibatch, "race": config.splits.race_size, "re_scored": len(races),
                            "seconds": sum(line["seconds"] for line in races)}
    if best is None:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        raise MergeforgeError(no_winner_message(out, entries, races))
    values = pool.space.values(best["genome"])
    report["best"] = {"evaluation": best["evaluation"], "generation": best["generation"], "fitness": best["fitness"],
                      "scores": best["scores"], "parameters": best["parameters"], "genome": best["genome"]}
    if "minibatch_fitness" in best:
        report["best"]["minibatch_fitness"] = best["minibatch_fitness"]
    (out / WINNER).write_text(winner_recipe_text(pool, values), encoding="utf-8")
    reproduction = remerge_winner(pool, out)
    reproduction["difference"] = reproduction["fitness"] - best["fitness"]
    report["reproduction"] = reproduction
    say(f"winner re-merged from {WINNER}: fitness {reproduction['fitness']:.4f} (search {best['fitness']:.4f}, "
        f"difference {reproduction['difference']:.2e})")
    report["pareto"] = pareto_rows(pool, entries, races, out)
    report["test"] = baseline_rows(pool, values)
    report["plot_skipped"] = convergence_plot(entries, out / "convergence.png")
    if config.is_layer_path:
        report["path_plot_skipped"] = path_plot(pool, values, out / "path.png")
    else:
        report["genome_plot_skipped"] = genome_plot(pool, values, out / "genome.png")
    write_report(out, report, terms)
    append_model_card(out, report, terms)
    say(table(report["test"], terms))
    return report


def winning_entry(config: SearchConfig, entries: list[dict[str, Any]], races: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The winner's journal line with its evaluation number: the best on the search split; with a
    minibatch, the best re-scored candidate, with its whole-split scores (its minibatch fitness
    kept as ``minibatch_fitness``)."""
    from mergeforge.evolve.journal import best_entry

    if not config.splits.race_size:
        best = best_entry(entries)
        return None if best is None else {**best, "evaluation": entries.index(best) + 1}
    line = best_entry(races)
    if line is None:
        return None
    position = next(i for i, e in enumerate(entries) if (e["generation"], e["candidate"]) == (line["generation"], line["candidate"]))
    return {**entries[position], "evaluation": position + 1, "scores": line["scores"], "fitness": line["fitness"],
            "minibatch_fitness": line["minibatch_fitness"]}


def pareto_rows(pool: Any, entries: list[dict[str, Any]], races: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """The search split's Pareto front (:mod:`mergeforge.evolve.pareto`), best fitness first, each
    member's recipe written to ``pareto/evaluation-N.yml``."""
    from mergeforge.evolve.pareto import pareto_front
    from mergeforge.evolve.report import winner_recipe_text

    position = {(e["generation"], e["candidate"]): i for i, e in enumerate(entries)}
    candidates = races if pool.config.splits.race_size else entries
    rows = []
    for member in pareto_front(pool.config, candidates):
        index = position[(member["generation"], member["candidate"])]
        entry = entries[index]
        recipe = out / "pareto" / f"evaluation-{index + 1}.yml"
        recipe.parent.mkdir(exist_ok=True)
        recipe.write_text(winner_recipe_text(pool, pool.space.values(entry["genome"])), encoding="utf-8")
        rows.append({"evaluation": index + 1, "generation": entry["generation"], "candidate": entry["candidate"],
                     "scores": member["scores"], "fitness": member["fitness"], "recipe": str(recipe)})
    return sorted(rows, key=lambda row: (-row["fitness"], row["evaluation"]))


def new_pool(config: SearchConfig, folder: Path, out: Path) -> Any:
    """The candidates' pool: merged in memory (parameter space) or routed (``layer_path``)."""
    if config.layer_path is not None:
        from mergeforge.evolve.routing import PathPool

        return PathPool(config, folder, out)
    from mergeforge.evolve.candidates import CandidatePool

    return CandidatePool(config, folder)


def absolute_paths(config: SearchConfig, folder: Path) -> SearchConfig:
    """The search with its model and task paths resolved against the search file's folder, so the
    saved copy (and a resume) means the same from any working directory."""
    update: dict[str, Any] = {
        "fitness": [t.model_copy(update={name: str(resolve_path(getattr(t, name), folder)) for name in ("task", "include_path")
                                         if getattr(t, name) is not None}) for t in config.fitness],
    }
    if config.base_model is not None:
        update["base_model"] = str(resolve_path(config.base_model, folder))
    if config.models is not None:
        update["models"] = [m.model_copy(update={"model": str(resolve_path(m.model, folder))}) for m in config.models]
    if config.layer_path is not None:
        models = [str(resolve_path(m, folder)) for m in config.layer_path.models]
        update["layer_path"] = config.layer_path.model_copy(update={"models": models})
    return config.model_copy(update=update)


def mean_timing(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds of merging and scoring, and groups merged, over the scored candidates."""
    scored = [e["timing"] for e in entries if e["fitness"] is not None]
    keys = ("merge_seconds", "score_seconds", "remerged_groups")
    return {key: sum(t[key] for t in scored) / len(scored) if scored else 0.0 for key in keys}


def summary(pool: Any, entries: list[dict[str, Any]], stopped: str) -> dict[str, Any]:
    """The report's account of the search itself (before the winner's export and the test table)."""
    from mergeforge.evolve.search import uses_diagonal

    config = pool.config
    seconds = sum(e["timing"]["seconds"] for e in entries)
    return {
        "method": config.method_name, "seed": config.seed, "dimensions": pool.space.dimensions, "groups": pool.space.labels,
        "optimizer": config.optimizer.name, "separable_cma": config.optimizer.name == "cma" and uses_diagonal(config, pool.space.dimensions),
        "search_split": config.splits.search, "test_split": config.splits.test, "evaluations": len(entries), "stopped": stopped,
        "failed": sum(e["fitness"] is None for e in entries), "seconds": seconds,
        "candidates_per_minute": 60 * len(entries) / seconds if seconds > 0 else 0.0, "timing": mean_timing(entries),
        "failures": [{"evaluation": i, "error": e["error"]} for i, e in enumerate(entries, 1) if e["fitness"] is None],
        "best": None,
    }
