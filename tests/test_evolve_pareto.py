"""The search's Pareto front (``mergeforge.evolve.pareto``): the candidates no other beats on every
fitness term, in the report, each with a recipe that reproduces its scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

pytest.importorskip("cma")


def search(zoo: Path, **changes) -> dict:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "models" / "base"),
        "models": [str(zoo / "models" / "expert_shift"), str(zoo / "models" / "expert_reverse")],
        "search": {"weight": {"low": 0.0, "high": 1.5}},
        "fitness": [{"task": str(zoo / "tasks" / "shift")}, {"task": str(zoo / "tasks" / "reverse")}],
        "splits": {"search_examples": 24, "test_examples": 12},
        "budget": {"evaluations": 12},
        "optimizer": {"popsize": 4, "sigma0": 0.4},
        "baselines": [],
        "seed": 1,
    }
    config.update(changes)
    return config


def test_the_front_keeps_the_non_dominated_once_each_with_a_loss_direction(tmp_path):
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.pareto import pareto_front

    config, _ = load_search_config(search(tmp_path, fitness=[{"task": "a"}, {"task": "b"},
                                                             {"task": "a", "metric": "loss", "weight": -0.1}]))

    def candidate(name: str, a: float, b: float, loss: float, fitness: float | None = 0.0) -> dict:
        return {"name": name, "scores": {"a": a, "b": b, "a:loss": loss}, "fitness": fitness}

    candidates = [candidate("a best", 1.0, 0.0, 2.0), candidate("b best", 0.0, 1.0, 2.0), candidate("balanced", 0.5, 0.5, 1.0),
                  candidate("worse than balanced", 0.4, 0.4, 1.5), candidate("a best again", 1.0, 0.0, 2.0),
                  candidate("lower loss only", 0.0, 0.0, 0.5), candidate("failed", 9.0, 9.0, 0.0, fitness=None),
                  candidate("higher loss", 0.5, 0.5, 1.2)]
    assert [c["name"] for c in pareto_front(config, candidates)] == ["a best", "b best", "balanced", "lower loss only"]


def test_the_reports_front_is_the_journals_and_its_recipes_reproduce_it(tiny_zoo_dir, tmp_path):
    from mergeforge.evaluate.api import evaluate_model
    from mergeforge.evolve.api import run_search

    report = run_search(search(tiny_zoo_dir), tmp_path / "out")
    journal = [json.loads(line) for line in (tmp_path / "out" / "journal.jsonl").read_text().splitlines()]
    scored = [e for e in journal if e["fitness"] is not None]

    def point(scores: dict) -> tuple:
        return scores["shift"], scores["reverse"]

    def beaten(p: tuple, by: tuple) -> bool:
        return by[0] >= p[0] and by[1] >= p[1] and by != p

    front = report["pareto"]
    assert front and [row["fitness"] for row in front] == sorted((row["fitness"] for row in front), reverse=True)
    points = {point(row["scores"]) for row in front}
    assert len(points) == len(front)
    for entry in scored:  # in the front exactly when nothing beats it
        assert (point(entry["scores"]) in points) == (not any(beaten(point(entry["scores"]), point(o["scores"])) for o in scored))
    assert report["best"]["evaluation"] in [row["evaluation"] for row in front]
    assert "## Pareto front on `val`" in (tmp_path / "out" / "report.md").read_text()
    row = front[-1]
    merged = run_cli("merge", row["recipe"], tmp_path / "member", "--seed", "1", "--quiet")
    assert merged.returncode == 0, merged.stderr
    again = evaluate_model(tmp_path / "member", [tiny_zoo_dir / "tasks" / "shift", tiny_zoo_dir / "tasks" / "reverse"], split="val",
                           max_examples=24, scoring="forced", with_loss=False)["tasks"]
    assert {name: again[name]["score"] for name in ("shift", "reverse")} == row["scores"]
