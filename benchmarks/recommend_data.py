"""Training points for ``mergeforge analyze``'s recommendation: random subsets of a zoo's experts,
their statistics, and the measured normalised accuracy of every candidate setting.

    python benchmarks/recommend_data.py ZOO_DIR POINTS.jsonl [--subsets 18] [--examples 20] [--seed 0]

Subsets cycle through the sizes 2..N (N = the zoo's experts; the whole set once), experts drawn at
random. For each: ``analyze --no-spectral`` at the predictor's density
(:data:`mergeforge.analysis.recommend.DENSITY`) gives the features, and every setting of
:data:`mergeforge.analysis.recommend.SETTINGS` is merged in memory through the bench's merger and
scored on the validation split of the subset's tasks (the first ``--examples`` of each), normalised
by each task's own expert on the same examples. One JSON line per subset is appended to
POINTS.jsonl as it finishes; subsets already there are skipped, so an interrupted run resumes.
``benchmarks/recommend_fit.py`` fits the predictor on the points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any


def draw_subsets(tasks: list[str], count: int, seed: int) -> list[list[str]]:
    """``count`` distinct subsets of ``tasks``, their sizes cycling 2, 3, ..., N (N once)."""
    rng = random.Random(seed)
    sizes = list(range(2, len(tasks) + 1))
    chosen: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    attempts = 0
    while len(chosen) < count and attempts < 100 * count:
        size = sizes[attempts % len(sizes)]
        attempts += 1
        subset = sorted(rng.sample(tasks, size), key=tasks.index)
        if frozenset(subset) not in seen:
            seen.add(frozenset(subset))
            chosen.append(subset)
    return chosen


def main() -> None:
    from mergeforge.analysis.analyze import analyze
    from mergeforge.analysis.recommend import DENSITY, SETTINGS, features, label
    from mergeforge.bench.grids import plan_method
    from mergeforge.bench.runner import ModelPool, _Merger, _Setting
    from mergeforge.bench.suite import suite_from_zoo
    from mergeforge.methods.registry import get_method
    from mergeforge.zoo import load_zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("points", type=Path)
    parser.add_argument("--subsets", type=int, default=18)
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    zoo = load_zoo(args.zoo)
    suite = suite_from_zoo(zoo)
    tasks = list(suite.experts)
    done = set()
    if args.points.exists():
        done = {frozenset(json.loads(line)["experts"]) for line in args.points.read_text().splitlines() if line.strip()}
    pool = ModelPool(suite, args.examples, 128, "cpu", args.examples)
    base_state = pool.state(suite.base)
    states = {task: pool.state(suite.experts[task]) for task in tasks}
    own = {task: pool.score_state(states[task], "val", [task])[task] for task in tasks}
    print(f"{zoo.root}: {len(tasks)} experts; own val scores " + ", ".join(f"{t} {100 * s:.0f}" for t, s in own.items()), flush=True)
    for subset in draw_subsets(tasks, args.subsets, args.seed):
        if frozenset(subset) in done:
            continue
        started = time.perf_counter()
        report = analyze(suite.base, [suite.experts[t] for t in subset], density=DENSITY, spectral=False)
        analyzed = time.perf_counter() - started
        merger = _Merger(pool, dataclasses.replace(suite, experts={t: suite.experts[t] for t in subset}), base_state,
                         [states[t] for t in subset], args.seed)
        runs: dict[str, _Setting] = {}
        scores: dict[str, float] = {}
        raw: dict[str, dict[str, float]] = {}
        for method, params in SETTINGS:
            if method not in runs:
                runs[method] = _Setting(plan_method(get_method(method), len(subset)), pool, merger, subset)
            merged, _ = runs[method].merge(params)
            measured = runs[method].score(merged, "val")
            name = label(method, params)
            raw[name] = measured
            scores[name] = sum(measured[t] / own[t] if own[t] > 0 else 0.0 for t in subset) / len(subset)
        del runs
        overall: dict[str, Any] = report["overall"]
        point = {"zoo": zoo.size, "zoo_hash": zoo.content_hash, "experts": subset, "examples": args.examples,
                 "features": features(overall), "overall": {key: overall[key] for key in
                                                            ("mean_pairwise_cosine", "relative_norm", "sign_conflict_rate",
                                                             "kept_by_two_share")},
                 "own": {t: own[t] for t in subset}, "scores": scores, "raw": raw,
                 "seconds": {"analyze": round(analyzed, 1), "total": round(time.perf_counter() - started, 1)}}
        with args.points.open("a") as stream:
            stream.write(json.dumps(point) + "\n")
        best = max(scores, key=scores.__getitem__)
        print(f"{len(subset)} experts {','.join(subset)}: best {best} {scores[best]:.3f}; linear {scores['linear']:.3f} "
              f"({point['seconds']['total']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
