"""``mergeforge evolve`` on the tiny zoo: the search file's refusals, the in-memory group merge
against the engine's whole-model merge, the partial re-merge cache, resume, the exported recipe
through the real CLI, and a failing candidate."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from evolve_support import (
    assert_a_killed_run_resumes_to_the_uninterrupted_result,
    deterministic,
    read_lines,
    write_search,
)

from mergeforge.errors import MergeforgeError, RecipeError

pytest.importorskip("cma")


def search(zoo: Path, **changes) -> dict:
    """A small search over two of the tiny zoo's experts (a few seconds)."""
    config = {
        "merge_method": "dare_ties",  # random masks: the seed has to reach every merge
        "base_model": str(zoo / "models" / "base"),
        "models": [str(zoo / "models" / "expert_shift"), str(zoo / "models" / "expert_reverse")],
        "search": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}},
        "fitness": [{"task": str(zoo / "tasks" / "shift")}, {"task": str(zoo / "tasks" / "reverse")}],
        "splits": {"search_examples": 12, "test_examples": 12},
        "budget": {"evaluations": 8},
        "optimizer": {"popsize": 4},
        "baselines": [],
        "seed": 3,
    }
    config.update(changes)
    return config


# -- the search file ------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"serach": {}}, r"unknown field 'serach'; did you mean 'search'\?"),
    ({"search": {"wieght": {"low": 0, "high": 1}}}, r"field 'search.wieght': 'dare_ties' has no parameter 'wieght'; did you mean 'weight'\?"),
    ({"search": {"normalize": {"low": 0, "high": 1}}}, r"field 'search.normalize': 'normalize' is a bool parameter"),
    ({"search": {"density": {"low": 0.5, "high": 1.5}}}, r"field 'search.density': \[0.5, 1.5\] leaves the parameter's range \(0, 1\]"),
    ({"search": {"weight": {"low": 1, "high": 0}}}, r"field 'search.weight': low \(1.0\) must be below high \(0.0\)"),
    ({"search": {"weight": {"low": 0, "high": 1, "start": 2}}}, r"field 'search.weight': start \(2.0\) must lie in \[0.0, 1.0\]"),
    ({"splits": {"search": "test"}}, r"field 'splits': the search split and the test split are both 'test'"),
    ({"budget": {}}, r"field 'budget': give 'evaluations' or 'seconds'"),
    ({"budget": {"evaluations": 0}}, r"field 'budget.evaluations': Input should be greater than 0"),
    ({"fitness": [{"task": "t", "metric": "bleu"}]}, r"field 'fitness.0': metric 'bleu' of task 't': use one of score, loss"),
    ({"merge_method": "tiez"}, r"field 'merge_method': unknown method 'tiez'. Did you mean 'ties'\?"),
    ({"parameters": {"lamda": 1.0}}, r"field 'parameters.lamda': 'dare_ties' has no parameter 'lamda'"),
    ({"models": [{"model": "a", "parameters": {"wieght": 1.0}}]},
     r"field 'models.0.parameters.wieght': 'dare_ties' has no per-model parameter 'wieght'"),
    ({"baselines": [{"merge_method": "tiez"}]}, r"field 'baselines.0.merge_method': unknown method 'tiez'"),
    ({"optimizer": {"name": "nsga2", "sigma0": 0.2}}, r"field 'optimizer': 'sigma0' is an option of cma; nsga2 takes only 'popsize'"),
    ({"optimizer": {"name": "nsga2"}, "fitness": [{"task": "a"}, {"task": "b", "weight": 0}]},
     r"optimizer 'nsga2' searches the Pareto front of two fitness terms or more \(with a non-zero weight\); this search has 1"),
])
def test_a_bad_search_file_is_refused_naming_the_file_and_field(tmp_path, change, message):
    from mergeforge.evolve.config import load_search_config

    path = write_search(tmp_path / "search.yml", search(tmp_path, **change))
    with pytest.raises(RecipeError, match=message) as caught:
        load_search_config(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_the_cli_refuses_a_bad_search_in_one_line_before_reading_a_model(tmp_path):
    path = write_search(tmp_path / "search.yml", search(tmp_path, budget={"evaluations": 4, "evals": 2}))
    result = run_cli("evolve", path, tmp_path / "out")
    assert result.returncode == 2
    assert "unknown field 'budget.evals'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_too_many_layer_groups_is_refused(tiny_zoo_dir, tmp_path):
    from mergeforge.evolve.api import run_search

    path = write_search(tmp_path / "search.yml", search(tiny_zoo_dir, layer_groups=5))
    with pytest.raises(RecipeError, match=r"search.yml: field 'layer_groups': 5 groups for a model of 2 layers"):
        run_search(path, tmp_path / "out")


# -- in-memory merging ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped_pool(tiny_zoo_dir):
    """Candidates with genes per layer (2 layers: groups 'layer 0', 'layer 1', 'outside the layers')."""
    from mergeforge.evolve.candidates import CandidatePool
    from mergeforge.evolve.config import load_search_config

    config, folder = load_search_config(search(tiny_zoo_dir, layer_groups=2))
    return CandidatePool(config, folder)


def engine_merge(pool, values):
    """The genome's whole-model recipe merged by the engine, in one merge_state_dicts call."""
    from mergeforge.engine.api import merge_state_dicts

    recipe = pool.space.recipe(values, ["a", "b"], "base")
    return merge_state_dicts(recipe["merge_method"], pool.model_states, pool.base_state, parameters=recipe.get("parameters"),
                             model_parameters=[m.get("parameters") for m in recipe["models"]], seed=pool.config.seed)


def resident_weights(pool):
    return {name: tensor.clone() for name, tensor in pool.pool.skeleton.state_dict().items()}


def assert_same_weights(left, right):
    assert left.keys() == right.keys()
    different = [name for name in left if not torch.equal(left[name], right[name])]
    assert not different, different


def test_a_genome_merged_group_by_group_equals_the_engines_merge_of_its_recipe(grouped_pool):
    pool = grouped_pool
    assert pool.space.labels == ["layer 0", "layer 1", "outside the layers"]
    assert pool.space.dimensions == 3 * 2 * 2  # groups x parameters x models
    rng = random.Random(0)
    values = pool.space.values([rng.random() for _ in range(pool.space.dimensions)])
    recipe = pool.space.recipe(values, ["a", "b"], "base")
    weight = recipe["models"][0]["parameters"]["weight"]
    assert [entry.get("filter") for entry in weight] == ["model.layers.0.", "model.layers.1.", None]  # a plain mergekit filter list
    pool.forget()
    assert pool.load(values) == 3
    assert_same_weights(resident_weights(pool), engine_merge(pool, values))


def test_the_partial_re_merge_gives_the_weights_of_a_full_one(grouped_pool):
    pool = grouped_pool
    space = pool.space
    first = space.values([0.3] * space.dimensions)
    changed = list(first)
    for index, gene in enumerate(space.genes):
        if gene.group == 1:
            changed[index] = gene.low + 0.9 * (gene.high - gene.low)
    pool.forget()
    pool.load(first)
    assert pool.load(changed) == 1  # only the changed group is merged
    assert_same_weights(resident_weights(pool), engine_merge(pool, changed))
    assert pool.load(first) == 0  # back to the first: every group from the cache
    assert_same_weights(resident_weights(pool), engine_merge(pool, first))


def test_a_searched_lambda_rescales_one_merge_at_lambda_1_and_matches_the_engine(tiny_zoo_dir, tmp_path):
    """λ of TIES only scales the merged task vector (Param.scales_result): candidates that differ in
    λ alone share one merge per group, and their weights are the engine's to float32 rounding."""
    from mergeforge.evolve.api import run_search
    from mergeforge.evolve.candidates import CandidatePool
    from mergeforge.evolve.config import load_search_config

    models = [{"model": str(tiny_zoo_dir / "models" / f"expert_{name}"), "parameters": {"weight": 1.0}} for name in ("shift", "reverse")]
    changes = {"merge_method": "ties", "layer_groups": 2, "models": models,
               "search": {"density": {"low": 0.2, "high": 1.0}, "lambda": {"low": 0.5, "high": 2.5}}}
    config, folder = load_search_config(search(tiny_zoo_dir, **changes))
    pool = CandidatePool(config, folder)
    assert pool.rescaled == "lambda"
    space = pool.space
    first = space.values([0.3] * space.dimensions)
    pool.load(first)
    units = [id(unit[1]) for unit in pool.units]
    for lambda_unit in (0.1, 0.9):
        values = space.values([lambda_unit if gene.param == "lambda" else 0.3 for gene in space.genes])
        assert pool.load(values) == 3  # every group's λ changed ...
        assert [id(unit[1]) for unit in pool.units] == units  # ... and not one group was merged again
        merged, expected = resident_weights(pool), engine_merge(pool, values)
        for name in expected:
            torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6)
    denser = space.values([0.8 if gene.param == "density" and gene.group == 0 else 0.3 for gene in space.genes])
    pool.load(denser)
    assert [id(unit[1]) for unit in pool.units][1:] == units[1:] and id(pool.units[0][1]) != units[0]
    torch.testing.assert_close(resident_weights(pool), engine_merge(pool, denser), rtol=1e-5, atol=1e-6)
    # The exported recipe, merged on disk by the engine at its λ, scores the journalled fitness.
    report = run_search(search(tiny_zoo_dir, **changes), tmp_path / "out")
    assert report["reproduction"]["difference"] == 0.0


