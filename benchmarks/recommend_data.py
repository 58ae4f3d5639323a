"""Training points for ``mergeforge analyze``'s recommendation: random subsets of a zoo's experts,
their statistics, and the measured normalised accuracy of every candidate setting.

    python benchmarks/recommend_data.py ZOO_DIR POINTS.jsonl [--subsets 18] [--examples 20] [--seed 0]

Subsets cycle through the sizes 2..N (N = the zoo's experts; the whole set once), experts drawn at
random. For each: ``analyze --no-spectral`` at the predictor's density
(:data:`mergeforge.analysis.recommend.DENSITY`) gives the features, and every setting of
:data:`mergeforge.analysis.recommend.SETTINGS` is merged in memory through the bench's merger and
scored on the validation split of the subset's tasks (the first ``--examples`` of each), normalised
by each task's own expert on the same examples. POINTS.jsonl holds one JSON line per subset and is
rewritten whole after each; a run resumes from it, scoring only what its points lack (new subsets,
or settings added to SETTINGS since).
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
    from mergeforge.bench.runner import ExpertMerger, ModelPool, SettingRun
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
    points: dict[frozenset[str], dict[str, Any]] = {}
    if args.points.exists():
        for line in args.points.read_text().splitlines():
            if line.strip():
                point = json.loads(line)
                points[frozenset(point["experts"])] = point
    pool = ModelPool(suite, args.examples, 128, "cpu", args.examples)
    base_state = pool.state(suite.base)
    states = {task: pool.state(suite.experts[task]) for task in tasks}
    own = {task: pool.score_state(states[task], "val", [task])[task] for task in tasks}
    print(f"{zoo.root}: {len(tasks)} experts; own val scores " + ", ".join(f"{t} {100 * s:.0f}" for t, s in own.items()), flush=True)
    subsets = [sorted(p["experts"], key=tasks.index) for p in points.values()]  # earlier points first: completed if SETTINGS grew
    subsets += [s for s in draw_subsets(tasks, args.subsets, args.seed) if frozenset(s) not in points]
    for subset in subsets:
        point = points.get(frozenset(subset))
        missing = [(m, p) for m, p in SETTINGS if point is None or label(m, p) not in point["scores"]]
        if not missing:
            continue
        started = time.perf_counter()
        if point is None:
            report = analyze(suite.base, [suite.experts[t] for t in subset], density=DENSITY, spectral=False, recommend=False)
            overall: dict[str, Any] = report["overall"]
            point = {"zoo": zoo.size, "zoo_hash": zoo.content_hash, "experts": subset, "examples": args.examples,
                     "features": features(overall),
                     "overall": {key: overall[key] for key in ("mean_pairwise_cosine", "relative_norm", "sign_conflict_rate",
                                                               "kept_by_two_share")},
                     "own": {t: own[t] for t in subset}, "scores": {}, "raw": {},
                     "seconds": {"analyze": round(time.perf_counter() - started, 1), "merges_and_scores": 0.0}}
        merger = ExpertMerger(pool, dataclasses.replace(suite, experts={t: suite.experts[t] for t in subset}), base_state,
                         [states[t] for t in subset], args.seed)
        runs: dict[str, SettingRun] = {}
        merging = time.perf_counter()
        for method, params in missing:
            if method not in runs:
                runs[method] = SettingRun(plan_method(get_method(method), len(subset)), pool, merger, subset)
            merged, _ = runs[method].merge(params)
            measured = runs[method].score(merged, "val")
            name = label(method, params)
            point["raw"][name] = measured
            point["scores"][name] = sum(measured[t] / own[t] if own[t] > 0 else 0.0 for t in subset) / len(subset)
        del runs
        point["seconds"]["merges_and_scores"] = round(point["seconds"].get("merges_and_scores", 0.0)
                                                      + time.perf_counter() - merging, 1)
        points[frozenset(subset)] = point
        temporary = args.points.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(p) + "\n" for p in points.values()))
        temporary.replace(args.points)  # the file is whole after every subset
        scores = point["scores"]
        best = max(scores, key=scores.__getitem__)
        print(f"{len(subset)} experts {','.join(subset)}: {len(missing)} settings scored; best {best} {scores[best]:.3f}; "
              f"linear {scores['linear']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
