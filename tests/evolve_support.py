"""What the ``mergeforge evolve`` tests share: small search files, journals, and a
run killed midway and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import run_cli


def path_search(zoo: Path, **changes) -> dict:
    """A small layer-path search over two of the tiny zoo's experts (2 layers each, 2 repeats: 8
    slots); a ``layer_path`` change updates that section, any other replaces its field."""
    config = {
        "layer_path": {"models": [str(zoo / "models" / "expert_shift"), str(zoo / "models" / "expert_reverse")],
                       "repeats": 2},
        "fitness": [{"task": str(zoo / "tasks" / "shift")}, {"task": str(zoo / "tasks" / "reverse")}],
        "splits": {"search_examples": 12, "test_examples": 12},
        "budget": {"evaluations": 8},
        "optimizer": {"popsize": 4, "sigma0": 0.3},
        "baselines": [],
        "seed": 5,
    }
    for key, value in changes.items():
        config[key] = {**config["layer_path"], **value} if key == "layer_path" else value
    return config


def write_search(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def deterministic(entries: list[dict]) -> list[dict]:
    """Journal lines without their timings: what must not depend on being resumed."""
    return [{key: value for key, value in entry.items() if key != "timing"} for entry in entries]


def pooled_journal(folder: Path) -> list[dict]:
    """A pooled search's journal without timings, in (generation, candidate) order: workers append
    lines as candidates finish, so the order of the file is not part of the result."""
    return sorted(deterministic(read_lines(folder / "journal.jsonl")), key=lambda e: (e["generation"], e["candidate"]))


def assert_a_killed_run_resumes_to_the_uninterrupted_result(config: dict, folder: Path, after: int = 6) -> None:
    """Runs the search ``config`` whole, then again as a subprocess SIGKILLed once its journal has
    ``after`` lines and resumed with ``--resume``: the journals (timings aside) and winners must be equal."""
    search_file = write_search(folder / "search.yml", config)
    evaluations = config["budget"]["evaluations"]
    assert run_cli("evolve", search_file, folder / "whole", "--quiet").returncode == 0
    killed = folder / "killed"
    process = subprocess.Popen([sys.executable, "-m", "mergeforge", "evolve", str(search_file), str(killed), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = killed / "journal.jsonl"
    deadline = time.monotonic() + 120
    while (not journal.is_file() or len(journal.read_bytes().splitlines()) < after) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert after <= len(journal.read_bytes().splitlines()) < evaluations, "the run was not killed in the middle"
    result = run_cli("evolve", search_file, killed, "--resume", "--quiet")
    assert result.returncode == 0, result.stderr
    assert deterministic(read_lines(journal)) == deterministic(read_lines(folder / "whole" / "journal.jsonl"))
    assert (killed / "winner.yml").read_text() == (folder / "whole" / "winner.yml").read_text()
