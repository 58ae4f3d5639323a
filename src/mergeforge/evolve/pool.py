"""``mergeforge evolve --workers N`` (and ``--ray-address``): candidates scored by N workers,
steady-state, with ``--resume`` exact.

CMA-ES tells a whole generation at once, so a plain pool waits for each generation's slowest
candidate. Here two generations are always in flight: generation g+1 is asked before g is told
(a lag-1 pipeline), so a free worker takes g+1's candidates while g's slowest still runs. The
order of asks and tells is fixed whatever finishes first: ask 0, ask 1, then tell g and ask g+2
for g = 0, 1, 2, ...; candidates are dispatched in generation and index order, and the budget
counts dispatched candidates, so the set of candidates scored, their genomes and their scores do
not depend on the timing, on N or on the executor (tested). It is not the serial search: a told
generation was sampled from the distribution one update earlier (delayed feedback), so a pooled
run and a serial run of one search differ, and a folder is resumed in the mode it was started in.

A worker is a :class:`SearchWorker` (the sources loaded once, candidates scored by
:func:`~mergeforge.evolve.search.journal_entry`, as the serial loop does) inside an executor: a
spawned process (:class:`ProcessExecutor`) or a Ray actor (:mod:`mergeforge.evolve.ray_workers`).
An executor has ``slots`` workers and ``submit`` returns a ``concurrent.futures.Future`` of the
candidate's journal line; a future that raises (a worker lost) is journalled as a failed
candidate with the reason.

``pipeline.pkl`` (instead of ``optimizer.pkl``) holds the optimiser, the asked generations not yet
told and the next generation to tell, written after each tell; the journal's lines are appended as
candidates finish (in completion order; the report reads them in generation order). Each worker
loads the sources itself (``spawn``: no torch state shared by forking), so memory grows with N.
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from mergeforge.errors import OutputError
from mergeforge.evolve.fitness import race_generation
from mergeforge.evolve.journal import OPTIMIZER, append_entry, read_journal
from mergeforge.evolve.search import (
    BudgetClock,
    failed_entry,
    generation_line,
    journal_entry,
    new_optimizer,
    rehash_archives,
    spent_seconds,
    tell,
)

PIPELINE = "pipeline.pkl"


class SearchWorker:
    """One worker's copy of the search: the sources loaded once, then one candidate per call.
    The same object runs in a pool process and as a Ray actor."""

    def __init__(self, config_data: dict[str, Any], folder: str, out_dir: str):
        import logging

        from transformers.utils import logging as transformers_logging

        from mergeforge.evolve.api import new_pool
        from mergeforge.evolve.config import SearchConfig

        logging.getLogger("mergeforge").setLevel(logging.ERROR)
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        self.pool = new_pool(SearchConfig.model_validate(config_data), Path(folder), Path(out_dir))

    def ready(self) -> bool:
        """Called once after start-up, so that a worker that cannot load the sources fails early."""
        return True

    def score(self, generation: int, index: int, unit: list[float]) -> dict[str, Any]:
        return journal_entry(self.pool, generation, index, unit)


class Executor(Protocol):
    """Where candidates are scored: ``slots`` workers, one candidate each at a time."""

    slots: int
    description: str

    def submit(self, generation: int, index: int, unit: list[float]) -> Future[dict[str, Any]]: ...

    def close(self) -> None: ...


_WORKER: SearchWorker | None = None


def _start_worker(config_data: dict[str, Any], folder: str, out_dir: str) -> None:
    global _WORKER
    _WORKER = SearchWorker(config_data, folder, out_dir)


def _score(generation: int, index: int, unit: list[float]) -> dict[str, Any]:
    assert _WORKER is not None, "the pool's initializer did not run"
    return _WORKER.score(generation, index, unit)


class ProcessExecutor:
    """``--workers N``: N spawned processes, each a :class:`SearchWorker`."""

    def __init__(self, workers: int, config_data: dict[str, Any], folder: Path, out_dir: Path):
        import multiprocessing

        self.slots = workers
        self.description = f"{workers} worker processes"
        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(config_data, str(folder), str(out_dir)))

    def submit(self, generation: int, index: int, unit: list[float]) -> Future[dict[str, Any]]:
        return self._executor.submit(_score, generation, index, unit)

    def close(self) -> None:
        self._executor.shutdown()


def save_pipeline(out_dir: Path, state: dict[str, Any]) -> None:
    from mergeforge.evolve.journal import save_pickle

    save_pickle(out_dir / PIPELINE, state)


def load_pipeline(out_dir: Path) -> dict[str, Any] | None:
    """The pickled pipeline (our own state file, trusted as the journal is), or None."""
    path = out_dir / PIPELINE
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return pickle.load(handle)  # noqa: S301 - our own state file


def check_mode(out_dir: Path, pipelined: bool) -> None:
    """A folder is resumed in the mode it was started in (serial and pipelined searches differ);
    a pipelined one may be resumed with any number of workers, processes or Ray actors."""
    if pipelined and (out_dir / OPTIMIZER).is_file():
        raise OutputError(f"{out_dir}: this search was started serially; resume it without --workers or --ray-address")
    if not pipelined and (out_dir / PIPELINE).is_file():
        raise OutputError(f"{out_dir}: this search was started with --workers or --ray-address; resume it with "
                          "--workers 2 or more, or --ray-address")


def pooled_loop(pool: Any, out_dir: Path, progress: Callable[[str], None], start_executor: Callable[[], Executor]
                ) -> tuple[list[dict[str, Any]], str]:
    """The search of :func:`~mergeforge.evolve.search.search_loop`, scored by the workers of the
    executor that ``start_executor`` makes (closed at the end)."""
    config = pool.config
    entries = read_journal(out_dir)
    done = {(e["generation"], e["candidate"]): e for e in entries}
    state = load_pipeline(out_dir)
    if state is not None:
        rehash_archives(state["optimizer"])
    else:
        optimizer = new_optimizer(config, pool.space.start())
        state = {"optimizer": optimizer, "asked": {0: optimizer.ask(), 1: optimizer.ask()}, "next_tell": 0, "stopped": None}
    optimizer, asked = state["optimizer"], state["asked"]
    for generation, points in asked.items():
        for index, point in enumerate(points):
            entry = done.get((generation, index))
            if entry is not None and entry["genome"] != [float(x) for x in point]:
                raise OutputError(f"{out_dir}: the journal's candidate {index} of generation {generation} is not the one "
                                  "the saved optimiser asked for; the folder was changed by hand, start a new search")
    budget = BudgetClock(config, len(entries), spent_seconds(out_dir, entries))
    queue = deque((g, i) for g in sorted(asked) for i in range(len(asked[g])) if (g, i) not in done)
    running: dict[Future[dict[str, Any]], tuple[int, int, list[float]]] = {}
    dispatched = len(entries)

    def dispatch_allowed() -> bool:
        limit = config.budget
        if limit.evaluations is not None and dispatched >= limit.evaluations:
            return False
        return limit.seconds is None or budget.seconds() < limit.seconds

    executor = start_executor()
    try:
        while True:
            while len(running) < executor.slots and queue and dispatch_allowed():
                generation, index = queue.popleft()
                unit = [float(x) for x in asked[generation][index]]
                running[executor.submit(generation, index, unit)] = (generation, index, unit)
                dispatched += 1
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                generation, index, unit = running.pop(future)
                try:
                    entry = future.result()
                except Exception as exc:  # noqa: BLE001 - a lost worker fails its candidate, the search goes on
                    reason = (str(exc).strip().splitlines() or [""])[0]
                    entry = failed_entry(pool, generation, index, unit, f"{type(exc).__name__}: {reason}", 0.0)
                append_entry(out_dir, entry)
                entries.append(entry)
                done[(entry["generation"], entry["candidate"])] = entry
                budget.evaluations += 1
            # Tell in generation order, each as soon as all its candidates are in.
            while True:
                generation = state["next_tell"]
                points = asked.get(generation)
                if points is None or any((generation, i) not in done for i in range(len(points))):
                    break
                results = [done[(generation, i)] for i in range(len(points))]
                if state["stopped"] is None:
                    tell(optimizer, points, results)
                    stop = optimizer.stop()
                    if stop:
                        state["stopped"] = "cma stopped: " + ", ".join(f"{key} {value}" for key, value in stop.items())
                    else:
                        asked[generation + 2] = optimizer.ask()
                        queue.extend((generation + 2, i) for i in range(len(asked[generation + 2])))
                race_generation(pool, out_dir, results)  # in this process, before the save (as serially)
                del asked[generation]
                state["next_tell"] = generation + 1
                save_pipeline(out_dir, state)
                progress(generation_line(generation, results, entries, budget, out_dir))
    finally:
        executor.close()
    entries.sort(key=lambda e: (e["generation"], e["candidate"]))
    if state["stopped"] is not None and not asked:
        return entries, state["stopped"]
    return entries, "budget spent"
