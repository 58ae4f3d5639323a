"""End-to-end merges through the real CLI on tiny transformers models, checked against direct
computations on the state dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, run_cli
from methods_support import dare_reference

import mergeforge
from mergeforge.engine.rules import job_seed


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def logits(folder: Path, ids: list[int] | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids or [5, 17, 33, 2, 9]])).logits


def test_ties_three_models_cli_loads_and_matches_direct_computation(llama_family, tmp_path):
    base, fts = llama_family["base"], [llama_family[f"ft{i}"] for i in (1, 2, 3)]
    weights, density = [1.0, 0.7, 0.4], 0.5
    recipe = write_recipe(tmp_path / "ties.yml", {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(base)}] + [
            {"model": str(ft), "parameters": {"weight": w, "density": density}} for ft, w in zip(fts, weights)
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    })
    out = tmp_path / "merged"
    result = run_cli("merge", recipe, out, "--quiet")
    assert result.returncode == 0, result.stderr

    merged = load_state(out)
    base_state = load_state(base)
    ft_states = [load_state(ft) for ft in fts]
    for name, base_tensor in base_state.items():
        # TIES from the paper: trim each task vector to its top-k magnitudes, elect the sign of the
        # weighted sum, average the weighted entries that agree with it.
        trimmed = []
        for state, weight in zip(ft_states, weights):
            delta = (state[name] - base_tensor).flatten()
            k = int(density * delta.numel())
            keep = torch.zeros_like(delta)
            keep[delta.abs().argsort(descending=True)[:k]] = 1
            trimmed.append(delta * keep * weight)
        stacked = torch.stack(trimmed)
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(stacked) == sign).float()
        divisor = (agree * torch.tensor(weights)[:, None]).sum(0)
        divisor[divisor == 0] = 1
        expected = base_tensor.flatten() + (stacked * agree).sum(0) / divisor
        torch.testing.assert_close(merged[name].flatten(), expected, rtol=1e-5, atol=1e-6, msg=name)

    assert logits(out).shape == (1, 5, 96)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card and "- mergeforge" in card and "merge_method: ties" in card
    assert yaml.safe_load((out / "mergeforge_config.yml").read_text())["merge_method"] == "ties"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    header_metadata = json.loads((out / "model.safetensors").read_bytes()[8:][: int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")])["__metadata__"]
    assert header_metadata == {"format": "pt"}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_linear", "dare_ties", "slerp"])
def test_methods_against_direct_computation(method, llama_family, tmp_path):
    base, ft1, ft2 = llama_family["base"], llama_family["ft1"], llama_family["ft2"]
    b, a1, a2 = load_state(base), load_state(ft1), load_state(ft2)
    if method == "slerp":
        recipe = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.3},
                  "models": [{"model": str(base)}, {"model": str(ft1)}]}
    elif method == "linear":
        recipe = {"merge_method": "linear", "models": [{"model": str(ft1), "parameters": {"weight": 3}},
                                                       {"model": str(ft2), "parameters": {"weight": 1}}]}
    else:
        recipe = {"merge_method": method, "base_model": str(base), "parameters": {"lambda": 0.8},
                  "models": [{"model": str(ft1), "parameters": {"weight": 0.6, "density": 1.0 if method == "task_arithmetic" else 0.6}},
                             {"model": str(ft2), "parameters": {"weight": 0.4, "density": 1.0 if method == "task_arithmetic" else 0.6}}]}
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path / "r.yml", recipe), out, "--quiet", "--seed", "7")
    assert result.returncode == 0, result.stderr
    merged = load_state(out)
    for name in b:
        if method == "linear":
            expected = (3 * a1[name] + a2[name]) / 4
        elif method == "task_arithmetic":
            expected = b[name] + 0.8 * (0.6 * (a1[name] - b[name]) + 0.4 * (a2[name] - b[name]))
        elif method == "slerp":
            v0, v1 = b[name].flatten().double(), a1[name].flatten().double()
            cos = torch.dot(v0 / v0.norm(), v1 / v1.norm()).clamp(-1, 1)
            if cos.abs() > 0.9995:
                expected = 0.7 * b[name] + 0.3 * a1[name]
            else:
                omega = torch.arccos(cos)
                expected = (torch.sin(0.7 * omega) / torch.sin(omega) * v0 + torch.sin(0.3 * omega) / torch.sin(omega) * v1).reshape(b[name].shape).float()
        else:
            # DARE: each task vector keeps the entries its seeded draws keep, rescaled to its L1 norm.
            expected = dare_reference(b[name], [a1[name], a2[name]], [0.6, 0.4], 0.6, job_seed(7, name),
                                      consensus=method == "dare_ties", lambda_=0.8).float()
        torch.testing.assert_close(merged[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    if method.startswith("dare"):
        again = tmp_path / "again"
        assert run_cli("merge", tmp_path / "r.yml", again, "--quiet", "--seed", "7").returncode == 0
        assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
        other = tmp_path / "other"
        assert run_cli("merge", tmp_path / "r.yml", other, "--quiet", "--seed", "8").returncode == 0
        assert (other / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()


def test_linear_merge_of_model_with_itself_reproduces_logits(llama_family, tmp_path):
    ft1 = llama_family["ft1"]
    out = tmp_path / "self"
    mergeforge.merge({"merge_method": "linear", "models": [{"model": str(ft1), "parameters": {"weight": 0.3}},
                                                            {"model": str(ft1), "parameters": {"weight": 0.7}}]}, out, quiet=True)
    torch.testing.assert_close(logits(out), logits(ft1), rtol=1e-5, atol=1e-5)


def test_sharded_inputs_and_outputs(model_factory, tmp_path):
    base = model_factory("mistral", "mistral-base-sharded", seed=0, shard_size="40KB")
    ft = model_factory("mistral", "mistral-ft-sharded", seed=1, base=base, shard_size="40KB")
    assert (base / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path / "r.yml", {
        "merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1}}, {"model": str(ft), "parameters": {"weight": 1}}]
    }), out, "--out-shard-size", "30kB", "--quiet")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_state(out).values())
    b, f, m = load_state(base), load_state(ft), load_state(out)
    for name in b:
        torch.testing.assert_close(m[name], (b[name] + f[name]) / 2)
    assert logits(out).shape[-1] == 96


def test_gradients_and_filters(llama_family, tmp_path):
    base, ft1 = llama_family["base"], llama_family["ft1"]
    b, a = load_state(base), load_state(ft1)
    recipe = {
        "merge_method": "slerp", "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(ft1)}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.5}]},
    }
    out = tmp_path / "out"
    mergeforge.merge(recipe, out, quiet=True)
    m = load_state(out)
    # 4 layers: t = layer / 3 for attention, 1 - layer / 3 for the MLP.
    torch.testing.assert_close(m["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(m["model.layers.3.self_attn.q_proj.weight"], a["model.layers.3.self_attn.q_proj.weight"])
    torch.testing.assert_close(m["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(m["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])
    mid = m["model.layers.1.self_attn.q_proj.weight"]
    assert not torch.allclose(mid, b["model.layers.1.self_attn.q_proj.weight"])
    assert not torch.allclose(mid, a["model.layers.1.self_attn.q_proj.weight"])


def test_precedence_source_over_slice_over_top(llama_family, tmp_path):
    base, ft1 = llama_family["base"], llama_family["ft1"]
    b, a = load_state(base), load_state(ft1)
    recipe = {
        "merge_method": "task_arithmetic", "base_model": str(base),
        "parameters": {"weight": 0.1},
        "slices": [{"parameters": {"weight": 0.2}, "sources": [
            {"model": str(base), "layer_range": [0, 2]},
            {"model": str(ft1), "layer_range": [0, 2], "parameters": {"weight": 0.3}}]},
            {"parameters": {"weight": 0.2}, "sources": [
                {"model": str(base), "layer_range": [2, 4]}, {"model": str(ft1), "layer_range": [2, 4]}]}],
    }
    out = tmp_path / "out"
    mergeforge.merge(recipe, out, quiet=True)
    m = load_state(out)
    name0, name3 = "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(m[name0], b[name0] + 0.3 * (a[name0] - b[name0]))
    torch.testing.assert_close(m[name3], b[name3] + 0.2 * (a[name3] - b[name3]))


def test_passthrough_stacks_and_renumbers_layers(llama_family, tmp_path):
    base, ft1 = llama_family["base"], llama_family["ft1"]
    b, a = load_state(base), load_state(ft1)
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(base), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(ft1), "layer_range": [1, 4]}]},
    ]}
    out = tmp_path / "deep"
    result = run_cli("merge", write_recipe(tmp_path / "p.yml", recipe), out, "--quiet")
    assert result.returncode == 0, result.stderr
    m = load_state(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    for out_layer, (state, src_layer) in enumerate([(b, 0), (b, 1), (b, 2), (a, 1), (a, 2), (a, 3)]):
        key = "self_attn.o_proj.weight"
        assert torch.equal(m[f"model.layers.{out_layer}.{key}"], state[f"model.layers.{src_layer}.{key}"])
    assert torch.equal(m["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(m["lm_head.weight"], a["lm_head.weight"])
    assert logits(out).shape == (1, 5, 96)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_tied_embeddings_stay_tied(kind, model_factory, tmp_path):
    base = model_factory(kind, f"{kind}-base")
    ft = model_factory(kind, f"{kind}-ft", seed=1, base=base)
    out = tmp_path / "out"
    mergeforge.merge({"merge_method": "task_arithmetic", "base_model": str(base),
                      "models": [{"model": str(ft), "parameters": {"weight": 0.5}}]}, out, quiet=True)
    assert "lm_head.weight" not in load_state(out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_encoder_and_buffers(model_factory, tmp_path):
    base = model_factory("bert", "bert-base")
    ft = model_factory("bert", "bert-ft", seed=1, base=base)
    out = tmp_path / "out"
    mergeforge.merge({"merge_method": "ties", "base_model": str(base),
                      "models": [{"model": str(ft), "parameters": {"weight": 1, "density": 0.3}}]}, out, quiet=True)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out)
    assert model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape == (1, 3, 32)


def test_integer_buffers_are_copied_from_base_and_missing_tensors_count_as_base(llama_family, tmp_path):
    from safetensors.torch import save_file

    base_state = load_state(llama_family["base"])
    ft_state = load_state(llama_family["ft1"])
    base_dir, ft_dir = tmp_path / "base", tmp_path / "ft"
    base_dir.mkdir()
    ft_dir.mkdir()
    base_state["model.position_ids"] = torch.arange(16)
    ft_state["model.position_ids"] = torch.arange(16) * 3  # must not be averaged
    dropped = ft_state.pop("model.norm.weight")
    save_file(base_state, base_dir / "model.safetensors")
    save_file(ft_state, ft_dir / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "task_arithmetic", "base_model": str(base_dir),
                                               "models": [{"model": str(ft_dir), "parameters": {"weight": 1.0}}]})
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "lacks 1 tensor(s)" in result.stderr and "model.norm.weight" in result.stderr
    m = load_state(tmp_path / "out")
    assert torch.equal(m["model.position_ids"], torch.arange(16))
    assert torch.equal(m["model.norm.weight"], base_state["model.norm.weight"])
    assert not torch.equal(dropped, base_state["model.norm.weight"])


def test_dry_run_prints_plan_and_writes_nothing(llama_family, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "ties", "base_model": str(llama_family["base"]),
                                               "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 1, "density": 0.5}}]})
    out = tmp_path / "out"
    result = run_cli("merge", recipe, out, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "model.layers.3.mlp.down_proj.weight" in result.stdout
    assert "estimated peak memory" in result.stdout and "read:" in result.stdout and "write:" in result.stdout
    assert not out.exists()


def test_dtype_options(llama_family, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(llama_family["ft1"]), "parameters": {"weight": 1}}, {"model": str(llama_family["ft2"]), "parameters": {"weight": 1}}]})
    assert run_cli("merge", recipe, out, "--out-dtype", "bfloat16", "--quiet").returncode == 0
    state = load_state(out)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_chat_template_and_tokenizer_source(llama_family, model_factory, tmp_path):
    out = tmp_path / "out"
    mergeforge.merge({"merge_method": "linear", "chat_template": "chatml", "tokenizer_source": str(llama_family["ft2"]),
                      "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 1}}]}, out, quiet=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in text
