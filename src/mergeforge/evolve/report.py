"""The end of a search: the winner exported as a plain recipe and re-merged from it, the
hand-set baselines on the test split, ``report.json``, ``report.md`` and ``convergence.png``.

The re-merge goes through :func:`mergeforge.merge` (what ``mergeforge merge`` runs) from the
exported file, into ``OUT_DIR/model``, and is scored on the search split again: the difference
from the journalled fitness is reported (0 when the in-memory and on-disk merges agree).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from mergeforge.evolve.candidates import fitness_of
from mergeforge.evolve.config import DEFAULT_BASELINES

WINNER = "winner.yml"


def winner_recipe_text(pool: Any, values: list[float]) -> str:
    """The winner as mergekit YAML. mergekit recipes have no seed field, so the seed (it fixes
    DARE/DELLA masks) is written as the header comment and the ``--seed`` of the command line."""
    recipe = pool.winner_recipe(values)
    seed = pool.config.seed
    header = (f"# mergeforge evolve winner; seed: {seed}\n"
              f"# reproduce: mergeforge merge {WINNER} OUT_DIR --seed {seed}\n")
    return header + yaml.safe_dump(recipe, sort_keys=False)


def remerge_winner(pool: Any, out_dir: Path) -> dict[str, Any]:
    """Re-merge ``winner.yml`` from disk with the engine and score it on the search split."""
    from mergeforge.engine.api import merge
    from mergeforge.engine.options import MergeOptions

    model_dir = out_dir / "model"
    started = time.perf_counter()
    merge(out_dir / WINNER, model_dir, MergeOptions(seed=pool.config.seed, quiet=True, overwrite=True, device=pool.config.device))
    pool.load_folder(model_dir)
    # What each candidate would cost if it were written and read back instead of merged in memory.
    disk_seconds = time.perf_counter() - started
    scores = pool.score(pool.config.splits.search)
    return {"model": str(model_dir), "scores": scores, "fitness": fitness_of(pool.config, scores),
            "merge_to_disk_and_load_seconds": disk_seconds}


def baseline_rows(pool: Any, winner_values: list[float]) -> list[dict[str, Any]]:
    """Test-split scores of the base, each source, the hand-set merges and the winner."""
    from mergeforge.evolve.fitness import row_intervals

    config = pool.config
    test = config.splits.test
    counts = test_counts(pool)
    rows: list[dict[str, Any]] = []

    def scored(name: str) -> None:
        scores = pool.score(test)
        rows.append({"name": name, "scores": scores, "fitness": fitness_of(config, scores),
                     "ci95": row_intervals(config, scores, counts)})

    def row(name: str, state: Any = None, error: str | None = None) -> None:
        if error is not None:
            rows.append({"name": name, "error": error})
            return
        pool.load_state(state)
        scored(name)

    def source_row(index: int, path: Path) -> None:
        pool.load_source(index)
        scored(f"source: {path.name}")

    if pool.base_dir is not None:
        row("base", pool.base_state)
    for index, path in enumerate(pool.model_dirs):
        source_row(index, path)
    for baseline in config.baselines if config.baselines is not None else default_baselines(config):
        name = baseline.name or baseline.merge_method
        try:
            state = pool.full_merge(baseline.merge_method, baseline.parameters,
                                    [dict(baseline.model_parameters)] * len(pool.model_states))
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run on these models is reported, not fatal
            row(name, error=f"{type(exc).__name__}: {exc}")
            continue
        row(name, state)
    pool.forget()
    pool.load(winner_values)
    scored("evolved (winner)")
    return rows


def test_counts(pool: Any) -> dict[str, int]:
    """The examples each task-folder term is scored on in the test split (not lm-eval terms')."""
    config = pool.config
    return {t.key: len(pool.pool.tasks[t.folder_name].examples(config.splits.test, config.splits.test_examples))
            for t in config.fitness if t.task is not None}


def default_baselines(config: Any) -> tuple[Any, ...]:
    """The untuned merges of the test table; those that need a base only when the search has one."""
    from mergeforge.methods.registry import BaseUse, get_method

    if config.base_model is not None:
        return DEFAULT_BASELINES
    return tuple(b for b in DEFAULT_BASELINES if get_method(b.merge_method).base != BaseUse.REQUIRED)


def table(rows: list[dict[str, Any]], terms: list[str]) -> str:
    """The test table in Markdown: one row per model, one column per fitness term, then the
    fitness; each exact-match score (and a fitness of exact-match scores alone) with its bootstrap
    95% interval in brackets."""
    lines = ["| model | " + " | ".join(terms) + " | fitness |", "|---" * (len(terms) + 2) + "|"]

    def cell(row: dict[str, Any], key: str, value: float) -> str:
        interval = row.get("ci95", {}).get(key)
        return f"{value:.4f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")

    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | " + " | ".join("-" for _ in terms) + f" | failed: {row['error']} |")
            continue
        cells = " | ".join(cell(row, term, row["scores"][term]) for term in terms)
        lines.append(f"| {row['name']} | {cells} | {cell(row, 'fitness', row['fitness'])} |")
    return "\n".join(lines)


