"""Data-aware methods end to end: YAML recipes with a ``calibration:`` field through the real CLI,
the in-memory API, and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, run_cli, tiny_config

from mergeforge.calibration.data import CalibrationError
from mergeforge.engine import api
from mergeforge.errors import RecipeError

WORDS = ["abc", "merge", "forge", "tiny", "model", "data", "hello", "zoo"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # Tiny models: extra intra-op threads only add synchronisation (also for CLI subprocesses).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture
def calibration_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "shared": write_jsonl(tmp_path / "calib.jsonl", [{"prompt": f"rev:{w}=", "answer": w[::-1]} for w in WORDS]),
        "ft1": write_jsonl(tmp_path / "ft1.jsonl", [{"prompt": f"rev:{w}=", "answer": w[::-1]} for w in WORDS[:4]]),
        "ft2": write_jsonl(tmp_path / "ft2.jsonl", [{"text": f"sorted {''.join(sorted(w))}"} for w in WORDS[4:]]),
    }


def recipe_for(method: str, family: dict[str, Path], files: dict[str, Path]) -> dict:
    models = [family["ft1"], family["ft2"]]
    recipe: dict = {"merge_method": method, "models": [{"model": str(m)} for m in models], "dtype": "float32"}
    if method == "adamerging":
        recipe["base_model"] = str(family["base"])
        recipe["parameters"] = {"steps": 8, "lr": 0.02}
        recipe["calibration"] = {"data": str(files["shared"]), "batch_size": 4}
    else:  # each model's own data
        recipe["calibration"] = {"data": {str(models[0]): str(files["ft1"]), str(models[1]): str(files["ft2"])}, "batch_size": 2}
    return recipe


def mean_of(states: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    return torch.stack([state[name] for state in states]).mean(0)


# One method through the real CLI (a subprocess costs seconds of imports); the others through the
# API with the same YAML file, which is the path the CLI calls.
@pytest.mark.parametrize(("method", "via_cli"), [("fisher_merging", False), ("regmean", True), ("adamerging", False)])
def test_yaml_merge_with_a_calibration_jsonl_gives_a_folder_transformers_loads(
    method: str, via_cli: bool, llama_family: dict[str, Path], calibration_files: dict[str, Path], tmp_path: Path
):
    from transformers import AutoModelForCausalLM

    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe_for(method, llama_family, calibration_files)), encoding="utf-8")
    out = tmp_path / "merged"
    if via_cli:
        result = run_cli("merge", recipe_path, out, "--quiet")
        assert result.returncode == 0, result.stderr
    else:
        api.merge(recipe_path, out, quiet=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "calibration" in yaml.safe_load((out / "mergeforge_config.yml").read_text(encoding="utf-8"))

    merged = load_state(out)
    inputs = [load_state(llama_family["ft1"]), load_state(llama_family["ft2"])]
    linear, norm = "model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight"
    if method == "regmean":
        assert not torch.allclose(merged[linear], mean_of(inputs, linear), atol=1e-4)
        torch.testing.assert_close(merged[norm], mean_of(inputs, norm))  # not a linear layer: averaged
    elif method == "fisher_merging":
        for name in (linear, norm):
            assert not torch.allclose(merged[name], mean_of(inputs, name), atol=1e-5)
            low = torch.minimum(inputs[0][name], inputs[1][name])
            high = torch.maximum(inputs[0][name], inputs[1][name])
            assert bool(((merged[name] >= low - 1e-6) & (merged[name] <= high + 1e-6)).all())  # a convex combination
    else:
        base = load_state(llama_family["base"])
        task_vectors = torch.stack([(state[linear] - base[linear]).flatten() for state in inputs], dim=1)
        solution = torch.linalg.lstsq(task_vectors, (merged[linear] - base[linear]).flatten().unsqueeze(1)).solution
        lambdas = solution.flatten()
        residual = task_vectors @ solution - (merged[linear] - base[linear]).flatten().unsqueeze(1)
        assert float(residual.abs().max()) < 1e-5  # θ₀ + Σ λₖ τₖ exactly
        assert bool(((lambdas >= -1e-4) & (lambdas <= 1 + 1e-4)).all())
        assert not torch.allclose(lambdas, torch.full_like(lambdas, 0.3), atol=1e-3)  # learned, not the start


@pytest.mark.parametrize("method", ["fisher_merging", "regmean", "adamerging"])
def test_merge_state_dicts_gives_the_same_tensors_as_the_disk_merge(
    method: str, llama_family: dict[str, Path], calibration_files: dict[str, Path], tmp_path: Path
):
    from transformers import AutoModelForCausalLM

    recipe = recipe_for(method, llama_family, calibration_files)
    api.merge(recipe, tmp_path / "disk", quiet=True)
    on_disk = load_state(tmp_path / "disk")
    states = [load_state(llama_family["ft1"]), load_state(llama_family["ft2"])]
    data = recipe["calibration"]["data"]
    template = AutoModelForCausalLM.from_config(tiny_config("llama"))
    in_memory = api.merge_state_dicts(
        method,
        states,
        base=load_state(llama_family["base"]) if method == "adamerging" else None,
        parameters=recipe.get("parameters"),
        calibration={**recipe["calibration"], "data": list(data.values()) if isinstance(data, dict) else data},
        calibration_model=template,
        tokenizer=llama_family["base"],
    )
    assert set(in_memory) == set(on_disk)
    for name, tensor in on_disk.items():
        torch.testing.assert_close(in_memory[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_calibration_cache_serves_every_regmean_alpha_and_is_refused_where_statistics_depend_on_parameters(
    llama_family: dict[str, Path], calibration_files: dict[str, Path]
):
    from transformers import AutoModelForCausalLM

    states = [load_state(llama_family["ft1"]), load_state(llama_family["ft2"])]
    data = recipe_for("regmean", llama_family, calibration_files)["calibration"]["data"]
    common = {"calibration": {"data": list(data.values())}, "calibration_model": AutoModelForCausalLM.from_config(tiny_config("llama")),
              "tokenizer": llama_family["base"]}
    cache: dict = {}
    first = api.merge_state_dicts("regmean", states, parameters={"alpha": 0.9}, calibration_cache=cache, **common)
    assert "model.layers.1.mlp.down_proj.weight" in cache
    reused = api.merge_state_dicts("regmean", states, parameters={"alpha": 0.5}, calibration_cache=cache, **common)
    fresh = api.merge_state_dicts("regmean", states, parameters={"alpha": 0.5}, **common)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(reused[name], fresh[name], rtol=0, atol=0)
    assert not torch.equal(reused[name], first[name])
    with pytest.raises(RecipeError, match="'adamerging''s calibration depends on its parameters; it takes no calibration_cache"):
        api.merge_state_dicts("adamerging", states, base=load_state(llama_family["base"]), calibration_cache={}, **common)


def test_data_aware_method_without_calibration_is_a_one_line_recipe_error(llama_family: dict[str, Path], tmp_path: Path):
    recipe = {"merge_method": "regmean", "models": [{"model": str(llama_family["ft1"])}, {"model": str(llama_family["ft2"])}]}
    with pytest.raises(RecipeError, match="calibration: merge_method 'regmean' is data-aware and needs calibration data"):
        api.merge(recipe, tmp_path / "out", quiet=True)
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_cli("merge", recipe_path, tmp_path / "out")
    assert result.returncode == 2
    assert "'calibration:'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_and_malformed_calibration_files_name_the_file_and_line(
    llama_family: dict[str, Path], calibration_files: dict[str, Path], tmp_path: Path
):
    recipe = recipe_for("fisher_merging", llama_family, calibration_files)
    recipe["calibration"]["data"] = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(CalibrationError, match="nowhere.jsonl' not found"):
        api.merge(recipe, tmp_path / "out", quiet=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "unterminated\n', encoding="utf-8")
    recipe["calibration"]["data"] = str(bad)
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_cli("merge", recipe_path, tmp_path / "out")
    assert result.returncode == 2
    assert f"{bad}:2: not valid JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_calibration_schema_errors(llama_family: dict[str, Path], calibration_files: dict[str, Path], tmp_path: Path):
    recipe = recipe_for("regmean", llama_family, calibration_files)
    recipe["calibration"]["sample"] = 4
    with pytest.raises(RecipeError, match="unknown field 'calibration.sample'; did you mean 'samples'"):
        api.plan_merge(recipe)
    recipe = recipe_for("regmean", llama_family, calibration_files)
    recipe["calibration"]["data"] = {str(llama_family["ft1"]): str(calibration_files["ft1"])}
    with pytest.raises(RecipeError, match="no data for input model"):
        api.merge(recipe, tmp_path / "out", quiet=True)
    recipe = recipe_for("regmean", llama_family, calibration_files)
    del recipe["models"]
    recipe["slices"] = [{"sources": [{"model": str(llama_family[m]), "layer_range": [0, 4]} for m in ("ft1", "ft2")]}]
    with pytest.raises(RecipeError, match="use 'models' instead of 'slices'"):
        api.plan_merge(recipe)


def test_calibration_for_a_method_that_does_not_use_it_is_an_error(llama_family: dict[str, Path], calibration_files: dict[str, Path]):
    recipe = recipe_for("regmean", llama_family, calibration_files)
    recipe["merge_method"] = "linear"
    recipe["parameters"] = {"weight": 1.0}
    with pytest.raises(RecipeError, match=r"calibration: merge_method 'linear' does not use calibration data; remove the "
                                          r"'calibration' field \(the data-aware methods are adamerging, fisher_merging, regmean\)"):
        api.plan_merge(recipe)


def test_dry_run_reports_the_calibration_and_its_whole_model_memory(
    llama_family: dict[str, Path], calibration_files: dict[str, Path], tmp_path: Path
):
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe_for("adamerging", llama_family, calibration_files)), encoding="utf-8")
    result = run_cli("merge", recipe_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "calibration: 'adamerging' runs 3 whole model(s)" in result.stdout
    assert "not streamed" in result.stdout


def test_a_registered_calibrate_hook_feeds_each_tensor_its_statistics_through_the_engine(
    llama_family: dict[str, Path], calibration_files: dict[str, Path], tmp_path: Path, scratch_methods
):
    from mergeforge.methods import registry

    seen: dict[str, object] = {}

    def count_tokens(context) -> dict[str, list[float]]:
        # One number per model: how many calibration tokens it saw; only for q_proj weights.
        seen["refs"] = list(context.input_refs)
        tokens = [float(sum(len(e.input_ids) for e in context.encoded(ref))) for ref in context.input_refs]
        return {name: tokens for name in context.tensor_names if name.endswith("q_proj.weight")}

    @registry.register_method("token_weighted_for_test", math="Σ nᵢθᵢ / Σ nᵢ", citation="test", calibrate=count_tokens)
    def token_weighted(tensors, base, *, statistics=None):
        weights = statistics or [1.0] * len(tensors)
        return sum(w * t for w, t in zip(weights, tensors, strict=True)) / sum(weights)

    recipe = recipe_for("regmean", llama_family, calibration_files)
    recipe["merge_method"] = "token_weighted_for_test"
    api.merge(recipe, tmp_path / "out", quiet=True)
    merged = load_state(tmp_path / "out")
    inputs = [load_state(llama_family["ft1"]), load_state(llama_family["ft2"])]
    assert seen["refs"] == [str(llama_family["ft1"]), str(llama_family["ft2"])]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_family["ft1"])
    eos = 1 if tokenizer.eos_token_id is not None else 0
    counts = [
        sum(len(tokenizer(f"rev:{w}=")["input_ids"]) + len(w) + eos for w in WORDS[:4]),  # prompt + answer + end
        sum(len(tokenizer(f"sorted {''.join(sorted(w))}")["input_ids"]) for w in WORDS[4:]),
    ]
    q_proj, k_proj = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    expected = (counts[0] * inputs[0][q_proj] + counts[1] * inputs[1][q_proj]) / sum(counts)
    torch.testing.assert_close(merged[q_proj], expected)
    torch.testing.assert_close(merged[k_proj], mean_of(inputs, k_proj))  # no statistics: the function's fallback


@pytest.mark.parametrize("method", ["fisher_merging", "regmean"])
def test_gpt2_merges_and_examples_longer_than_its_position_table_are_cut_to_fit(method: str, model_factory, tmp_path: Path):
    # GPT-2 has 64 learned positions in the tiny config; a 150-character text would index past them.
    base = model_factory("gpt2", "gpt2-base", seed=0)
    fine_tunes = [model_factory("gpt2", f"gpt2-ft{i}", seed=i, base=base) for i in (1, 2)]
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": "abcdefghij" * 15}, {"text": "short"}])
    recipe = {"merge_method": method, "models": [{"model": str(m)} for m in fine_tunes],
              "calibration": {"data": str(data), "max_length": 128}}
    api.merge(recipe, tmp_path / "out", quiet=True)
    merged = load_state(tmp_path / "out")
    assert all(torch.isfinite(tensor).all() for tensor in merged.values())
    if method == "regmean":  # Conv1D weights are regressed, not averaged
        inputs = [load_state(m) for m in fine_tunes]
        name = "transformer.h.0.attn.c_attn.weight"
        assert not torch.allclose(merged[name], mean_of(inputs, name), atol=1e-4)
