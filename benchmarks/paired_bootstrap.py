"""Is model A better than model B on the same examples? A paired bootstrap of the difference in
mean accuracy.

Both models are scored on the same first N examples of each task (exact match, forced scoring
with every verdict kept); the bootstrap resamples example indices within each task, the same
indices for both models, and recomputes the difference of the mean over tasks. Reported: the
difference, its 95% percentile interval, and the share of resamples in which A is not ahead (a
one-sided p-value). Unpaired intervals, one per model (as in an evolve report's test table),
overlap far more than the difference's own interval is wide when the two models agree on most
examples.

    python benchmarks/paired_bootstrap.py MODEL_A MODEL_B TASK_DIR... [--split test] [--max-examples 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

RESAMPLES = 10_000


def verdicts(model: Path, tasks: list[Path], split: str, max_examples: int | None) -> dict[str, np.ndarray]:
    from mergeforge.evaluate.api import evaluate_model

    result = evaluate_model(model, tasks, split=split, max_examples=max_examples, return_predictions=True,
                            with_loss=False, scoring="forced")
    return {name: np.array([bool(p["correct"]) for p in entry["predictions"]]) for name, entry in result["tasks"].items()}


def paired_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    generator = np.random.default_rng(seed)
    total = np.zeros(RESAMPLES)
    for name in a:
        n = len(a[name])
        picks = generator.integers(0, n, size=(RESAMPLES, n))
        total += (a[name][picks].mean(1) - b[name][picks].mean(1)) / len(a)
    difference = float(np.mean([a[name].mean() - b[name].mean() for name in a]))
    low, high = np.quantile(total, [0.025, 0.975])
    return {"difference": difference, "ci95": [float(low), float(high)], "p_not_ahead": float((total <= 0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_a", type=Path)
    parser.add_argument("model_b", type=Path)
    parser.add_argument("tasks", type=Path, nargs="+")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-examples", type=int, default=None)
    args = parser.parse_args()
    a = verdicts(args.model_a, args.tasks, args.split, args.max_examples)
    b = verdicts(args.model_b, args.tasks, args.split, args.max_examples)
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    only_a = sum(int((a[n] & ~b[n]).sum()) for n in a)
    only_b = sum(int((~a[n] & b[n]).sum()) for n in a)
    report = {"a": str(args.model_a), "b": str(args.model_b), "split": args.split,
              "mean_a": float(np.mean([v.mean() for v in a.values()])), "mean_b": float(np.mean([v.mean() for v in b.values()])),
              "right_in_both": both, "right_only_in_a": only_a, "right_only_in_b": only_b, **paired_bootstrap(a, b)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
