"""What a search leaves on disk as it runs, so that a killed run resumes to the same result.

- ``journal.jsonl``: one line per evaluated candidate, appended and flushed as soon as it is
  scored: generation, index in the generation, the unit-cube genome, the parameter values, the
  seed, the scores, the fitness (``null`` for a failed candidate, with its ``error``), and a
  ``timing`` object. Everything but ``timing`` is a function of the search file, so a resumed run
  writes the same lines as an uninterrupted one.
- ``optimizer.pkl``: the optimiser after each generation's ``tell``, written to a temporary file
  and renamed, so it is always the state of a whole generation.
- ``search.yml``: the search as validated, to refuse resuming with a different one.

Torch-free.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

from mergeforge.errors import OutputError

JOURNAL = "journal.jsonl"
OPTIMIZER = "optimizer.pkl"
SEARCH = "search.yml"


def read_journal(out_dir: Path) -> list[dict[str, Any]]:
    """The journal's entries; a last line cut short by a kill is dropped (and cut from the file,
    so that the next append starts on a fresh line)."""
    return read_lines(out_dir / JOURNAL)


def append_entry(out_dir: Path, entry: dict[str, Any]) -> None:
    append_line(out_dir / JOURNAL, entry)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file of the search (the journal, the races), less a last line cut short."""
    if not path.is_file():
        return []
    entries, keep = [], 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break
            keep += len(line)
    if keep != path.stat().st_size:
        os.truncate(path, keep)
    return entries


def append_line(path: Path, entry: dict[str, Any]) -> None:
    """One line appended and fsynced, so that a kill loses at most the line being written."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def save_pickle(path: Path, state: Any) -> None:
    """``state`` pickled to ``path`` through a synced temporary file: a kill leaves the old one or the new."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        pickle.dump(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def save_optimizer(out_dir: Path, optimizer: Any) -> None:
    save_pickle(out_dir / OPTIMIZER, optimizer)


def load_optimizer(out_dir: Path) -> Any | None:
    """The pickled optimiser, or None before the first generation ended. The file is the search's
    own output (trusted as its journal is): resume only folders you made."""
    path = out_dir / OPTIMIZER
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return pickle.load(handle)  # noqa: S301 - our own state file, see the docstring


def prepare_out_dir(out_dir: Path, config_text: str, resume: bool) -> None:
    """A fresh, empty output folder, or (``resume``) one made by the same search."""
    saved = out_dir / SEARCH
    if resume:
        if not saved.is_file():
            raise OutputError(f"{out_dir}: nothing to resume (no {SEARCH}); run without --resume to start a search")
        if _without_budget(saved.read_text(encoding="utf-8")) != _without_budget(config_text):
            raise OutputError(f"{out_dir}: --resume with a different search than the one started there (only 'budget' "
                              "may change); use a new OUT_DIR")
        saved.write_text(config_text, encoding="utf-8")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputError(f"{out_dir}: not empty; pass --resume to continue the search saved there, or choose a new OUT_DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(config_text, encoding="utf-8")


def _without_budget(text: str) -> str:
    """The validated search as JSON, less its budget (which a resume may extend)."""
    import yaml

    data = yaml.safe_load(text)
    data.pop("budget", None)
    return json.dumps(data, sort_keys=True)


def best_entry(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The journal or race line of highest fitness (the first of equals: the earliest found)."""
    best = None
    for entry in entries:
        if entry["fitness"] is not None and (best is None or entry["fitness"] > best["fitness"]):
            best = entry
    return best
