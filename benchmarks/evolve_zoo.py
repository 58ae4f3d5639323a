"""The three searches of docs/evolve.md on the tiny zoo's six experts, Sakana-style: parameter
space (TIES weights, densities and λ), layer path alone (data-flow space), the same with every
scale fixed at 1, and a layer path whose first source is the parameter-space winner (both
combined); one test-split table for all. A search whose folder already has its report.json is read,
not run again.

    python benchmarks/evolve_zoo.py runs/evolve-zoo [--evaluations 240] [--repeats 2] [--seed 0]

Writes OUT/{ps,dfs,dfs_unscaled,ps_dfs}/ (each a full ``mergeforge evolve`` output folder, with its search.yml)
and prints the table: per-task test accuracy (%) and the mean.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

EXPERTS = ("reverse", "sort", "shift", "count", "translate", "brackets")


def searches(zoo: Path, evaluations: int, repeats: int, seed: int, ps_winner: Path) -> dict[str, dict[str, Any]]:
    models = [str(zoo / "models" / f"expert_{name}") for name in EXPERTS]
    common: dict[str, Any] = {
        "base_model": str(zoo / "models" / "base"),
        "fitness": [{"task": str(zoo / "tasks" / name)} for name in EXPERTS],
        "budget": {"evaluations": evaluations}, "seed": seed,
    }
    return {
        "ps": {**common, "merge_method": "ties", "models": models, "search": {
            "weight": {"low": 0.0, "high": 2.0}, "density": {"low": 0.1, "high": 1.0}, "lambda": {"low": 0.5, "high": 2.5}}},
        "dfs": {**common, "layer_path": {"models": models, "repeats": repeats}},
        "dfs_unscaled": {**common, "baselines": [], "layer_path": {"models": models, "repeats": repeats, "search_scales": False}},
        "ps_dfs": {**common, "baselines": [], "layer_path": {"models": [str(ps_winner), *models], "repeats": repeats}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--evaluations", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import yaml

    from mergeforge.evolve.api import run_search
    from mergeforge.zoo import build_zoo
    from mergeforge.zoo.build import default_zoo_dir

    build_zoo(None, size="tiny", seed=0)
    zoo = default_zoo_dir("tiny", 0)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = searches(zoo, args.evaluations, args.repeats, args.seed, args.out / "ps" / "winner.yml")
    reports: dict[str, dict[str, Any]] = {}
    for name, search in plan.items():
        done = args.out / name / "report.json"
        if done.is_file():  # finished by an earlier run of this script: read, not searched again
            reports[name] = json.loads(done.read_text(encoding="utf-8"))
            summary = args.out / "summary.json"
            earlier = json.loads(summary.read_text())[name] if summary.is_file() else {}
            reports[name]["wall_seconds"] = earlier.get("wall_seconds")  # unknown if the earlier run stopped before its summary
            continue
        path = args.out / f"{name}.yml"
        path.write_text(yaml.safe_dump(search, sort_keys=False), encoding="utf-8")
        started = time.perf_counter()
        reports[name] = run_search(path, args.out / name, progress=print)
        reports[name]["wall_seconds"] = time.perf_counter() - started
    print(table(reports))
    (args.out / "summary.json").write_text(json.dumps({
        name: {"test": r["test"], "best": r["best"], "seconds": r["seconds"], "wall_seconds": r["wall_seconds"],
               "candidates_per_minute": r["candidates_per_minute"], "reproduction": r["reproduction"],
               "dimensions": r["dimensions"]} for name, r in reports.items()}, indent=2) + "\n", encoding="utf-8")


def table(reports: dict[str, dict[str, Any]]) -> str:
    """Every row of the parameter-space report's test table, then each search's winner."""
    lines = ["| model (test split) | " + " | ".join(EXPERTS) + " | mean |", "|---" * (len(EXPERTS) + 2) + "|"]

    def line(label: str, row: dict[str, Any]) -> None:
        if "error" in row:
            lines.append(f"| {label} | " + " | ".join("-" for _ in EXPERTS) + f" | failed: {row['error']} |")
            return
        cells = [100 * row["scores"][name] for name in EXPERTS]
        lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells) / len(cells):.1f} |")

    first = next(iter(reports.values()))
    for row in first["test"][:-1]:
        line(row["name"], row)
    for name, report in reports.items():
        line(f"evolved: {name}", report["test"][-1])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
