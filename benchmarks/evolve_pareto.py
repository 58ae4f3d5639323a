"""NSGA-II against CMA-ES on the same two-objective search: the Pareto front each finds.

TIES over two of the tiny zoo's experts (weight and density per model, λ: 5 genes), the two
experts' exact-match scores on the validation split as the two fitness terms. CMA-ES maximises
their sum, and its front is that of the candidates it visited; NSGA-II searches the front itself.
For each seed, both get the same budget; the table gives each front's size, its hypervolume
(the area it dominates above the reference point (0, 0), in score units: larger is better;
pymoo's indicator), the best sum on the front, and the front's spread along each task.

    python benchmarks/evolve_pareto.py OUT [--evaluations 120] [--seeds 0,1,2] [--tasks shift,reverse]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def search(zoo: Path, tasks: list[str], optimizer: str, evaluations: int, seed: int) -> dict[str, Any]:
    return {
        "merge_method": "ties", "base_model": str(zoo / "models" / "base"),
        "models": [str(zoo / "models" / f"expert_{task}") for task in tasks],
        "search": {"weight": {"low": 0.0, "high": 2.0}, "density": {"low": 0.1, "high": 1.0}, "lambda": {"low": 0.5, "high": 2.5}},
        "fitness": [{"task": str(zoo / "tasks" / task)} for task in tasks],
        "budget": {"evaluations": evaluations}, "seed": seed, "optimizer": {"name": optimizer}, "baselines": [],
    }


def front_summary(report: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    import numpy as np
    from pymoo.indicators.hv import HV

    points = np.array([[row["scores"][task] for task in tasks] for row in report["pareto"]])
    return {
        "size": len(points),
        "hypervolume": float(HV(ref_point=np.zeros(len(tasks)))(-points)),  # pymoo minimises: negate scores, reference 0
        "best_sum": float(points.sum(1).max()),
        "best_per_task": [float(v) for v in points.max(0)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--evaluations", type=int, default=120)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="shift,reverse")
    args = parser.parse_args()

    from mergeforge.evolve.api import run_search
    from mergeforge.zoo import build_zoo
    from mergeforge.zoo.build import default_zoo_dir

    build_zoo(None, size="tiny", seed=0)
    zoo = default_zoo_dir("tiny", 0)
    tasks = args.tasks.split(",")
    rows: list[dict[str, Any]] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for optimizer in ("cma", "nsga2"):
            started = time.perf_counter()
            report = run_search(search(zoo, tasks, optimizer, args.evaluations, seed), args.out / f"{optimizer}-{seed}")
            rows.append({"optimizer": optimizer, "seed": seed, "seconds": time.perf_counter() - started,
                         **front_summary(report, tasks)})
            print(json.dumps(rows[-1]))
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"\n| optimizer | seed | front size | hypervolume | best sum on the front | best {' / best '.join(tasks)} | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for row in rows:
        best = " / ".join(f"{100 * v:.0f}" for v in row["best_per_task"])
        print(f"| {row['optimizer']} | {row['seed']} | {row['size']} | {row['hypervolume']:.3f} | {row['best_sum']:.3f} | {best} | "
              f"{row['seconds']:.0f} |")
    for optimizer in ("cma", "nsga2"):
        volumes = [r["hypervolume"] for r in rows if r["optimizer"] == optimizer]
        print(f"{optimizer}: median hypervolume {statistics.median(volumes):.3f}")


if __name__ == "__main__":
    main()
