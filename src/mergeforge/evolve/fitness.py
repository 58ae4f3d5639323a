"""Cheap but honest fitness: minibatches, racing, and bootstrap confidence intervals.

- **Minibatch** (``splits.minibatch: N``): generation g scores every candidate on the same N
  examples per task, drawn without replacement from the search split by a generator seeded with
  (seed, g, task), so a generation's candidates are compared on equal terms, a resumed run draws
  the same examples, and a worker process or Ray actor draws them itself.
- **Racing** (``splits.race: K``): a minibatch score is noisy, and the best of many noisy scores
  is biased upwards; so the K best candidates of each generation are re-scored on the whole search
  split (``race.jsonl``, one line each), and the winner is the best of those re-scored candidates,
  never a minibatch score.
- **Bootstrap intervals** of the test table: an exact-match score is a mean of 0/1 verdicts, and
  resampling n verdicts with replacement from c correct ones draws Binomial(n, c/n) correct, so the
  nonparametric bootstrap of a task's score (and of the fitness, tasks resampled independently)
  needs only the counts. Loss terms (a mean over tokens) get no interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.evolve.journal import append_line, read_lines
from mergeforge.tasks.folders import Example, Task

RACE = "race.jsonl"
# Bootstrap resamples per interval: the 2.5% and 97.5% quantiles of 2000 draws move by well under
# a point of accuracy between seeds on a 100-example task.
RESAMPLES = 2000


@dataclass(frozen=True)
class MinibatchTask(Task):
    """A task folder whose examples on any split are a seeded sample of ``size`` of them."""

    size: int = 1
    draw: tuple[int, ...] = ()  # the generator's seed: (search seed, generation, task index)

    def examples(self, split: str = "test", max_examples: int | None = None) -> list[Example]:
        import numpy as np

        every = super().examples(split, max_examples)
        if self.size >= len(every):
            return every
        chosen = np.random.default_rng(list(self.draw)).choice(len(every), size=self.size, replace=False)
        return [every[int(i)] for i in sorted(chosen)]


def minibatch_tasks(config: Any, tasks: list[Task], generation: int) -> list[Task]:
    """Generation ``generation``'s minibatch of each task (the same for all its candidates)."""
    assert config.splits.minibatch is not None
    return [MinibatchTask(task.spec, task.folder, size=config.splits.minibatch, draw=(config.seed, generation, index))
            for index, task in enumerate(tasks)]


# -- racing ----------------------------------------------------------------------------------------


def read_races(out_dir: Path) -> list[dict[str, Any]]:
    return read_lines(out_dir / RACE)


def race_generation(pool: Any, out_dir: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Re-score the best ``splits.race`` candidates of one generation's journal lines on the whole
    search split (those already in ``race.jsonl`` are read back, not scored again); returns their
    race lines. Nothing without a minibatch."""
    count = pool.config.splits.race_size
    if not count or not results:
        return []
    done = {(line["generation"], line["candidate"]): line for line in read_races(out_dir)}
    scored = [e for e in results if e["fitness"] is not None]
    best = sorted(scored, key=lambda e: (-e["fitness"], e["candidate"]))[:count]
    lines = []
    for entry in best:
        key = (entry["generation"], entry["candidate"])
        if key not in done:
            started = time.perf_counter()
            try:
                full = pool.evaluate(pool.space.values(entry["genome"]))
                line = {"scores": full.scores, "fitness": full.fitness, "error": None}
            except Exception as exc:  # noqa: BLE001 - a candidate that fails on the whole split is out of the race
                pool.forget()
                line = {"scores": {}, "fitness": None, "error": f"{type(exc).__name__}: {exc}"}
            done[key] = {"generation": key[0], "candidate": key[1], "minibatch_fitness": entry["fitness"], **line,
                         "seconds": time.perf_counter() - started}
            append_line(out_dir / RACE, done[key])
        lines.append(done[key])
    return lines


def race_all(pool: Any, out_dir: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Race every generation of the journal not raced yet (the last ones a budget cut short); returns
    every race line."""
    if not pool.config.splits.race_size:
        return []
    generations: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        generations.setdefault(entry["generation"], []).append(entry)
    for generation in sorted(generations):
        race_generation(pool, out_dir, generations[generation])
    return read_races(out_dir)


# -- bootstrap -------------------------------------------------------------------------------------


def bootstrap_interval(terms: list[tuple[float, int, int]], seed: int, level: float = 0.95,
                       resamples: int = RESAMPLES) -> tuple[float, float]:
    """The percentile bootstrap interval of Σ weight × correct / n over ``(weight, correct, n)``
    terms, each task's examples resampled with replacement (drawn as Binomial(n, correct / n))."""
    import numpy as np

    generator = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for weight, correct, count in terms:
        total += weight * generator.binomial(count, correct / count, resamples) / count
    low, high = np.quantile(total, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def row_intervals(config: Any, scores: dict[str, float], counts: dict[str, int]) -> dict[str, list[float]]:
    """95% intervals of each exact-match term of one test-table row and, when every term is one, of
    its fitness. ``counts``: the examples scored per term."""
    intervals: dict[str, list[float]] = {}
    terms = []
    for term in config.fitness:
        key = term.key
        if term.metric != "score" or key not in counts:  # an lm-eval term's count is not known here
            continue
        n = counts[key]
        correct = round(scores[key] * n)
        intervals[key] = list(bootstrap_interval([(1.0, correct, n)], config.seed))
        terms.append((term.weight, correct, n))
    if len(terms) == len(config.fitness):
        intervals["fitness"] = list(bootstrap_interval(terms, config.seed))
    return intervals