def convergence_plot(entries: list[dict[str, Any]], path: Path) -> str | None:
    """Best-so-far and each generation's quantiles against evaluations and wall time; returns
    why no plot was drawn (matplotlib missing, nothing scored), else None."""
    scored = [(i, e) for i, e in enumerate(entries, 1) if e["fitness"] is not None]
    if not scored:
        return "no candidate was scored"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return "matplotlib is not installed (pip install 'mergeforge[evolve]')"
    best, running, clock, seconds = [], float("-inf"), [], 0.0
    for entry in entries:
        seconds += entry["timing"]["seconds"]
        if entry["fitness"] is not None:
            running = max(running, entry["fitness"])
        best.append(running)
        clock.append(seconds)
    generations: dict[int, list[tuple[int, float]]] = {}
    for i, entry in scored:
        generations.setdefault(entry["generation"], []).append((i, entry["fitness"]))
    figure, (by_count, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    count = list(range(1, len(entries) + 1))
    by_count.scatter([i for i, _ in scored], [e["fitness"] for _, e in scored], s=8, alpha=0.4, label="candidates")
    by_count.plot(count, best, color="black", label="best so far")
    ends = [max(i for i, _ in points) for points in generations.values()]
    for q, style in ((0.5, "--"), (0.9, ":")):
        values = [_quantile([f for _, f in points], q) for points in generations.values()]
        by_count.plot(ends, values, style, label=f"generation q{int(q * 100)}")
    by_count.set_xlabel("evaluations")
    by_count.set_ylabel("fitness (search split)")
    by_count.legend(fontsize=8)
    by_time.plot(clock, best, color="black")
    by_time.set_xlabel("seconds")
    by_time.set_ylabel("best fitness so far")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def built(report: dict[str, Any]) -> str:
    """How a candidate's model was made, and in how many seconds."""
    timing = report["timing"]
    if report["method"] == "layer_path":
        return f"route {timing['merge_seconds']:.4f} (the sources' own layers, nothing copied)"
    return f"merge {timing['merge_seconds']:.3f} (in memory, {timing['remerged_groups']:.2f} groups merged on average)"


def write_report(out_dir: Path, report: dict[str, Any], terms: list[str]) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# mergeforge evolve report", "",
        f"- method: `{report['method']}`, {report['dimensions']} genes, seed {report['seed']}",
        f"- evaluations: {report['evaluations']} ({report['failed']} failed), {report['seconds']:.1f} s, "
        f"{report['candidates_per_minute']:.1f} candidates/minute; {report['stopped']}",
        f"- scored in: {report.get('executor', 'this process')}",
        f"- best fitness on `{report['search_split']}`: {report['best']['fitness']:.4f} (evaluation {report['best']['evaluation']})",
        f"- re-merged from `{WINNER}`: {report['reproduction']['fitness']:.4f} (difference {report['reproduction']['difference']:.2e})",
        f"- seconds per candidate: {built(report)}, score {report['timing']['score_seconds']:.3f}; "
        f"merging the winner to disk and loading it took {report['reproduction']['merge_to_disk_and_load_seconds']:.2f}",
    ]
    steps = report["best"]["parameters"].get("steps")
    if steps is not None:
        lines.append(f"- the winner's path ({len(steps)} steps, `model.layer×scale`): {' → '.join(steps)}")
    racing = report.get("racing")
    if racing is not None:
        lines.append(f"- fitness on a minibatch of {racing['minibatch']} examples per task and generation; the best "
                     f"{racing['race']} of each generation re-scored on the whole split ({racing['re_scored']} re-scored, "
                     f"{racing['seconds']:.1f} s); the winner's minibatch fitness was {report['best']['minibatch_fitness']:.4f}")
    if report.get("genome_plot_skipped", "") is None:
        lines.append("- the winner's genome, group of layers × model: ![genome](genome.png)")
    front = report.get("pareto") or []
    if front:
        lines += ["", f"## Pareto front on `{report['search_split']}` ({len(front)} candidates no other beats on every term)", "",
                  "| evaluation | " + " | ".join(terms) + " | fitness | recipe |", "|---" * (len(terms) + 3) + "|"]
        lines += [f"| {row['evaluation']} | " + " | ".join(f"{row['scores'][term]:.4f}" for term in terms)
                  + f" | {row['fitness']:.4f} | `pareto/{Path(row['recipe']).name}` |" for row in front]
    lines += ["", f"## Test split (`{report['test_split']}`)", "",
              "Brackets: the bootstrap 95% interval (examples resampled within each task).", "",
              table(report["test"], terms), ""]
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")



