"""Benchmark output: ``results.json`` (everything), ``results.md`` (tables) and ``results.png``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from mergeforge.bench.grids import MULTITASK, PAIRWISE, PER_TASK, describe
from mergeforge.bench.runner import BenchResult


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


PROTOCOL_TITLES = {
    PER_TASK: "One model per task (the task id picks the model at inference)",
    PAIRWISE: "Two experts at a time (disjoint pairs; each pair's model scored on its two tasks)",
}
PROTOCOL_LABELS = {MULTITASK: "", PER_TASK: " (per task)", PAIRWISE: " (pairs)"}


def ranked_rows(result: BenchResult, protocol: str | None = None) -> list[dict[str, Any]]:
    """Rows of absolute and normalised test accuracy: the baselines, then the methods that ran,
    best first; ``protocol`` keeps only the methods scored that way (and, for it, no baselines)."""
    rows: list[dict[str, Any]] = []
    if protocol in (None, MULTITASK):
        for name, scores in result.baselines.items():
            if name.startswith("expert: "):
                continue  # each expert's row is summarised by "individual experts"
            rows.append({"name": name, "kind": "baseline", "protocol": MULTITASK, "scores": scores, "settings": ""})
    for method in [*result.methods, *result.pairwise_reference]:
        if method.status == "ok" and protocol in (None, method.protocol):
            rows.append({"name": method.method, "kind": "method", "protocol": method.protocol, "scores": method.test,
                         "settings": describe(method.chosen), "merge_seconds": method.merge_seconds})
    for row in rows:
        row["mean"] = _mean([row["scores"][t] for t in result.tasks])
        row["normalised"] = _mean(list(result.normalised(row["scores"]).values()))
    baselines = [r for r in rows if r["kind"] == "baseline"]
    methods = sorted((r for r in rows if r["kind"] == "method"), key=lambda r: -r["normalised"])
    return baselines + methods


def _table(rows: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    lines = [
        "| model / method | " + " | ".join(tasks) + " | mean acc. | mean norm. | chosen on validation | merge s |",
        "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | --- | ---: |",
    ]
    for row in rows:
        name = f"*{row['name']}*" if row["kind"] == "baseline" else f"`{row['name']}`"
        seconds = f"{row['merge_seconds']:.2f}" if "merge_seconds" in row else ""
        lines.append(f"| {name} | " + " | ".join(_pct(row["scores"][t]) for t in tasks)
                     + f" | {_pct(row['mean'])} | {_pct(row['normalised'])} | {row['settings']} | {seconds} |")
    return lines


def markdown(result: BenchResult) -> str:
    tasks = result.tasks
    lines = _table(ranked_rows(result, MULTITASK), tasks)
    skipped = [m for m in result.methods if m.status != "ok"]
    if skipped:
        lines += ["", "Not in the tables:", ""]
        lines += [f"- `{m.method}` ({m.status}): {m.reason}" for m in skipped]
    for protocol, title in PROTOCOL_TITLES.items():
        rows = ranked_rows(result, protocol)
        if rows:
            lines += ["", f"### {title}", "", *_table(rows, tasks)]
            if protocol == PAIRWISE and result.pairwise_reference:
                reference = ", ".join(f"`{m.method}`" for m in result.pairwise_reference)
                lines += ["", f"{reference}: multi-model methods run on the same pairs, for comparison."]
    multitask = result.baselines.get("multi-task model")
    best = next((r for r in ranked_rows(result, MULTITASK) if r["kind"] == "method"), None)
    if multitask is not None and best is not None:
        multitask_norm = _mean(list(result.normalised(multitask).values()))
        share = best["normalised"] / multitask_norm if multitask_norm else 0.0
        lines += ["", f"Best merge (`{best['name']}`) against the multi-task model: {_pct(best['normalised'])} / "
                      f"{_pct(multitask_norm)} normalised = {_pct(share)}% of multi-task "
                      f"training; mean accuracy {_pct(best['mean'])} / {_pct(_mean([multitask[t] for t in result.tasks]))}."]
    if result.negation:
        rows = result.negation["rows"]
        general = all("general" in r for r in rows)
        head = "| model | behaviour rate | mean task acc. | tasks averaged |" + (
            " general: perplexity | general: base's answer kept |" if general else "")
        lines += ["", "### Task negation", "", head, "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if general else "")]
        for r in rows:
            extra = f" {r['general']['perplexity']:.3f} | {_pct(r['general']['same_answer'])} |" if general else ""
            lines.append(f"| {r['model']} | {_pct(r['behaviour_rate'])} | {_pct(r['mean_accuracy'])} | {len(r['tasks'])} |{extra}")
    if result.composition:
        composition = result.composition
        lines += ["", f"### Composition: `{composition['task']}` (needs {' and '.join(composition['experts'])} at once)", "",
                  "| model | test acc. | chosen on validation |", "| --- | ---: | --- |"]
        lines += [f"| {r['model']} | {_pct(r['test'])} | {r.get('settings', '')} |" for r in composition["rows"]]
    if result.curve:
        counts = sorted({p["experts"] for points in result.curve.values() for p in points})
        lines += ["", "### Normalised accuracy against the number of merged experts", "",
                  "| method | " + " | ".join(str(k) for k in counts) + " |", "| --- | " + " | ".join("---:" for _ in counts) + " |"]
        for name, points in result.curve.items():
            by_k = {p["experts"]: p["normalised"] for p in points}
            lines.append(f"| `{name}` | " + " | ".join(_pct(by_k[k]) if k in by_k else "" for k in counts) + " |")
    lines += ["", "Hyperparameter grid searched per method (validation mean accuracy):", ""]
    for method in [*result.methods, *result.pairwise_reference]:
        if method.status == "ok" and len(method.validation) > 1:
            label = method.method + PROTOCOL_LABELS[method.protocol]
            tried = ", ".join(f"{describe(v['params'])}: {_pct(v['mean'])}" if "mean" in v else f"{describe(v['params'])}: error"
                              for v in method.validation)
            lines.append(f"- `{label}`: {tried}")
    return "\n".join(lines) + "\n"


def chart(result: BenchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ranked_rows(result)
    height = max(6.0, 0.2 * len(rows))
    figure, axes = plt.subplots(1, 2 if result.curve else 1, figsize=(15 if result.curve else 10, height), squeeze=False)
    bars = axes[0][0]
    names = [r["name"] + PROTOCOL_LABELS[r["protocol"]] for r in rows]
    values = [100 * r["normalised"] for r in rows]
    palette = {MULTITASK: "#3b75af", PER_TASK: "#c0504d", PAIRWISE: "#9bbb59"}
    colours = ["#888888" if r["kind"] == "baseline" else palette[r["protocol"]] for r in rows]
    bars.barh(range(len(rows)), values, color=colours)
    bars.set_yticks(range(len(rows)), names, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("mean normalised test accuracy (%)")
    bars.set_title("Merging the zoo's experts (grey: baselines; red: one model per task; green: pairs)")
    if result.curve:
        lines = axes[0][1]
        for name, points in result.curve.items():
            lines.plot([p["experts"] for p in points], [100 * p["normalised"] for p in points], marker="o", label=name)
        lines.set_xlabel("experts merged")
        lines.set_ylabel("mean normalised test accuracy (%)")
        lines.set_title("Accuracy against the number of experts")
        lines.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


def write_report(result: BenchResult, out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``.

    Each file is written beside its place first and renamed into it, so a reader never sees a
    half-written file and an interrupted run leaves the previous results intact.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "chart": out_dir / "results.png"}
    staging = {kind: path.with_name(f".{path.name}.{os.getpid()}.tmp") for kind, path in paths.items()}
    try:
        payload = dataclasses.asdict(result)
        payload["ranking"] = ranked_rows(result)
        staging["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
        staging["markdown"].write_text(markdown(result))
        chart(result, staging["chart"])
        for kind, path in paths.items():
            os.replace(staging[kind], path)
    finally:
        for temp in staging.values():
            temp.unlink(missing_ok=True)
    return paths
