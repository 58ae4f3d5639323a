"""The search's Pareto front (``mergeforge.evolve.pareto``): the candidates no other beats on every
fitness term, in the report, each with a recipe that reproduces its scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from evolve_support import assert_a_killed_run_resumes_to_the_uninterrupted_result, read_lines

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


# -- NSGA-II: the front searched for, not only collected ------------------------------------------


def nsga2_search(zoo: Path, **changes) -> dict:
    return search(zoo, optimizer={"name": "nsga2", "popsize": 4}, **changes)


def test_nsga2_breeds_from_the_front_and_starts_from_the_search_start(tiny_zoo_dir, tmp_path):
    from mergeforge.evolve.api import run_search
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.moo import ParetoSearch
    from mergeforge.evolve.pareto import pareto_front

    config = search(tiny_zoo_dir, optimizer={"name": "nsga2", "popsize": 4},
                    search={"weight": {"low": 0.0, "high": 1.5, "start": 0.3}})
    report = run_search(config, tmp_path / "out")
    journal = read_lines(tmp_path / "out" / "journal.jsonl")
    assert [e["generation"] for e in journal] == [0] * 4 + [1] * 4 + [2] * 4
    assert journal[0]["genome"] == pytest.approx([0.2, 0.2])  # the start (weight 0.3 of [0, 1.5]) is the first candidate
    assert report["optimizer"] == "nsga2" and report["best"]["fitness"] == max(e["fitness"] for e in journal)
    # After each generation, NSGA-II's population holds the front of everything it was told.
    parsed, _ = load_search_config(config)
    optimizer = ParetoSearch(parsed, journal[0]["genome"])
    for generation in range(3):
        points = optimizer.ask()
        told = journal[4 * generation: 4 * generation + 4]
        assert [list(p) for p in points] == [e["genome"] for e in told]
        optimizer.tell(points, told)
        front = {(e["scores"]["shift"], e["scores"]["reverse"]) for e in pareto_front(parsed, journal[: 4 * generation + 4])}
        population = {(-f[0], -f[1]) for f in optimizer.algorithm.pop.get("F")}
        assert front <= population if len(front) <= 4 else population <= front  # crowding keeps 4 of a larger front
    assert "NSGA-II over the fitness terms" in (tmp_path / "out" / "model" / "README.md").read_text()


def test_nsga2_asked_twice_before_a_tell_draws_new_candidates_not_the_first_again(tiny_zoo_dir):
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.moo import ParetoSearch

    parsed, _ = load_search_config(nsga2_search(tiny_zoo_dir))
    optimizer = ParetoSearch(parsed, [0.2, 0.2])
    first, second = optimizer.ask(), optimizer.ask()  # the pipeline of --workers asks ahead
    assert {tuple(p) for p in first}.isdisjoint(tuple(p) for p in second)
    for points in (first, second):
        optimizer.tell(points, [{"fitness": 1.0, "scores": {"shift": p[0], "reverse": p[1]}} for p in points])
    assert optimizer.countiter == 2 and len(optimizer.algorithm.pop) == 4


def test_an_nsga2_search_killed_midway_resumes_to_the_uninterrupted_result(tiny_zoo_dir, tmp_path):
    assert_a_killed_run_resumes_to_the_uninterrupted_result(nsga2_search(tiny_zoo_dir), tmp_path, after=6)


@pytest.mark.slow
def test_an_nsga2_search_on_two_workers_resumes_to_the_uninterrupted_pooled_result(tiny_zoo_dir, tmp_path):
    from evolve_support import pooled_journal, write_search

    search_file = write_search(tmp_path / "search.yml", nsga2_search(tiny_zoo_dir))
    whole = run_cli("evolve", search_file, tmp_path / "whole", "--workers", "2", "--quiet")
    assert whole.returncode == 0, whole.stderr
    stopped = write_search(tmp_path / "stopped.yml", nsga2_search(tiny_zoo_dir, budget={"evaluations": 6}))
    assert run_cli("evolve", stopped, tmp_path / "resumed", "--workers", "2", "--quiet").returncode == 0
    resumed = run_cli("evolve", search_file, tmp_path / "resumed", "--workers", "2", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert pooled_journal(tmp_path / "resumed") == pooled_journal(tmp_path / "whole")
