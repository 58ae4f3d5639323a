"""Fit ``mergeforge analyze``'s recommendation predictor on points from ``recommend_data.py``, and
measure it held out.

    python benchmarks/recommend_fit.py POINTS.jsonl... [--out src/mergeforge/analysis/recommend_model.json]

Prints, as Markdown, for leave-one-subset-out (each point predicted by a predictor fitted on all the
others) and leave-one-zoo-out (each zoo's points predicted from the other zoos' only):

- regret: the best setting's normalised accuracy minus the recommended one's, in points (mean, median, max);
- the same for the constant baseline, the setting with the best mean on the training points;
- top-1: how often the recommendation is the best setting (ties count);
- confidence: the mean stated confidence, next to how often the recommendation really scored at
  least as well as the runner-up it was compared with.

Subsets of one zoo share experts, so leave-one-subset-out is optimistic; leave-one-zoo-out is the
honest test of a new zoo, with only two zoos to learn from. With ``--out``, the predictor fitted on
every point is written there (the file shipped with the package).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any


def held_out(points: list[dict[str, Any]], folds: Sequence[tuple[str, list[int]]]) -> dict[str, Any]:
    """Regret and hit rates of the predictor and the constant baseline on held-out ``folds``."""
    from mergeforge.analysis.recommend import fit, recommend

    rows: dict[str, list[float]] = {"regret": [], "baseline_regret": [], "hit": [], "confidence": [], "beat_runner_up": [],
                                     "extrapolating": []}
    for _, test in folds:
        train = [p for i, p in enumerate(points) if i not in test]
        model = fit(train)
        mean = {name: statistics.fmean(p["scores"][name] for p in train) for name in model["settings"]}
        constant = max(mean, key=mean.__getitem__)
        for i in test:
            scores = points[i]["scores"]
            best = max(scores[name] for name in model["settings"])
            rec = recommend(points[i]["overall"], model["density"], model)
            rows["regret"].append(100 * (best - scores[rec["setting"]]))
            rows["baseline_regret"].append(100 * (best - scores[constant]))
            rows["hit"].append(float(scores[rec["setting"]] >= best))
            rows["extrapolating"].append(float(bool(rec["extrapolating"])))
            if rec["confidence"] is not None:
                rows["confidence"].append(rec["confidence"])
            rows["beat_runner_up"].append(float(scores[rec["setting"]] >= scores[rec["runner_up"]]))
    return rows


def table(title: str, rows: dict[str, list[float]]) -> str:
    def stats(values: list[float]) -> str:
        return f"{statistics.fmean(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"

    def share(values: list[float]) -> str:
        return f"{100 * statistics.fmean(values):.0f}%"

    return "\n".join([
        f"**{title}** ({len(rows['regret'])} held-out points)", "",
        "| | regret, points (mean / median / max) | top-1 |", "|---|---|---:|",
        f"| predictor | {stats(rows['regret'])} | {share(rows['hit'])} |",
        f"| constant baseline (best mean on the training points) | {stats(rows['baseline_regret'])} | |", "",
        f"Stated confidence {share(rows['confidence']) if rows['confidence'] else 'none'} on average "
        f"({share(rows['extrapolating'])} of the points outside the fitted range, with no confidence); the "
        f"recommendation scored at least as well as the runner-up on {share(rows['beat_runner_up'])} of the points.", ""])


def common_settings(points: list[dict[str, Any]]) -> list[str]:
    """The settings every point scored (a zoo's points may not have been scored on one added later)."""
    from mergeforge.analysis.recommend import SETTINGS, label

    return [label(m, p) for m, p in SETTINGS if all(label(m, p) in point["scores"] for point in points)]


def settings_table(points: list[dict[str, Any]], zoos: list[str]) -> str:
    """Each setting's mean normalised accuracy per zoo, and how often it was the best."""
    names = common_settings(points)
    lines = ["| setting | " + " | ".join(f"{zoo}: mean normalised | {zoo}: best on" for zoo in zoos) + " |",
             "|---|" + "---:|---:|" * len(zoos)]
    for name in names:
        cells = []
        for zoo in zoos:
            rows = [p["scores"] for p in points if p["zoo"] == zoo]
            wins = sum(row[name] >= max(row[n] for n in names) for row in rows)
            cells += [f"{100 * statistics.fmean(row[name] for row in rows):.1f}", f"{wins}/{len(rows)}"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from mergeforge.analysis.recommend import fit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("points", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    points = [json.loads(line) for path in args.points for line in path.read_text().splitlines() if line.strip()]
    names = common_settings(points)
    # Held out, a point is judged on the settings the predictor chose among: those every point scored.
    points = [{**p, "scores": {name: p["scores"][name] for name in names}} for p in points]
    zoos = sorted({p["zoo"] for p in points})
    print(f"{len(points)} points: " + ", ".join(f"{z} {sum(p['zoo'] == z for p in points)}" for z in zoos) + "\n")
    print(settings_table(points, zoos))
    print(table("Leave one subset out", held_out(points, [(str(i), [i]) for i in range(len(points))])))
    for zoo in zoos if len(zoos) > 1 else []:
        rest = [p for p in points if p["zoo"] == zoo]
        print(table(f"Leave one subset out, {zoo} zoo only", held_out(rest, [(str(i), [i]) for i in range(len(rest))])))
    if len(zoos) > 1:
        folds = [(zoo, [i for i, p in enumerate(points) if p["zoo"] == zoo]) for zoo in zoos]
        print(table("Leave one zoo out", held_out(points, folds)))
    if args.out is not None:
        model = fit(points)
        model["fitted_on"] = {"zoos": {z: sum(p["zoo"] == z for p in points) for z in zoos}, "date": date.today().isoformat(),
                              "examples_per_task": sorted({p["examples"] for p in points})}
        args.out.write_text(json.dumps(model, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
