"""``mergeforge demo`` through the real CLI: builds (or reuses) the tiny zoo, merges, prints a table."""

from __future__ import annotations

from conftest import run_cli


def test_demo_prints_the_table(tmp_path):
    completed = run_cli("demo", "--workdir", tmp_path / "demo", "--limit", "40")
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    for label in ("base", "expert (own task)", "multi-task model", "merge: average", "merge: task_arithmetic", "merge: ties"):
        assert f"| {label}" in out, out
    header = next(line for line in out.splitlines() if line.startswith("| model"))
    assert "reverse" in header and "norm." in header
    for method in ("average", "task_arithmetic", "ties"):
        assert (tmp_path / "demo" / f"merged-{method}" / "config.json").is_file()
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    expert_norm = float(rows["expert (own task)"].split("|")[-2])
    assert expert_norm == 100.0
