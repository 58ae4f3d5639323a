"""``run_search``: CMA-ES over a merge's parameters, resumable, with failed candidates logged.

The loop is ask/tell (``cma``): ask a generation, score each candidate in memory
(:class:`~mergeforge.evolve.candidates.CandidatePool`), append it to the journal, tell, pickle the
optimiser. The optimiser draws its normal samples from its own seeded generator, pickled with it,
so a resumed run asks the same candidates; candidates of an unfinished generation that the
journal already holds are not scored again. A candidate that raises (or scores NaN) gets the worst
fitness, its reason is journalled, and the search goes on.

At the end (:mod:`mergeforge.evolve.report`): the best candidate on the search split is exported as
a plain recipe, re-merged from that file by the engine, scored again, and compared with the
hand-set baselines on the test split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergeforge.evolve.config import SearchConfig
from mergeforge.evolve.fitness import race_generation
from mergeforge.evolve.journal import (
    append_entry,
    best_entry,
    load_optimizer,
    read_journal,
    save_optimizer,
)

# What cma is told for a failed candidate (it minimises): worse than any real fitness, finite so
# that cma's statistics stay finite.
FAILED_LOSS = 1e30


class SeededNormal:
    """cma's ``randn``: standard normals from a generator of our own, so that the draws are pickled
    with the optimiser (cma's default reads NumPy's global generator, which a pickle does not hold)."""

    def __init__(self, seed: int):
        self.generator = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.generator.standard_normal(shape)


def new_optimizer(config: SearchConfig, start: list[float]) -> Any:
    """CMA-ES started at ``start`` (unit cube), or NSGA-II with ``start`` in its first population."""
    if config.optimizer.name == "nsga2":
        from mergeforge.evolve.moo import ParetoSearch

        return ParetoSearch(config, start)
    import cma

    options: dict[str, Any] = {
        "seed": config.seed + 1,  # cma treats 0 as "draw a seed"
        "randn": SeededNormal(config.seed),
        "bounds": [0.0, 1.0],
        "verbose": -9, "verb_disp": 0, "verb_log": 0,  # no console output and no outcmaes/ folder
    }
    if config.optimizer.popsize is not None:
        options["popsize"] = config.optimizer.popsize
    if uses_diagonal(config, len(start)):
        options["CMA_diagonal"] = True
    return cma.CMAEvolutionStrategy(start, config.optimizer.sigma0, options)


def rehash_archives(optimizer: Any) -> Any:
    """The optimiser unpickled in a new process, with its solution archives usable again.

    cma keys the solutions it has asked for (``sent_solutions``, whose genotypes ``tell`` looks
    up) by ``hash(x.tobytes())``, and Python salts the hash of bytes per process. Unpickled
    elsewhere, those keys no longer match, so a generation asked in one process and told in
    another (the pipeline of ``--workers`` and ``--ray-address``, resumed) would be told without
    its genotypes and update differently. The keys are computed again from the solutions kept
    with them."""
    from cma.utilities.utils import SolutionDict

    for archive in vars(optimizer).values():
        if not isinstance(archive, SolutionDict):
            continue
        data, same, unhashed = archive.data, archive.data_with_same_key, archive._unhashed_keys
        archive.data, archive.data_with_same_key, archive._unhashed_keys = {}, {}, {}
        for old, value in data.items():
            solution = unhashed.get(old, old)
            key = archive.key(solution)
            archive.data[key] = value
            archive._unhashed_keys[key] = solution
            if old in same:
                archive.data_with_same_key[key] = same[old]
    return optimizer


def uses_diagonal(config: SearchConfig, dimensions: int) -> bool:
    """Separable CMA: as the search file says, else from DIAGONAL_FROM genes on."""
    from mergeforge.evolve.config import DIAGONAL_FROM

    return config.optimizer.diagonal if config.optimizer.diagonal is not None else dimensions >= DIAGONAL_FROM


@dataclass
class BudgetClock:
    """How much of the budget is spent: evaluations in the journal, and seconds over all runs."""

    config: SearchConfig
    evaluations: int = 0
    seconds_before: float = 0.0  # spent by earlier runs of a resumed search
    started: float = field(default_factory=time.perf_counter)

    def spent(self) -> bool:
        limit = self.config.budget
        if limit.evaluations is not None and self.evaluations >= limit.evaluations:
            return True
        return limit.seconds is not None and self.seconds() >= limit.seconds

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


def _entry_head(pool: Any, generation: int, index: int, unit: list[float]) -> dict[str, Any]:
    values = pool.space.values(unit)
    return {"generation": generation, "candidate": index, "genome": unit, "parameters": pool.space.described(values),
            "seed": pool.config.seed}


def failed_entry(pool: Any, generation: int, index: int, unit: list[float], error: str, seconds: float) -> dict[str, Any]:
    """The journal line of a candidate that failed: no scores, no fitness, the reason."""
    entry = _entry_head(pool, generation, index, unit)
    entry.update(scores={}, fitness=None, error=error, timing={"seconds": seconds})
    return entry


def journal_entry(pool: Any, generation: int, index: int, unit: list[float]) -> dict[str, Any]:
    """Score one candidate and return its journal line (a failure is a line too)."""
    entry = _entry_head(pool, generation, index, unit)
    values = pool.space.values(unit)
    started = time.perf_counter()
    try:
        scored = pool.evaluate(values, generation)
        if not math.isfinite(scored.fitness):
            raise FloatingPointError(f"fitness is {scored.fitness}")
    except Exception as exc:  # noqa: BLE001 - any failure of one candidate is logged, the search goes on
        pool.forget()
        return failed_entry(pool, generation, index, unit, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
    entry.update(scores=scored.scores, fitness=scored.fitness, error=None,
                 timing={"seconds": time.perf_counter() - started, "merge_seconds": scored.merge_seconds,
                         "score_seconds": scored.score_seconds, "remerged_groups": scored.remerged_groups})
    return entry


def loss_of(entry: dict[str, Any]) -> float:
    return FAILED_LOSS if entry["fitness"] is None else -float(entry["fitness"])


def tell(optimizer: Any, points: list[Any], entries: list[dict[str, Any]]) -> None:
    """Tell the optimiser a generation's journal lines: CMA-ES their losses (the negated weighted
    sum), NSGA-II the lines themselves (it reads one objective per fitness term)."""
    from mergeforge.evolve.moo import ParetoSearch

    if isinstance(optimizer, ParetoSearch):
        optimizer.tell(points, entries)
    else:
        optimizer.tell(points, [loss_of(e) for e in entries])


def search_loop(pool: Any, out_dir: Path, progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], str]:
    """Run (or continue) the search in ``out_dir`` until the budget is spent or CMA-ES stops
    (converged, or flat fitness); returns the journal and why it stopped."""
    config: SearchConfig = pool.config
    entries = read_journal(out_dir)
    done = {(e["generation"], e["candidate"]): e for e in entries}
    saved = load_optimizer(out_dir)
    optimizer = rehash_archives(saved) if saved is not None else new_optimizer(config, pool.space.start())
    budget = BudgetClock(config, len(entries), spent_seconds(out_dir, entries))
    while not budget.spent() and not optimizer.stop():
        generation = optimizer.countiter
        asked = optimizer.ask()
        results = []
        for index, point in enumerate(asked):
            unit = [float(x) for x in point]
            entry = done.get((generation, index))
            if entry is not None:
                if entry["genome"] != unit:
                    from mergeforge.errors import OutputError

                    raise OutputError(f"{out_dir}: the journal's candidate {index} of generation {generation} is not the one "
                                      "the saved optimiser asks for; the folder was changed by hand, start a new search")
            else:
                if budget.spent():
                    return entries, "budget spent"
                entry = journal_entry(pool, generation, index, unit)
                append_entry(out_dir, entry)
                entries.append(entry)
                budget.evaluations += 1
            results.append(entry)
        tell(optimizer, asked, results)
        race_generation(pool, out_dir, results)  # before the save: a resume that re-tells also re-races
        save_optimizer(out_dir, optimizer)
        progress(generation_line(generation, results, entries, budget, out_dir))
    if budget.spent():
        return entries, "budget spent"
    return entries, "cma stopped: " + ", ".join(f"{key} {value}" for key, value in optimizer.stop().items())


def spent_seconds(out_dir: Path, entries: list[dict[str, Any]]) -> float:
    """Seconds spent by earlier runs of the search: its candidates' and its races' own times."""
    from mergeforge.evolve.fitness import read_races

    return sum(e["timing"]["seconds"] for e in entries) + sum(line["seconds"] for line in read_races(out_dir))


def generation_line(generation: int, results: list[dict[str, Any]], entries: list[dict[str, Any]], budget: BudgetClock,
                    out_dir: Path) -> str:
    """One line per generation: its best and median, the best so far (with a minibatch: the best
    re-scored on the whole search split), failures, speed."""
    from mergeforge.evolve.fitness import read_races

    fitness = sorted(e["fitness"] for e in results if e["fitness"] is not None)
    best = max((e["fitness"] for e in entries if e["fitness"] is not None), default=None)
    failed = sum(e["fitness"] is None for e in results)
    seconds = [e["timing"]["seconds"] for e in results]
    limit = budget.config.budget.evaluations
    spent = f"{len(entries)}/{limit}" if limit is not None else f"{len(entries)}"
    parts = [f"generation {generation:>3}", f"evaluations {spent}"]
    if fitness:
        parts += [f"best {fitness[-1]:.4f}", f"median {fitness[len(fitness) // 2]:.4f}"]
    if budget.config.splits.race_size:
        leader = best_entry(read_races(out_dir))
        parts.append(f"incumbent {leader['fitness']:.4f} (whole split)" if leader is not None else "no incumbent yet")
    else:
        parts.append(f"best so far {best:.4f}" if best is not None else "no candidate scored yet")
    if failed:
        parts.append(f"{failed} failed")
    parts.append(f"{sum(seconds) / max(1, len(seconds)):.2f} s/candidate")
    return "  ".join(parts)
