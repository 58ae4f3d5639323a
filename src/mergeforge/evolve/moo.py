"""Multi-objective search: NSGA-II (Deb et al. 2002) through pymoo, behind CMA-ES's ask/tell.

With ``optimizer: {name: nsga2}`` every fitness term with a non-zero weight is an objective of
its own (its weight's sign gives its direction, its size is ignored), and the search looks for the
Pareto front of the terms instead of the best weighted sum: the merges that trade one task for
another are the answer, not one number. The weighted sum still picks the exported winner, and
the report's front (:mod:`mergeforge.evolve.pareto`) is now the one the optimiser searched for.

:class:`ParetoSearch` is what the search loops drive in place of a ``cma.CMAEvolutionStrategy``:
``ask()`` gives a generation of points in the unit cube, ``tell(points, entries)`` takes their
journal lines, ``countiter`` counts the tells, and ``stop()`` is always empty (the budget ends the
search). It pickles whole, pymoo's own generator included (``random_state``), so a resumed search
asks the same candidates. A generation may be asked before the one before it is told (the
pipeline of ``--workers`` and ``--ray-address``): pymoo then breeds both from the same
population, and the tells merge each into it in turn. Before the first tell there is nothing to
breed from, so a generation asked then is more uniform draws (pymoo would repeat the first).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mergeforge.evolve.config import SearchConfig

FAILED_OBJECTIVE = 1e30  # every objective of a failed candidate: worse than any real one, finite


def default_population(dimensions: int) -> int:
    """cma's default population, 4 + 3 ln d, rounded up to an even number (NSGA-II mates in pairs)."""
    size = 4 + int(3 * math.log(dimensions))
    return size + size % 2


class ParetoSearch:
    """NSGA-II over the unit cube, with CMA-ES's ask/tell/stop/countiter."""

    def __init__(self, config: SearchConfig, start: list[float]):
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.termination.max_gen import MaximumGenerationTermination

        self.config = config  # its non-zero fitness terms are the objectives (mergeforge.evolve.pareto.objectives)
        self.count = sum(term.weight != 0 for term in config.fitness)
        dimensions = len(start)
        size = config.optimizer.popsize or default_population(dimensions)
        # The first population: the search's start (as CMA-ES's mean), then uniform draws.
        self.draws = np.random.default_rng(config.seed)
        first = self.draws.random((size, dimensions))
        first[0] = start
        self.algorithm = NSGA2(pop_size=size, sampling=first)
        problem = Problem(n_var=dimensions, n_obj=self.count, xl=0.0, xu=1.0)
        self.algorithm.setup(problem, termination=MaximumGenerationTermination(10**12), seed=config.seed, verbose=False)
        self.pending: list[Any] = []  # pymoo populations asked and not told yet, oldest first
        self.countiter = 0

    def ask(self) -> list[np.ndarray]:
        if not self.algorithm.is_initialized and self.pending:
            from pymoo.core.population import Population

            population = Population.new(X=self.draws.random((self.algorithm.pop_size, self.algorithm.problem.n_var)))
        else:
            population = self.algorithm.ask()
        self.pending.append(population)
        return [np.asarray(x, dtype=float) for x in population.get("X")]

    def objectives(self, entry: dict[str, Any]) -> list[float]:
        """A journal line as the minimised objectives: the report's front's, negated."""
        from mergeforge.evolve.pareto import objectives

        if entry["fitness"] is None:
            return [FAILED_OBJECTIVE] * self.count
        return [-float(value) for value in objectives(self.config, entry["scores"])]

    def tell(self, points: list[np.ndarray], entries: list[dict[str, Any]]) -> None:
        population = self.pending.pop(0)
        if not np.array_equal(population.get("X"), np.asarray(points, dtype=float)):
            raise AssertionError("told a generation other than the oldest one asked")
        population.set("F", np.array([self.objectives(entry) for entry in entries], dtype=float))
        self.algorithm.tell(infills=population)
        self.countiter += 1

    def stop(self) -> dict[str, Any]:
        return {}
