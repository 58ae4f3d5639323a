"""lm-eval tasks in the fitness of ``mergeforge evolve``: scored through lm-evaluation-harness on
the candidate in memory, on the search's own splits, agreeing with the native evaluator on the
same task; and the bad inputs, each refused in one line before any model is read."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import run_cli
from evolve_support import read_lines, write_search

pytest.importorskip("cma")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="lm_eval is not installed (mergeforge[lmeval])")


@pytest.fixture(autouse=True)
def offline(private_hf_cache) -> Path:
    return private_hf_cache


@pytest.fixture(scope="module")
def include(tiny_zoo_dir, tmp_path_factory) -> Path:
    """The tiny zoo's shift task exported as lm-eval YAML (validation_split val, test_split test)."""
    from mergeforge.evaluate.harness import export_lm_eval_task

    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    export_lm_eval_task(tiny_zoo_dir / "tasks" / "shift", folder)
    return folder


def search(zoo: Path, include: Path, **changes) -> dict:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "models" / "base"),
        "models": [str(zoo / "models" / "expert_shift"), str(zoo / "models" / "expert_reverse")],
        "search": {"weight": {"low": 0.0, "high": 1.5}},
        # The same task twice: natively, and as lm-eval's generate_until over the exported YAML.
        "fitness": [{"lm_eval": "shift", "include_path": str(include)}, {"task": str(zoo / "tasks" / "shift")},
                    {"task": str(zoo / "tasks" / "reverse")}],
        "splits": {"search_examples": 16, "test_examples": 16},
        "budget": {"evaluations": 4},
        "optimizer": {"popsize": 4, "sigma0": 0.4},
        "baselines": [],
        "seed": 3,
    }
    config.update(changes)
    return config


def test_an_lm_eval_term_scores_each_candidate_as_the_native_evaluator_does(tiny_zoo_dir, include, tmp_path):
    result = run_cli("evolve", write_search(tmp_path / "search.yml", search(tiny_zoo_dir, include)), tmp_path / "out",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    journal = read_lines(tmp_path / "out" / "journal.jsonl")
    assert len(journal) == 4 and len({e["scores"]["shift"] for e in journal}) > 1  # candidates that differ
    for entry in journal:  # greedy generation through lm-eval and forced scoring agree on every candidate
        assert entry["scores"]["lm_eval:shift"] == pytest.approx(entry["scores"]["shift"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reproduction"]["difference"] == 0
    for row in report["test"]:  # the test split too: lm-eval's test_split, the native test split
        assert row["scores"]["lm_eval:shift"] == pytest.approx(row["scores"]["shift"]), row["name"]


@pytest.mark.parametrize("term, message", [
    ({"lm_eval": "nope"}, r"lm-eval task 'nope' is not defined under .* \(tasks there: shift\)"),
    ({"lm_eval": "shift", "metric": "acc"}, r"fitness term 'lm_eval:shift:acc': lm-eval task 'shift' reports no "
                                            r"metric 'acc' \(its metrics: exact_match\)"),
])
def test_a_bad_lm_eval_term_is_one_line_before_any_model_is_read(tiny_zoo_dir, include, tmp_path, term, message):
    config = search(tiny_zoo_dir, include, fitness=[{"include_path": str(include), **term},
                                                    {"task": str(tiny_zoo_dir / "tasks" / "reverse")}])
    result = run_cli("evolve", write_search(tmp_path / "search.yml", config), tmp_path / "out", "--quiet")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, message", [
    ({"fitness": [{"lm_eval": "shift"}]}, r"lm_eval task 'shift' needs 'include_path'"),
    ({"fitness": [{"lm_eval": "shift", "task": "x", "include_path": "."}]}, r"give one of 'task' .* or 'lm_eval'"),
    ({"fitness": [{"task": "x", "include_path": "."}]}, r"'include_path' belongs to an 'lm_eval' term"),
    ({"fitness": [{"task": "x", "metric": "acc"}]}, r"metric 'acc' of task 'x': use one of score, loss, perplexity"),
    ({"fitness": [{"lm_eval": "shift", "include_path": "."}], "splits": {"minibatch": 4}},
     r"'splits.minibatch' draws examples from task folders"),
])
def test_lm_eval_term_mistakes_in_the_search_file(tmp_path, changes, message):
    from mergeforge.errors import RecipeError
    from mergeforge.evolve.config import load_search_config

    config = {**search(tmp_path, tmp_path), **changes}
    with pytest.raises(RecipeError, match=message):
        load_search_config(write_search(tmp_path / "search.yml", config))
