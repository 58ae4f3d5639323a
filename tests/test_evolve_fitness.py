"""Cheap but honest fitness (``mergeforge.evolve.fitness``): one minibatch per generation, racing
the best on the whole search split, and the bootstrap intervals of the test table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mergeforge.errors import RecipeError

pytest.importorskip("cma")


def search(zoo: Path, **changes) -> dict:
    """DARE-TIES over two tiny-zoo experts, scored on 6 of the first 24 validation examples per task."""
    config = {
        "merge_method": "dare_ties",
        "base_model": str(zoo / "models" / "base"),
        "models": [str(zoo / "models" / "expert_shift"), str(zoo / "models" / "expert_reverse")],
        "search": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}},
        "fitness": [{"task": str(zoo / "tasks" / "shift")}, {"task": str(zoo / "tasks" / "reverse")}],
        "splits": {"search_examples": 24, "test_examples": 40, "minibatch": 6, "race": 2},
        "budget": {"evaluations": 10},
        "optimizer": {"popsize": 4, "sigma0": 0.3},
        "baselines": [],
        "seed": 3,
    }
    config.update(changes)
    return config


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in ("timing", "seconds")} for line in lines]


@pytest.mark.parametrize(("splits", "message"), [
    ({"race": 2}, r"field 'splits': 'race' re-scores candidates scored on a minibatch; set 'minibatch' too"),
    ({"search_examples": 10, "minibatch": 10}, r"field 'splits': 'minibatch' \(10\) must be below 'search_examples' \(10\)"),
    ({"minibatch": 0}, r"field 'splits.minibatch': Input should be greater than 0"),
])
def test_a_bad_minibatch_or_race_is_refused_naming_the_field(tmp_path, splits, message):
    import yaml

    from mergeforge.evolve.config import load_search_config

    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(search(tmp_path, splits=splits)), encoding="utf-8")
    with pytest.raises(RecipeError, match=message) as caught:
        load_search_config(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_a_generation_has_one_minibatch_drawn_from_the_search_split(tiny_zoo_dir):
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.fitness import minibatch_tasks
    from mergeforge.tasks.folders import load_task

    config, _ = load_search_config(search(tiny_zoo_dir))
    tasks = [load_task(tiny_zoo_dir / "tasks" / "shift"), load_task(tiny_zoo_dir / "tasks" / "reverse")]
    first = [task.examples("val", 24) for task in tasks]

    def drawn(generation: int) -> list[list]:
        return [task.examples("val", 24) for task in minibatch_tasks(config, tasks, generation)]

    assert drawn(4) == drawn(4)  # every candidate of generation 4 (and a resumed run) sees these
    assert all(len(batch) == 6 and all(e in pool for e in batch) for batch, pool in zip(drawn(4), first, strict=True))
    assert all(len({e.prompt for e in batch}) == 6 for batch in drawn(4))  # without replacement
    assert drawn(4) != drawn(5)
    seen = {e.prompt for generation in range(20) for e in drawn(generation)[0]}
    assert len(seen) > 18  # the minibatches move over the split, not one fixed subset


def write_task(folder: Path, source: Path, examples: list) -> Path:
    """A task folder holding exactly ``examples`` as its validation split."""
    folder.mkdir(parents=True)
    shutil.copy(source / "spec.json", folder / "spec.json")
    (folder / "val.jsonl").write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in examples))
    return folder


def test_minibatch_scores_and_the_race_are_what_they_claim(tiny_zoo_dir, tmp_path):
    """Each candidate's journal fitness is its score on its generation's examples (scored again from
    task folders holding only those); the race re-scores each generation's two best on the whole
    search split; the winner is the best re-scored one, not the best minibatch score."""
    from mergeforge.evaluate.api import evaluate_model
    from mergeforge.evolve.api import run_search
    from mergeforge.evolve.candidates import CandidatePool
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.fitness import minibatch_tasks

    report = run_search(search(tiny_zoo_dir), tmp_path / "out")
    journal = read_lines(tmp_path / "out" / "journal.jsonl")
    races = read_lines(tmp_path / "out" / "race.jsonl")
    config, folder = load_search_config(search(tiny_zoo_dir))
    pool = CandidatePool(config, folder)
    names = ["shift", "reverse"]
    tasks = [pool.pool.tasks[name] for name in names]
    for entry in journal:
        pool.load(pool.space.values(entry["genome"]))
        batch = minibatch_tasks(config, tasks, entry["generation"])
        where = tmp_path / f"g{entry['generation']}c{entry['candidate']}"
        folders = [write_task(where / name, tiny_zoo_dir / "tasks" / name, task.examples("val", 24))
                   for name, task in zip(names, batch, strict=True)]
        scores = evaluate_model(pool.pool.skeleton, folders, split="val", tokenizer=pool.pool.tokenizer, with_loss=False,
                                scoring="forced")["tasks"]
        assert {name: scores[name]["score"] for name in names} == entry["scores"]
        assert all(scores[name]["n"] == 6 for name in names)
    generations = sorted({e["generation"] for e in journal})
    assert [line["generation"] for line in races] == [g for g in generations for _ in range(2)]
    for generation in generations:
        ranked = sorted((e for e in journal if e["generation"] == generation), key=lambda e: (-e["fitness"], e["candidate"]))
        raced = [line for line in races if line["generation"] == generation]
        assert [line["candidate"] for line in raced] == [e["candidate"] for e in ranked[:2]]
        assert [line["minibatch_fitness"] for line in raced] == [e["fitness"] for e in ranked[:2]]
    for line in races:
        entry = next(e for e in journal if (e["generation"], e["candidate"]) == (line["generation"], line["candidate"]))
        pool.load(pool.space.values(entry["genome"]))
        whole = evaluate_model(pool.pool.skeleton, [tiny_zoo_dir / "tasks" / n for n in names], split="val", max_examples=24,
                               tokenizer=pool.pool.tokenizer, with_loss=False, scoring="forced")["tasks"]
        assert line["scores"] == {name: whole[name]["score"] for name in names}
    best = max(races, key=lambda line: line["fitness"])
    assert report["best"]["fitness"] == best["fitness"] and report["best"]["generation"] == best["generation"]
    assert report["best"]["minibatch_fitness"] == best["minibatch_fitness"]
    assert report["reproduction"]["difference"] == 0.0  # winner.yml re-scored on the whole split
    assert report["racing"]["re_scored"] == len(races)


def test_a_resumed_minibatch_search_writes_the_journal_and_races_of_an_uninterrupted_one(tiny_zoo_dir, tmp_path):
    from mergeforge.evolve.api import run_search

    whole = run_search(search(tiny_zoo_dir), tmp_path / "whole")
    run_search(search(tiny_zoo_dir, budget={"evaluations": 6}), tmp_path / "resumed")
    resumed = run_search(search(tiny_zoo_dir), tmp_path / "resumed", resume=True)
    for name in ("journal.jsonl", "race.jsonl"):
        assert without_timing(read_lines(tmp_path / "resumed" / name)) == without_timing(read_lines(tmp_path / "whole" / name))
    assert resumed["best"] == whole["best"]


def explicit_bootstrap(verdicts: list[list[int]], weights: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """The textbook bootstrap: resample each task's 0/1 verdicts with replacement."""
    generator = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for weight, task in zip(weights, verdicts, strict=True):
        values = np.array(task, dtype=float)
        total += weight * values[generator.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(total, [0.025, 0.975])
    return float(low), float(high)


def test_the_count_bootstrap_is_the_example_bootstrap():
    from mergeforge.evolve.fitness import bootstrap_interval

    one = [1] * 37 + [0] * 63
    low, high = bootstrap_interval([(1.0, 37, 100)], seed=0, resamples=20_000)
    reference = explicit_bootstrap([one], [1.0], 20_000, seed=1)
    assert abs(low - reference[0]) <= 0.0101 and abs(high - reference[1]) <= 0.0101  # one example either way
    assert 0.26 < low < 0.30 and 0.45 < high < 0.49  # ~ 0.37 ± 1.96 · sqrt(0.37 · 0.63 / 100)
    other = [1] * 9 + [0] * 31
    low, high = bootstrap_interval([(1.0, 37, 100), (-0.5, 9, 40)], seed=0, resamples=20_000)
    reference = explicit_bootstrap([one, other], [1.0, -0.5], 20_000, seed=1)
    assert abs(low - reference[0]) < 0.01 and abs(high - reference[1]) < 0.01


def test_bootstrap_intervals_are_seeded_narrow_with_more_examples_and_empty_when_certain():
    from mergeforge.evolve.fitness import bootstrap_interval

    assert bootstrap_interval([(1.0, 30, 60)], seed=4) == bootstrap_interval([(1.0, 30, 60)], seed=4)
    small, large = bootstrap_interval([(1.0, 10, 20)], seed=0), bootstrap_interval([(1.0, 100, 200)], seed=0)
    assert small[1] - small[0] > 2 * (large[1] - large[0])
    assert bootstrap_interval([(1.0, 25, 25)], seed=0) == (1.0, 1.0)
    assert bootstrap_interval([(1.0, 0, 25)], seed=0) == (0.0, 0.0)


def test_the_test_table_carries_each_rows_interval(tiny_zoo_dir, tmp_path):
    from mergeforge.evolve.api import run_search

    report = run_search(search(tiny_zoo_dir, budget={"evaluations": 4}, baselines=[{"merge_method": "linear", "model_parameters": {"weight": 1.0}}]),
                        tmp_path / "out")
    for row in report["test"]:
        for key in ("shift", "reverse"):
            low, high = row["ci95"][key]
            assert low <= row["scores"][key] <= high
        low, high = row["ci95"]["fitness"]
        assert low <= row["fitness"] <= high
    linear = next(row for row in report["test"] if row["name"] == "linear")
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"| linear | {linear['scores']['shift']:.4f} [{linear['ci95']['shift'][0]:.2f}, " in text
    assert "bootstrap 95% interval" in text


def test_a_search_without_a_winner_says_which_candidates_failed_where(tmp_path):
    """Nothing ran; every candidate failed (its first error, in the journal); or every candidate
    scored on its minibatch but failed on the whole split (the race's error, in race.jsonl)."""
    from mergeforge.evolve.api import no_winner_message

    failed = {"fitness": None, "error": "ValueError: bad genome"}
    scored = {"fitness": 0.5, "error": None}
    race = {"fitness": None, "error": "RuntimeError: out of memory"}
    assert "(none ran); see journal.jsonl" in no_winner_message(tmp_path, [], [])
    assert "every candidate failed (ValueError: bad genome); see journal.jsonl" in no_winner_message(tmp_path, [failed, failed], [])
    message = no_winner_message(tmp_path, [failed, scored], [race])
    assert "every raced candidate failed on the whole search split (RuntimeError: out of memory); see race.jsonl" in message