# -- the search -----------------------------------------------------------------------------------


def test_an_int_parameter_is_searched_as_rounded_values():
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.space import SearchSpace
    from mergeforge.methods.registry import get_method

    config, _ = load_search_config(search(Path("."), merge_method="consensus", search={"k": {"low": 1, "high": 4}},
                                          layer_groups=1))
    space = SearchSpace(config, get_method("consensus"), ["model.layers.0.mlp.weight", "lm_head.weight"])
    assert [gene.integer for gene in space.genes] == [True]
    assert space.values([0.0]) == [1] and space.values([0.6]) == [3] and space.values([1.0]) == [4]


def test_a_resumed_search_writes_the_journal_of_an_uninterrupted_one(tiny_zoo_dir, tmp_path):
    from mergeforge.evolve.api import run_search

    whole = run_search(search(tiny_zoo_dir, budget={"evaluations": 10}), tmp_path / "whole")
    # Stopped by its budget in the middle of the second generation (popsize 4), then continued.
    run_search(search(tiny_zoo_dir, budget={"evaluations": 6}), tmp_path / "resumed")
    assert len(read_lines(tmp_path / "resumed" / "journal.jsonl")) == 6
    resumed = run_search(search(tiny_zoo_dir, budget={"evaluations": 10}), tmp_path / "resumed", resume=True)
    assert deterministic(read_lines(tmp_path / "resumed" / "journal.jsonl")) == deterministic(read_lines(tmp_path / "whole" / "journal.jsonl"))
    assert resumed["best"] == whole["best"]
    assert (tmp_path / "resumed" / "winner.yml").read_text() == (tmp_path / "whole" / "winner.yml").read_text()
    with pytest.raises(MergeforgeError, match="only 'budget' may change"):
        run_search(search(tiny_zoo_dir, seed=4), tmp_path / "resumed", resume=True)
    with pytest.raises(MergeforgeError, match="not empty; pass --resume"):
        run_search(search(tiny_zoo_dir), tmp_path / "whole")


