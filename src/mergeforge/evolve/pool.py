"""``mergeforge evolve --workers N``: candidates scored by N worker processes, steady-state, with
``--resume`` exact.

CMA-ES tells a whole generation at once, so a plain pool waits for each generation's slowest
candidate. Here two generations are always in flight: generation g+1 is asked before g is told
(a lag-1 pipeline), so a free worker takes g+1's candidates while g's slowest still runs. The
order of asks and tells is fixed whatever finishes first: ask 0, ask 1, then tell g and ask g+2
for g = 0, 1, 2, ...; candidates are dispatched in generation and index order, and the budget
counts dispatched candidates, so the set of candidates scored, their genomes and their scores do
not depend on the timing or on N (tested). It is not the serial search: a told generation was
sampled from the distribution one update earlier (delayed feedback), so a pooled run and a
serial run of one search differ, and a folder is resumed in the mode it was started in.

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
from typing import Any

from mergeforge.errors import OutputError
from mergeforge.evolve.journal import OPTIMIZER, append_entry, read_journal
from mergeforge.evolve.search import (
    BudgetClock,
    generation_line,
    journal_entry,
    loss_of,
    new_optimizer,
    rehash_archives,
)

PIPELINE = "pipeline.pkl"

_WORKER_POOL: Any = None


def _start_worker(config_data: dict[str, Any], folder: str, out_dir: str) -> None:
    global _WORKER_POOL
    import logging

    from transformers.utils import logging as transformers_logging

    from mergeforge.evolve.api import new_pool
    from mergeforge.evolve.config import SearchConfig

    logging.getLogger("mergeforge").setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    _WORKER_POOL = new_pool(SearchConfig.model_validate(config_data), Path(folder), Path(out_dir))


def _score(generation: int, index: int, unit: list[float]) -> dict[str, Any]:
    return journal_entry(_WORKER_POOL, generation, index, unit)


def save_pipeline(out_dir: Path, state: dict[str, Any]) -> None:
    import os

    temporary = out_dir / (PIPELINE + ".tmp")
    with temporary.open("wb") as handle:
        pickle.dump(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(out_dir / PIPELINE)


def load_pipeline(out_dir: Path) -> dict[str, Any] | None:
    """The pickled pipeline (our own state file, trusted as the journal is), or None."""
    path = out_dir / PIPELINE
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return pickle.load(handle)  # noqa: S301 - our own state file


def check_mode(out_dir: Path, workers: int) -> None:
    """A folder is resumed in the mode it was started in (serial and pooled searches differ)."""
    if workers > 1 and (out_dir / OPTIMIZER).is_file():
        raise OutputError(f"{out_dir}: this search was started serially; resume it without --workers")
    if workers == 1 and (out_dir / PIPELINE).is_file():
        raise OutputError(f"{out_dir}: this search was started with --workers; resume it with --workers 2 or more")


def pooled_loop(pool: Any, out_dir: Path, progress: Callable[[str], None], workers: int, folder: Path
                ) -> tuple[list[dict[str, Any]], str]:
    """The search of :func:`~mergeforge.evolve.search.search_loop`, scored by ``workers`` processes."""
    import multiprocessing

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
    budget = BudgetClock(config, len(entries), sum(e["timing"]["seconds"] for e in entries))
    queue = deque((g, i) for g in sorted(asked) for i in range(len(asked[g])) if (g, i) not in done)
    running: dict[Future[dict[str, Any]], tuple[int, int]] = {}
    dispatched = len(entries)

    def dispatch_allowed() -> bool:
        limit = config.budget
        if limit.evaluations is not None and dispatched >= limit.evaluations:
            return False
        return limit.seconds is None or budget.seconds() < limit.seconds

    context = multiprocessing.get_context("spawn")
    config_data = config.model_dump(mode="json")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(config_data, str(folder), str(out_dir))) as executor:
        while True:
            while len(running) < workers and queue and dispatch_allowed():
                generation, index = queue.popleft()
                unit = [float(x) for x in asked[generation][index]]
                running[executor.submit(_score, generation, index, unit)] = (generation, index)
                dispatched += 1
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                running.pop(future)
                entry = future.result()
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
                    optimizer.tell(points, [loss_of(e) for e in results])
                    stop = optimizer.stop()
                    if stop:
                        state["stopped"] = "cma stopped: " + ", ".join(f"{key} {value}" for key, value in stop.items())
                    else:
                        asked[generation + 2] = optimizer.ask()
                        queue.extend((generation + 2, i) for i in range(len(asked[generation + 2])))
                del asked[generation]
                state["next_tell"] = generation + 1
                save_pipeline(out_dir, state)
                progress(generation_line(generation, results, entries, budget))
    entries.sort(key=lambda e: (e["generation"], e["candidate"]))
    if state["stopped"] is not None and not asked:
        return entries, state["stopped"]
    return entries, "budget spent"
