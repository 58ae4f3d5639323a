"""``mergeforge demo`` through the real CLI, on the tiny zoo (the default, the SmolLM2 zoo, is built by hand: docs/zoo.md)."""

from __future__ import annotations

from conftest import run_cli


def test_demo_prints_the_table(tmp_path):
    completed = run_cli("demo", "--size", "tiny", "--workdir", tmp_path / "demo", "--limit", "40")
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    for label in ("base", "expert (own task)", "multi-task model", "merge: average", "merge: task_arithmetic", "merge: ties"):
        assert f"| {label}" in out, out
    header = next(line for line in out.splitlines() if line.startswith("| model"))
    assert "reverse" in header and "norm." in header
    for method in ("average", "task_arithmetic", "ties"):
        assert (tmp_path / "demo" / f"merged-{method}" / "config.json").is_file()
    # The normalised column is each row's mean over tasks of its score divided by the expert's on
    # that task, recomputed here from the printed scores.
    tasks = [cell.strip() for cell in header.split("|")[2:-2]]
    rows = {cells[1].strip(): [cell.strip() for cell in cells[2:-1]]
            for cells in (line.split("|") for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model"))}
    expert = {task: float(value) for task, value in zip(tasks, rows["expert (own task)"][:-1]) if value not in ("", "-")}
    assert len(expert) == len(tasks) and all(score > 50 for score in expert.values())
    for label, cells in rows.items():
        scores = [float(value) for value in cells[:-1]]
        expected = 100 * sum(score / expert[task] for score, task in zip(scores, tasks)) / len(tasks)
        assert abs(float(cells[-1]) - expected) < 0.5, (label, cells)


def test_demo_keeps_its_baselines(tmp_path):
    """The base's and experts' rows are kept beside the merges and read back; the merge rows are redone."""
    import json

    first = run_cli("demo", "--size", "tiny", "--workdir", tmp_path / "demo", "--limit", "20")
    assert first.returncode == 0, first.stderr
    saved = json.loads((tmp_path / "demo" / "baselines.json").read_text())
    assert set(saved["rows"]) == {"base", "expert (own task)", "multi-task model"} and saved["key"]["limit"] == 20
    second = run_cli("demo", "--size", "tiny", "--workdir", tmp_path / "demo", "--limit", "20")
    table = [line for line in first.stdout.splitlines() if line.startswith("| ")]
    assert [line for line in second.stdout.splitlines() if line.startswith("| ")] == table