def register_fragile_method() -> None:
    """A method that raises when the first model's weight is above 1."""
    from mergeforge import Param, register_method
    from mergeforge.methods.registry import BaseUse

    @register_method("fragile_sum_for_test", params=[Param("weight", 1.0, per_model=True, low=0.0, high=2.0)],
                     base=BaseUse.REQUIRED, math="θ_base + Σ wᵢ(θᵢ − θ_base), failing for w₀ > 1", citation="test")
    def fragile_sum(tensors, base, *, weight):
        if weight[0] > 1.0:
            raise RuntimeError(f"weight {weight[0]:.3f} is too large for this test method")
        return base + sum(w * (t - base) for w, t in zip(weight, tensors, strict=True))


def test_a_failing_candidate_is_journalled_and_the_search_goes_on(tiny_zoo_dir, tmp_path, scratch_methods):
    from mergeforge.evolve.api import run_search

    register_fragile_method()
    config = search(tiny_zoo_dir, merge_method="fragile_sum_for_test", search={"weight": {"low": 0.0, "high": 2.0}},
                    budget={"evaluations": 12}, optimizer={"popsize": 6, "sigma0": 0.5})
    report = run_search(config, tmp_path / "out")
    entries = read_lines(tmp_path / "out" / "journal.jsonl")
    failed = [e for e in entries if e["fitness"] is None]
    assert len(entries) == 12 and failed and len(failed) < 12
    assert all("RuntimeError" in e["error"] and "too large for this test method" in e["error"] for e in failed)
    assert report["failed"] == len(failed) and report["best"]["fitness"] is not None
    assert report["best"]["parameters"]["weight [model 0, group 0]"] <= 1.0


