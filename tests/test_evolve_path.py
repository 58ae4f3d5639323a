"""``mergeforge evolve`` with ``layer_path`` (Sakana's data-flow search) on the tiny zoo: routing
through shared layers (own logits, KV cache with a repeated layer), the exact fold of the scales
into a passthrough recipe, the slots and the export, resume, the search file's refusals, a path
source that is itself a merge recipe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from evolve_support import (
    assert_a_killed_run_resumes_to_the_uninterrupted_result,
    path_search,
    pooled_journal,
    read_lines,
    write_search,
)

from mergeforge.errors import RecipeError

pytest.importorskip("cma")


@pytest.fixture(scope="module")
def path_pool(tiny_zoo_dir, tmp_path_factory):
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.routing import PathPool

    config, folder = load_search_config(path_search(tiny_zoo_dir))
    return PathPool(config, folder, tmp_path_factory.mktemp("out"))


def token_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (3, 11), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# A path that interleaves the two models, repeats a layer, and scales every step differently.
MIXED = [(0, 0, 0.8), (1, 0, 1.3), (1, 1, 0.7), (0, 1, 1.1), (1, 1, 1.25)]


def genome_of(space, steps: list[tuple[int, int, float]]) -> list[float]:
    """Unit-cube genes taking the slots of ``steps`` (in slot order) with their scales."""
    unit = [0.0] * space.dimensions
    half, low, high = len(space.slots), space.path.scale.low, space.path.scale.high
    cursor = 0
    for model, layer, scale in steps:
        slot = next(i for i in range(cursor, half) if space.slots[i] == (model, layer))
        unit[slot], unit[half + slot] = 1.0, (scale - low) / (high - low)
        cursor = slot + 1
    return unit


# -- routing --------------------------------------------------------------------------------------


def test_a_source_routed_as_its_own_path_gives_its_own_logits(path_pool, tiny_zoo_dir):
    from transformers import AutoModelForCausalLM

    ids = token_batch()
    for index, name in enumerate(["expert_shift", "expert_reverse"]):
        source = AutoModelForCausalLM.from_pretrained(tiny_zoo_dir / "models" / name, dtype=torch.float32).eval()
        routed = path_pool.router.route(path_pool.router.identity(index))
        assert torch.equal(logits_of(routed, ids), logits_of(source, ids))
    path_pool.load_source(1)
    assert path_pool.score("val") == {"shift": 0.0, "reverse": 1.0}


def test_a_repeated_layer_keeps_one_cache_entry_per_step(path_pool):
    """Incremental decoding with the KV cache gives the logits of a full forward pass, although
    one layer object runs at two places of the path."""
    space = path_pool.space
    model = path_pool.router.route(space.steps(space.values(genome_of(space, MIXED))))
    ids = token_batch(1)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=prefix.cache, use_cache=True).logits[:, -1]
    assert len(prefix.cache) == len(MIXED)
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_the_scales_mean_scaled_residual_updates(path_pool, tiny_zoo_dir):
    """The definition, built independently: copies of the layers with forward hooks that multiply
    the attention and MLP outputs by the step's scale, in a plain model of the path's depth."""
    from transformers import AutoModelForCausalLM

    space = path_pool.space
    routed = path_pool.router.route(space.steps(space.values(genome_of(space, MIXED))))
    sources = [AutoModelForCausalLM.from_pretrained(tiny_zoo_dir / "models" / name, dtype=torch.float32).eval()
               for name in ("expert_shift", "expert_reverse")]
    config = copy.deepcopy(sources[0].config)
    config.num_hidden_layers = len(MIXED)
    reference = type(sources[0])(config).eval()
    layers = []
    for index, (model, layer, scale) in enumerate(MIXED):
        block = copy.deepcopy(sources[model].model.layers[layer])
        block.self_attn.layer_idx = index
        for module in (block.self_attn, block.mlp):
            module.register_forward_hook(
                lambda _m, _i, out, s=scale: (out[0] * s, *out[1:]) if isinstance(out, tuple) else out * s)
        layers.append(block)
    reference.model.layers = torch.nn.ModuleList(layers)
    reference.model.embed_tokens = sources[0].model.embed_tokens
    reference.model.norm, reference.lm_head = sources[1].model.norm, sources[1].lm_head
    ids = token_batch(2)
    torch.testing.assert_close(logits_of(routed, ids), logits_of(reference, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of(routed, ids), logits_of(path_pool.router.route(
        space.steps(space.values(genome_of(space, [(m, layer, 1.0) for m, layer, _ in MIXED])))), ids), atol=1e-3)


def test_the_folded_passthrough_merge_gives_the_routed_logits_bit_for_bit(path_pool, tmp_path):
    from transformers import AutoModelForCausalLM

    from mergeforge import merge

    space = path_pool.space
    values = space.values(genome_of(space, MIXED))
    recipe = path_pool.winner_recipe(values)
    assert recipe["merge_method"] == "passthrough" and len(recipe["slices"]) == len(MIXED)
    first = recipe["slices"][0]["sources"][0]
    assert first["layer_range"] == [0, 1]
    assert first["parameters"]["scale"][:2] == [{"filter": "o_proj", "value": pytest.approx(0.8)},
                                                {"filter": "down_proj", "value": pytest.approx(0.8)}]
    recipe_path = tmp_path / "winner.yml"
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    merge(recipe_path, tmp_path / "merged", quiet=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.config.num_hidden_layers == len(MIXED)
    routed = path_pool.router.route(space.steps(values))
    ids = token_batch(3)
    assert torch.equal(logits_of(merged, ids), logits_of(routed, ids))


def test_consecutive_layers_of_one_model_with_one_scale_are_one_slice(path_pool):
    space = path_pool.space
    assert len(space.slots) == 8 and space.dimensions == 16
    values = space.values(genome_of(space, [(0, 0, 1.0), (0, 1, 1.0), (1, 1, 1.0), (0, 0, 1.0), (0, 1, 0.9)]))
    slices = [s["sources"][0] for s in path_pool.winner_recipe(values)["slices"]]
    assert [(Path(s["model"]).name, s["layer_range"], "parameters" in s) for s in slices] == [
        ("expert_shift", [0, 2], False), ("expert_reverse", [1, 2], False), ("expert_shift", [0, 1], False),
        ("expert_shift", [1, 2], True)]
    start = space.steps(space.values(space.start()))
    assert [(s.model, s.layer, s.scale) for s in start] == [(0, 0, 1.0), (0, 1, 1.0)]  # the first model, as it is


def test_without_searched_scales_the_genome_is_the_indicators_alone(tiny_zoo_dir):
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.path_space import PathSpace

    config, _ = load_search_config(path_search(tiny_zoo_dir, layer_path={"search_scales": False}))
    space = PathSpace(config, [2, 2], ["a", "b"])
    assert space.dimensions == 8 and len(space.start()) == 8
    steps = space.steps(space.values([0.9, 0.1, 0.2, 0.7, 0.6, 0.0, 0.0, 0.3]))
    assert [(s.model, s.layer, s.scale) for s in steps] == [(0, 0, 1.0), (1, 1, 1.0), (0, 0, 1.0)]


def test_max_steps_keeps_the_first_taken_slots(tiny_zoo_dir):
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.path_space import PathSpace

    config, _ = load_search_config(path_search(tiny_zoo_dir, layer_path={"max_steps": 3}))
    space = PathSpace(config, [2, 2], ["a", "b"])
    steps = space.steps(space.values([1.0] * 8 + [0.5] * 8))
    assert [(s.model, s.layer) for s in steps] == [(0, 0), (0, 1), (1, 0)]


def test_an_empty_path_is_a_failed_candidate(path_pool):
    from mergeforge.evolve.search import journal_entry

    entry = journal_entry(path_pool, 0, 0, [0.0] * path_pool.space.dimensions)
    assert entry["fitness"] is None and "takes no layer" in entry["error"]


# -- the search file ------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"merge_method": "ties"}, r"'merge_method' belongs to a parameter-space search"),
    ({"layer_path": {"repeat": 3}}, r"unknown field 'layer_path.repeat'; did you mean 'repeats'\?"),
    ({"layer_path": {"repeats": 0}}, r"field 'layer_path.repeats': Input should be greater than or equal to 1"),
    ({"layer_path": {"models": []}}, r"field 'layer_path.models'"),
    ({"layer_path": {"start": 2}}, r"field 'layer_path': start \(2\) must index one of the 2 models"),
    ({"layer_path": {"scale": {"low": 2, "high": 1}}}, r"field 'layer_path.scale': low \(2.0\) must be below high"),
    ({"baselines": [{"merge_method": "ties"}]}, r"field 'baselines.0.merge_method': 'ties' needs a base; set 'base_model'"),
    ({"layer_path": None}, r"missing 'merge_method' \(or give 'layer_path' for a layer-path search\)"),
])
def test_a_bad_layer_path_search_is_refused_naming_the_field(tmp_path, change, message):
    from mergeforge.evolve.config import load_search_config

    config = path_search(tmp_path)
    for key, value in change.items():
        if key == "layer_path" and value is not None:
            config["layer_path"].update(value)
        else:
            config[key] = value
    path = write_search(tmp_path / "search.yml", config)
    with pytest.raises(RecipeError, match=message) as caught:
        load_search_config(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_the_cli_refuses_a_path_through_models_of_different_shapes(tiny_zoo_dir, tmp_path):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny_zoo_dir / "models" / "expert_reverse", odd)
    config = json.loads((odd / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (odd / "config.json").write_text(json.dumps(config))
    search = write_search(tmp_path / "search.yml", path_search(tiny_zoo_dir, layer_path={"models": [str(tiny_zoo_dir / "models" / "expert_shift"), str(odd)]}))
    result = run_cli("evolve", search, tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{search}: field 'layer_path.models.1' ({odd}): its config differs from the first model's in rms_norm_eps" in result.stderr


@pytest.mark.parametrize(("change", "message"), [
    ({"models": ["nowhere"]}, r"search.yml: field 'layer_path.models.0': .*nowhere is neither a model folder nor a recipe file"),
    ({"max_steps": 9}, r"search.yml: field 'layer_path.max_steps': 9 is more than the 8 slots \(2 repeats of 4 layers\)"),
])
def test_a_layer_path_field_that_needs_the_models_is_refused_naming_it(tiny_zoo_dir, tmp_path, change, message):
    from mergeforge.evolve.api import run_search

    search = write_search(tmp_path / "search.yml", path_search(tiny_zoo_dir, layer_path=change))
    with pytest.raises(RecipeError, match=message):
        run_search(search, tmp_path / "out")


# -- the search -----------------------------------------------------------------------------------


def test_a_resumed_layer_path_search_writes_the_journal_of_an_uninterrupted_one(tiny_zoo_dir, tmp_path):
    from mergeforge.evolve.api import run_search

    whole = run_search(path_search(tiny_zoo_dir, budget={"evaluations": 10}), tmp_path / "whole")
    run_search(path_search(tiny_zoo_dir, budget={"evaluations": 6}), tmp_path / "resumed")
    resumed = run_search(path_search(tiny_zoo_dir, budget={"evaluations": 10}), tmp_path / "resumed", resume=True)
    strip = [{k: v for k, v in e.items() if k != "timing"} for e in read_lines(tmp_path / "whole" / "journal.jsonl")]
    again = [{k: v for k, v in e.items() if k != "timing"} for e in read_lines(tmp_path / "resumed" / "journal.jsonl")]
    assert again == strip and len(strip) == 10
    assert len({tuple(e["parameters"]["steps"]) for e in strip}) > 1  # the search moved
    assert resumed["best"] == whole["best"]
    assert (tmp_path / "resumed" / "winner.yml").read_text() == (tmp_path / "whole" / "winner.yml").read_text()


def test_the_exported_path_reproduces_the_fitness_through_the_cli(tiny_zoo_dir, tmp_path):
    from mergeforge import merge
    from mergeforge.evaluate.api import evaluate_model

    config = path_search(tiny_zoo_dir, base_model=str(tiny_zoo_dir / "models" / "base"), baselines=None)
    result = run_cli("evolve", write_search(tmp_path / "search.yml", config), tmp_path / "out")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "layer_path" and report["reproduction"]["difference"] == 0.0
    names = [row["name"] for row in report["test"]]
    assert names == ["base", "source: expert_shift", "source: expert_reverse", "task_arithmetic (weight 1)",
                     "ties (density 0.5)", "dare_ties (density 0.5)", "linear (equal weights)", "evolved (winner)"]
    assert "the winner's path" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "path.png").stat().st_size > 5_000 and report["path_plot_skipped"] is None
    winner = yaml.safe_load((tmp_path / "out" / "winner.yml").read_text())
    assert winner["merge_method"] == "passthrough"
    merge(tmp_path / "out" / "winner.yml", tmp_path / "again", quiet=True)  # what `mergeforge merge` runs
    tasks = [tiny_zoo_dir / "tasks" / "shift", tiny_zoo_dir / "tasks" / "reverse"]
    scores = evaluate_model(tmp_path / "again", tasks, split="val", max_examples=12, scoring="forced", with_loss=False)
    assert sum(entry["score"] for entry in scores["tasks"].values()) == report["best"]["fitness"]


def test_a_path_source_can_be_a_merge_recipe(tiny_zoo_dir, tmp_path):
    """The two searches combined: a parameter-space merge (a recipe file, e.g. a parameter
    search's winner.yml) is merged once into OUT_DIR/sources and routed like any model."""
    from mergeforge.evolve.api import run_search

    recipe = write_search(tmp_path / "ta.yml", {
        "merge_method": "task_arithmetic", "base_model": str(tiny_zoo_dir / "models" / "base"),
        "models": [{"model": str(tiny_zoo_dir / "models" / name), "parameters": {"weight": 0.5}}
                   for name in ("expert_shift", "expert_reverse")]})
    config = path_search(tiny_zoo_dir, layer_path={"models": [str(recipe), str(tiny_zoo_dir / "models" / "expert_reverse")], "start": 1},
                         budget={"evaluations": 4})
    report = run_search(config, tmp_path / "out")
    assert (tmp_path / "out" / "sources" / "ta" / "config.json").is_file()
    assert report["reproduction"]["difference"] == 0.0
    assert [row["name"] for row in report["test"]][:2] == ["source: ta", "source: expert_reverse"]
    again = run_search(config | {"budget": {"evaluations": 8}}, tmp_path / "out", resume=True)  # the merged source is reused
    assert again["evaluations"] == 8


def test_separable_cma_is_the_default_for_a_long_genome(tiny_zoo_dir):
    import pickle

    from mergeforge.evolve.config import DIAGONAL_FROM, load_search_config
    from mergeforge.evolve.search import new_optimizer, uses_diagonal

    config, _ = load_search_config(path_search(tiny_zoo_dir))
    assert not uses_diagonal(config, DIAGONAL_FROM - 1) and uses_diagonal(config, DIAGONAL_FROM)
    separable = new_optimizer(config, [0.5] * DIAGONAL_FROM)
    assert separable.opts["CMA_diagonal"] is True
    forced, _ = load_search_config(path_search(tiny_zoo_dir, optimizer={"diagonal": False}))
    assert not uses_diagonal(forced, 5000)
    full = new_optimizer(forced, [0.5] * DIAGONAL_FROM)
    assert len(pickle.dumps(separable)) * 20 < len(pickle.dumps(full))  # no d x d covariance in the state


@pytest.mark.slow  # three CLI runs of a 40-candidate layer-path search: about 40 s on 2 cores
def test_a_layer_path_search_killed_with_sigkill_resumes_to_the_uninterrupted_result(tiny_zoo_dir, tmp_path):
    config = path_search(tiny_zoo_dir, budget={"evaluations": 40}, splits={"search_examples": 48, "test_examples": 12})
    assert_a_killed_run_resumes_to_the_uninterrupted_result(config, tmp_path)


# -- the process pool -----------------------------------------------------------------------------


@pytest.mark.slow  # four searches, each starting 2-3 worker processes that load torch and the sources: about 60 s
def test_a_pooled_search_is_the_same_whatever_the_workers_and_resumes_exactly(tiny_zoo_dir, tmp_path):
    """--workers: the candidates scored, their genomes and scores do not depend on the number of
    workers or on finishing order, and a run stopped mid-pipeline resumes to the whole run."""
    from mergeforge.errors import OutputError
    from mergeforge.evolve.api import run_search

    two = run_search(path_search(tiny_zoo_dir, budget={"evaluations": 14}), tmp_path / "two", workers=2)
    three = run_search(path_search(tiny_zoo_dir, budget={"evaluations": 14}), tmp_path / "three", workers=3)
    assert pooled_journal(tmp_path / "two") == pooled_journal(tmp_path / "three") and len(pooled_journal(tmp_path / "two")) == 14
    assert {e["generation"] for e in pooled_journal(tmp_path / "two")} == {0, 1, 2, 3}  # popsize 4: told generations 0-2
    assert two["best"] == three["best"] and two["reproduction"]["difference"] == 0.0
    run_search(path_search(tiny_zoo_dir, budget={"evaluations": 6}), tmp_path / "resumed", workers=2)
    resumed = run_search(path_search(tiny_zoo_dir, budget={"evaluations": 14}), tmp_path / "resumed", workers=2, resume=True)
    assert pooled_journal(tmp_path / "resumed") == pooled_journal(tmp_path / "two") and resumed["best"] == two["best"]
    with pytest.raises(OutputError, match="started with --workers or --ray-address; resume it with --workers 2 or more, or --ray-address"):
        run_search(path_search(tiny_zoo_dir, budget={"evaluations": 16}), tmp_path / "resumed", resume=True)
