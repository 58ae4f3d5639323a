"""``mergeforge bench`` end to end on the tiny zoo, through the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def test_bench_on_the_tiny_zoo(tiny_zoo_dir, tmp_path):
    out = tmp_path / "results"
    result = run_cli("bench", "--zoo", tiny_zoo_dir, "--size", "tiny", "--methods", "task_arithmetic,ties,passthrough",
                     "--max-examples", "16", "--curve-methods", "task_arithmetic", "--out", out)
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "results.json").read_text())
    tasks = payload["tasks"]
    assert len(tasks) >= 6
    rows = {row["name"]: row for row in payload["ranking"]}
    assert {"base", "individual experts", "multi-task model", "output ensemble", "task_arithmetic", "ties"} <= set(rows)
    experts = payload["experts"]
    for row in rows.values():
        expected = sum(row["scores"][t] / experts[t] for t in tasks if experts[t] > 0) / len(tasks)
        assert row["normalised"] == pytest.approx(expected)
    assert rows["individual experts"]["normalised"] == pytest.approx(1.0)
    # Each method was tuned over its grid on validation, and the best setting was scored on test.
    methods = {m["method"]: m for m in payload["methods"]}
    assert len(methods["ties"]["validation"]) == 9
    best = max(methods["ties"]["validation"], key=lambda v: v["mean"])
    assert methods["ties"]["chosen"] == best["params"]
    assert methods["passthrough"]["status"] == "skipped"
    assert [p["experts"] for p in payload["curve"]["task_arithmetic"]] == list(range(2, len(tasks) + 1))
    negation = payload["negation"]["rows"]
    assert negation[1]["model"] == "behaviour expert" and negation[1]["behaviour_rate"] > 0.5
    # Two starting points, three and all six task vectors, each with three negations.
    assert [len(row["tasks"]) for row in negation] == [6, 6, 3, 3, 3, 3, 6, 6, 6, 6]
    assert negation[2]["model"].startswith("start: base + 0.3·Σ 3 expert vectors") and set(negation[2]["tasks"]) == set(tasks[:3])
    table = (out / "results.md").read_text()
    assert "| `ties` |" in table and "### Task negation" in table
    assert (out / "results.png").stat().st_size > 10_000
    assert "| `ties` |" in result.stdout


def test_bench_unknown_method_fails_before_any_work(tmp_path):
    result = run_cli("bench", "--zoo", tmp_path / "zoo", "--methods", "tiez", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "unknown method 'tiez'" in result.stderr and "Did you mean 'ties'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "out").exists()