def test_a_search_where_every_candidate_fails_says_so(tiny_zoo_dir, tmp_path, scratch_methods):
    from mergeforge.evolve.api import run_search

    register_fragile_method()
    config = search(tiny_zoo_dir, merge_method="fragile_sum_for_test", search={"weight": {"low": 1.1, "high": 2.0}},
                    budget={"evaluations": 4})
    with pytest.raises(MergeforgeError, match="every candidate failed .RuntimeError: weight .* is too large"):
        run_search(config, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["failed"] == 4


def test_the_exported_recipe_reproduces_the_fitness_through_the_cli(tiny_zoo_dir, tmp_path):
    from mergeforge.evaluate.api import evaluate_model

    path = write_search(tmp_path / "search.yml", search(tiny_zoo_dir, baselines=None))
    result = run_cli("evolve", path, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "generation   0" in result.stderr and "| evolved (winner) |" in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reproduction"]["difference"] == 0.0
    names = [row["name"] for row in report["test"]]
    assert names[0] == "base" and "ties (density 0.5)" in names and names[-1] == "evolved (winner)"
    # On held-out test data the evolved recipe beats the base and every hand-set merge (not the
    # sources in 8 evaluations: each does its own task, 1 of 2; docs/evolve.md has longer runs).
    rows = {row["name"]: row["fitness"] for row in report["test"] if not row["name"].startswith("source: ")}
    evolved = rows.pop("evolved (winner)")
    assert len(rows) == 5 and all(evolved > fitness for fitness in rows.values()), report["test"]
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 5_000
    winner = (tmp_path / "out" / "winner.yml").read_text()
    assert "seed: 3" in winner and "--seed 3" in winner
    assert "dtype: float32" in winner  # what was evaluated: the sources read into float32
    merged = run_cli("merge", tmp_path / "out" / "winner.yml", tmp_path / "again", "--seed", "3", "--quiet")
    assert merged.returncode == 0, merged.stderr
    tasks = [tiny_zoo_dir / "tasks" / "shift", tiny_zoo_dir / "tasks" / "reverse"]
    scores = evaluate_model(tmp_path / "again", tasks, split="val", max_examples=12, scoring="forced", with_loss=False)
    assert sum(entry["score"] for entry in scores["tasks"].values()) == report["best"]["fitness"]


def test_a_journal_line_cut_short_by_a_kill_is_dropped(tmp_path):
    from mergeforge.evolve.journal import JOURNAL, append_entry, read_journal

    append_entry(tmp_path, {"generation": 0, "candidate": 0})
    with (tmp_path / JOURNAL).open("a") as handle:
        handle.write('{"generation": 0, "cand')
    assert read_journal(tmp_path) == [{"generation": 0, "candidate": 0}]
    append_entry(tmp_path, {"generation": 0, "candidate": 1})
    assert [e["candidate"] for e in read_journal(tmp_path)] == [0, 1]


def test_help_imports_neither_torch_nor_cma_nor_ray():
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from mergeforge.cli import main\n"
        "for args in (['--help'], ['evolve', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'cma', 'transformers', 'numpy', 'ray') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "evolve" in result.stdout and "--ray-address" in result.stdout and "HEAVY []" in result.stdout


@pytest.mark.slow  # three CLI runs of a 40-candidate search: about 40 s on 2 cores
def test_a_search_killed_with_sigkill_resumes_to_the_uninterrupted_result(tiny_zoo_dir, tmp_path):
    config = search(tiny_zoo_dir, budget={"evaluations": 40}, splits={"search_examples": 48, "test_examples": 12})
    assert_a_killed_run_resumes_to_the_uninterrupted_result(config, tmp_path)


OPTIMIZER_SCRIPT = """
import pickle, sys
from pathlib import Path
from mergeforge.evolve.config import load_search_config
from mergeforge.evolve.search import new_optimizer, rehash_archives
config, _ = load_search_config({config!r})
state = Path({state!r})
def loss(points):
    return [float(sum((x - 0.9) ** 2 for x in point)) for point in points]
if sys.argv[1] in ("first", "whole"):
    optimizer = new_optimizer(config, [0.5] * 4)
    asked = [optimizer.ask(), optimizer.ask()]  # the pipeline: generation 1 asked before 0 is told
    optimizer.tell(asked[0], loss(asked[0]))
    optimizer.ask()  # generation 2, asked before 1 is told
    if sys.argv[1] == "first":
        state.write_bytes(pickle.dumps((optimizer, asked[1])))
        sys.exit(0)
    point = asked[1]
else:
    optimizer, point = pickle.loads(state.read_bytes())
    rehash_archives(optimizer)
optimizer.tell(point, loss(point))
print([round(float(x), 12) for x in optimizer.ask()[0]])
"""


def test_a_generation_asked_in_one_process_and_told_in_another_is_told_the_same(tmp_path):
    """cma keys its asked solutions by a per-process salted hash; a resumed pipeline tells a
    generation that an earlier process asked (rehash_archives)."""
    import os
    import subprocess
    import sys

    config = search(Path("."), optimizer={"popsize": 4, "sigma0": 0.5})  # σ0 0.5: samples leave the unit cube
    script = OPTIMIZER_SCRIPT.format(config=config, state=str(tmp_path / "state.pkl"))

    def run(step: str, hash_seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", script, step], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    whole = run("whole", "1")
    run("first", "2")
    assert run("resumed", "3") == whole


def test_the_genome_grid_holds_each_groups_merge_parameters(grouped_pool):
    from mergeforge.evolve.report import genome_grids

    pool = grouped_pool
    rng = random.Random(1)
    values = pool.space.values([rng.random() for _ in range(pool.space.dimensions)])
    grids = genome_grids(pool, values)
    assert sorted(grids) == ["density", "weight"]
    for group in range(len(pool.space.labels)):
        merged_with = pool.space.group_parameters(values, group).per_model
        for param, grid in grids.items():
            assert grid[group] == [model[param] for model in merged_with]
    assert len({value for grid in grids.values() for row in grid for value in row}) == pool.space.dimensions


def test_a_grouped_search_draws_its_genome_and_writes_a_model_card(tiny_zoo_dir, tmp_path):
    from mergeforge.evolve.api import run_search

    report = run_search(search(tiny_zoo_dir, layer_groups=2, budget={"evaluations": 4}), tmp_path / "out")
    assert report["genome_plot_skipped"] is None and (tmp_path / "out" / "genome.png").stat().st_size > 5_000
    assert "![genome](genome.png)" in (tmp_path / "out" / "report.md").read_text()
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "## Recipe" in card  # the engine's card, kept
    assert "method `dare_ties`, 12 genes, seed 3, budget 4 evaluations; 4 candidates evaluated (0 failed)" in card
    assert f"on the `val` split: {report['best']['fitness']:.4f}" in card and "--seed 3" in card
    winner = next(row for row in report["test"] if row["name"] == "evolved (winner)")
    assert f"| evolved (winner) | {winner['scores']['shift']:.4f} [" in card
    one_group = run_search(search(tiny_zoo_dir, budget={"evaluations": 4}), tmp_path / "one")
    assert one_group["genome_plot_skipped"] and not (tmp_path / "one" / "genome.png").exists()