def path_plot(pool: Any, values: list[float], path: Path) -> str | None:
    """The winner's layer path drawn: one row per source layer, one column per step (a dot where
    the step takes that layer, its area the step's scale); returns why it was not drawn, else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return "matplotlib is not installed (pip install 'mergeforge[evolve]')"
    space = pool.space
    steps = space.steps(values)
    rows = [(model, layer) for model, count in enumerate(space.layer_counts) for layer in range(count)]
    row_of = {key: index for index, key in enumerate(rows)}
    figure, axes = plt.subplots(figsize=(max(4.0, 0.4 * len(steps) + 2), max(2.5, 0.3 * len(rows) + 1)))
    xs, ys = list(range(len(steps))), [row_of[(s.model, s.layer)] for s in steps]
    axes.plot(xs, ys, color="grey", linewidth=0.8, zorder=1)
    axes.scatter(xs, ys, s=[60 * s.scale for s in steps], c=[s.model for s in steps], cmap="tab10", vmin=0, vmax=9, zorder=2)
    axes.set_yticks(range(len(rows)), [f"{space.model_names[m]}.{layer}" for m, layer in rows], fontsize=7)
    axes.set_xticks(xs)
    axes.set_xlabel("step (dot area: scale)")
    axes.set_title(f"winner's path: {len(steps)} steps over {len(rows)} source layers", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def genome_grids(pool: Any, values: list[float]) -> dict[str, list[list[float]]]:
    """Each searched per-model parameter's values: ``grid[group][model]``."""
    space = pool.space
    grids: dict[str, list[list[float]]] = {}
    for gene, value in zip(space.genes, values, strict=True):
        if gene.model is not None:
            grid = grids.setdefault(gene.param, [[float("nan")] * space.model_count for _ in space.labels])
            grid[gene.group][gene.model] = float(value)
    return grids


def genome_plot(pool: Any, values: list[float], path: Path) -> str | None:
    """The winner's genome as heatmaps, one per searched per-model parameter: a row per group of
    layers, a column per model, the cell the value. Drawn for ``layer_groups`` above 1 (one group
    is one row, which the report's parameters already list); returns why not, else None."""
    if pool.config.is_layer_path or pool.config.layer_groups == 1:
        return "one group of layers: the parameters are listed in report.json"
    genes = [(gene, value) for gene, value in zip(pool.space.genes, values, strict=True) if gene.model is not None]
    if not genes:
        return "no per-model parameter is searched"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return "matplotlib is not installed (pip install 'mergeforge[evolve]')"
    grids = genome_grids(pool, values)
    bounds = {gene.param: (gene.low, gene.high) for gene, _ in genes}
    labels, models = pool.space.labels, [Path(p).name for p in pool.model_dirs]
    figure, axes = plt.subplots(1, len(grids), figsize=(2.2 + 1.1 * len(models) * len(grids), 1.2 + 0.45 * len(labels)),
                                squeeze=False)
    for axis, (param, grid) in zip(axes[0], grids.items(), strict=True):
        low, high = bounds[param]
        image = axis.imshow(grid, cmap="viridis", vmin=low, vmax=high, aspect="auto")
        for row, cells in enumerate(grid):
            for column, value in enumerate(cells):
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
        axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=7)
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        axis.set_title(f"{param} (colour: its bounds)", fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.05)
    figure.suptitle("the winner's genome: group of layers × model", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


OPTIMIZER_NAMES = {"cma": "CMA-ES", "nsga2": "NSGA-II over the fitness terms"}


def append_model_card(out_dir: Path, report: dict[str, Any], terms: list[str]) -> None:
    """The search's account in ``model/README.md`` (the engine's model card: front matter, the
    models merged, the recipe): how it was found, with what seed and budget, and its scores."""
    config = yaml.safe_load((out_dir / "search.yml").read_text(encoding="utf-8"))
    budget = config["budget"]
    limits = " and ".join(f"{value} {name}" for name, value in budget.items() if value is not None)
    best = report["best"]
    lines = [
        "", "## How it was found", "",
        f"By `mergeforge evolve` ({OPTIMIZER_NAMES[report['optimizer']]}, Akiba et al., arXiv:2403.13187): method `{report['method']}`, "
        f"{report['dimensions']} genes, seed {report['seed']}, budget {limits}; {report['evaluations']} candidates "
        f"evaluated ({report['failed']} failed), {report['stopped']}.",
        "",
        f"- fitness (Σ weight × metric) on the `{report['search_split']}` split: {best['fitness']:.4f}, found at "
        f"evaluation {best['evaluation']}; this folder, re-merged from the recipe, scores {report['reproduction']['fitness']:.4f}",
        f"- reproduce: `mergeforge merge winner.yml OUT_DIR --seed {report['seed']}` (the recipe above is `winner.yml`)",
        "", f"## Scores on the held-out `{report['test_split']}` split", "",
        "Brackets: the bootstrap 95% interval (examples resampled within each task).", "",
        table(report["test"], terms), "",
    ]
    card = out_dir / "model" / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    card.write_text(text.rstrip("\n") + "\n" + "\n".join(lines), encoding="utf-8")
