"""``mergeforge moe``: mergekit-moe YAML in, a Mixtral checkpoint out that transformers loads,
with the self-tests every build runs, mergekit's gate modes and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, load_state, run_cli

from mergeforge.errors import RecipeError
from mergeforge.moe.config import load_moe_config

PROMPTS = {"a": ["a b c d", "b c d e"], "b": ["w x y", "x y z z"]}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    base = build_model("llama", root / "base", seed=0, dtype=torch.bfloat16)
    return {"base": base, "a": build_model("llama", root / "a", seed=1, base=base, noise=0.05, dtype=torch.bfloat16),
            "b": build_model("llama", root / "b", seed=2, base=base, noise=0.05, dtype=torch.bfloat16)}


def write_config(path: Path, dense: dict[str, Path], **fields) -> Path:
    config = {"base_model": str(dense["base"]), "gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 2,
              "experts": [{"source_model": str(dense[name]), "positive_prompts": PROMPTS[name]} for name in ("a", "b")]}
    config.update(fields)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_mergekit_moe_yaml_builds_a_mixtral_that_loads_and_generates(dense, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = write_config(tmp_path / "moe.yml", dense)
    out = tmp_path / "out"
    result = run_cli("moe", config, out)
    assert result.returncode == 0, result.stderr
    assert "self-tests passed" in result.stdout
    report = json.loads((out / "moe_report.json").read_text())
    assert report["self_tests"]["base_logits_error"] < 1e-4 and max(report["self_tests"]["expert_mlp_errors"]) < 1e-4
    assert (out / "mergekit_moe_config.yml").read_text() == config.read_text()

    # Every expert's MLP sits in its slot, unchanged; attention and norms are the base's.
    state, base, a, b = (load_state(folder) for folder in (out, dense["base"], dense["a"], dense["b"]))
    for layer in range(4):
        for slot, expert in enumerate((a, b)):
            for w, projection in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                assert torch.equal(state[f"model.layers.{layer}.block_sparse_moe.experts.{slot}.{w}.weight"],
                                   expert[f"model.layers.{layer}.mlp.{projection}.weight"])
        assert torch.equal(state[f"model.layers.{layer}.self_attn.q_proj.weight"], base[f"model.layers.{layer}.self_attn.q_proj.weight"])
    assert not any(".mlp." in name for name in state)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("a b c", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 4


def test_hidden_gates_are_mergekits_router_rows(dense, tmp_path):
    """Row e of layer l: the base's last-token hidden state entering layer l, averaged over the
    expert's prompts (beginning token + text), minus the negative prompts', at unit norm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    negative = ["z z z"]
    config = load_moe_config(yaml.safe_load(write_config(tmp_path / "moe.yml", dense).read_text()))
    config.experts[1].negative_prompts = negative
    from mergeforge.moe.gates import gate_vectors

    rows = gate_vectors(config, config.experts, dense["base"], layers=4, hidden=32)
    model = AutoModelForCausalLM.from_pretrained(dense["base"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(dense["base"])

    def mean_state(prompts):
        states = []
        for prompt in prompts:  # one at a time: no padding to reason about
            ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                states.append(torch.stack(model(ids, output_hidden_states=True).hidden_states[:4])[:, 0, -1])
        return torch.stack(states).mean(0)

    expected_b = mean_state(PROMPTS["b"]) - mean_state(negative)
    expected_b = expected_b / expected_b.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(rows[:, 1], expected_b, rtol=1e-4, atol=1e-5)
    assert torch.allclose(rows.norm(dim=-1), torch.ones(4, 2))


@pytest.mark.slow  # several real builds or a curve of evaluations: CI runs it with make test-slow
@pytest.mark.parametrize("mode", ["hidden_avg", "cheap_embed", "random", "uniform_random"])
def test_every_gate_mode_builds(dense, tmp_path, mode):
    out = tmp_path / "out"
    result = run_cli("moe", write_config(tmp_path / "moe.yml", dense, gate_mode=mode), out, "--no-self-test", "--quiet")
    assert result.returncode == 0, result.stderr
    router = load_state(out)["model.layers.0.block_sparse_moe.gate.weight"].float()
    assert router.shape == (2, 32) and router.abs().sum() > 0
    if mode == "cheap_embed":  # the same rows at every layer
        assert torch.equal(router, load_state(out)["model.layers.3.block_sparse_moe.gate.weight"].float())


@pytest.mark.parametrize(("fields", "message"), [
    ({"gate_mode": "smart"}, "unknown gate mode 'smart'"),
    ({"experts_per_token": 3}, "'experts_per_token': 3 is more than the 2 expert"),
    ({"expert_per_token": 1}, "unknown field 'expert_per_token'; did you mean 'experts_per_token'"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"architecture": "gemma"}, "no output architecture 'gemma'"),
    ({"architecture": "qwen3"}, "the models are 'llama' models; Qwen3-MoE takes qwen3"),
])
def test_bad_configs_fail_with_one_message(dense, tmp_path, fields, message):
    out = tmp_path / "out"
    result = run_cli("moe", write_config(tmp_path / "moe.yml", dense, **fields), out)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow  # several real builds or a curve of evaluations: CI runs it with make test-slow
def test_useless_moes_are_refused_unless_asked_for(dense, tmp_path):
    same = [{"source_model": str(dense["a"]), "positive_prompts": PROMPTS["a"]},
            {"source_model": str(dense["a"]), "positive_prompts": PROMPTS["b"]}]
    config = write_config(tmp_path / "moe.yml", dense, experts=same)
    result = run_cli("moe", config, tmp_path / "out")
    assert result.returncode != 0 and "every expert is the same model" in result.stderr
    # With the flag: an MoE of two copies, which the self-tests check like any other.
    result = run_cli("moe", config, tmp_path / "out", "--i-understand-this-is-not-useful-without-training")
    assert result.returncode == 0, result.stderr
    same_prompts = [{"source_model": str(dense[n]), "positive_prompts": PROMPTS["a"]} for n in ("a", "b")]
    with pytest.raises(RecipeError, match="every expert has the same prompts"):
        load_moe_config(yaml.safe_load(write_config(tmp_path / "p.yml", dense, experts=same_prompts).read_text()))
    no_prompts = [{"source_model": str(dense[n])} for n in ("a", "b")]
    with pytest.raises(RecipeError, match="experts.0.positive_prompts"):
        load_moe_config(yaml.safe_load(write_config(tmp_path / "n.yml", dense, experts=no_prompts).read_text()))
    load_moe_config(yaml.safe_load(write_config(tmp_path / "r.yml", dense, experts=no_prompts, gate_mode="random").read_text()))


def test_experts_must_match_the_base(dense, tmp_path):
    other = build_model("mistral", tmp_path / "mistral", seed=3)
    experts = [{"source_model": str(dense["a"]), "positive_prompts": PROMPTS["a"]},
               {"source_model": str(other), "positive_prompts": PROMPTS["b"]}]
    result = run_cli("moe", write_config(tmp_path / "moe.yml", dense, experts=experts), tmp_path / "out")
    assert result.returncode != 0 and "every expert must have the base's architecture" in result.stderr
    assert str(other) in result.stderr


def test_the_calibrated_router_is_fitted_on_the_moes_own_router_inputs(dense, tmp_path):
    """gate_mode calibrated: each layer's rows come from the ridge fit on the input the router
    really sees (the MoE block's input, with the layers below already routed), scaled by the
    fitted temperature; the build then passes the same self-tests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeforge.moe.gates import encode_prompts
    from mergeforge.moe.router import fit_temperature, ridge_rows
    from mergeforge.moe.selftest import moe_block

    out = tmp_path / "out"
    result = run_cli("moe", write_config(tmp_path / "moe.yml", dense, gate_mode="calibrated", dtype="float32"), out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "moe_report.json").read_text())
    layers = report["calibration"]["layers"]
    assert len(layers) == 4 and all(layer["token_accuracy"] > 0.5 and layer["temperature"] > 0 for layer in layers)

    # Refit layers 0 and 3 by hand from full forward passes of the written MoE: layer 3's router
    # sees the states that the routers fitted below it produce.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    written = load_state(out)
    for layer in (0, 3):
        captured = []
        block = moe_block(model.model.layers[layer])
        handle = block.register_forward_pre_hook(lambda module, args, captured=captured: captured.append(args[0]))
        inputs, labels = [], []
        for e, name in enumerate(("a", "b")):
            encoded = encode_prompts(tokenizer, PROMPTS[name])
            captured.clear()
            with torch.no_grad():
                model(**encoded)
            states = captured[0].reshape(encoded["input_ids"].shape + (-1,))[encoded["attention_mask"].bool()]
            inputs.append(states)
            labels.append(torch.full((len(states),), e))
        handle.remove()
        x, y = torch.cat(inputs), torch.cat(labels)
        rows = ridge_rows(x, y, 2)
        expected = rows * fit_temperature(x @ rows.T, y)
        torch.testing.assert_close(written[f"model.layers.{layer}.block_sparse_moe.gate.weight"], expected, rtol=1e-4, atol=1e-5)


def test_ridge_rows_and_temperature_separate_what_is_separable():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 3
    labels = torch.arange(3).repeat_interleave(50)
    x = centres[labels] + 0.3 * torch.randn(150, 16, generator=generator)
    from mergeforge.moe.router import fit_temperature, ridge_rows

    def confidence(inputs):  # the mean top routing probability after the fitted temperature
        logits = inputs @ ridge_rows(inputs, labels, 3).T
        return float(torch.softmax(logits * fit_temperature(logits, labels), -1).max(-1).values.mean()), logits

    sharp, logits = confidence(x)
    assert bool((logits.argmax(-1) == labels).all()) and sharp > 0.99
    soft, _ = confidence(x + 10 * torch.randn(150, 16, generator=generator))
    assert 1 / 3 < soft < 0.9  # less separable: a softer router, not a hard one


def test_the_self_tests_catch_a_misplaced_tensor(dense, tmp_path):
    """An expert's gate and up projections swapped, or a norm that is not the base's, fail the
    checks that every build runs."""
    import shutil

    from mergeforge.errors import CheckpointError
    from mergeforge.moe.architectures import MIXTRAL
    from mergeforge.moe.build import _overwrite_tensors
    from mergeforge.moe.config import MoEExpert
    from mergeforge.moe.selftest import run_self_tests

    out = tmp_path / "out"
    assert run_cli("moe", write_config(tmp_path / "moe.yml", dense), out, "--no-self-test").returncode == 0
    experts = [MoEExpert(source_model=str(dense[n])) for n in ("a", "b")]
    run_self_tests(out, dense["base"], [dense["a"], dense["b"]], experts, MIXTRAL)  # as built: passes
    state = load_state(out)
    swapped, renormed = tmp_path / "swapped", tmp_path / "renormed"
    shutil.copytree(out, swapped)
    prefix = "model.layers.2.block_sparse_moe.experts.1"
    _overwrite_tensors(swapped, {f"{prefix}.w1.weight": state[f"{prefix}.w3.weight"], f"{prefix}.w3.weight": state[f"{prefix}.w1.weight"]})
    with pytest.raises(CheckpointError, match=r"expert 1 .* differs from its MLP"):
        run_self_tests(swapped, dense["base"], [dense["a"], dense["b"]], experts, MIXTRAL)
    shutil.copytree(out, renormed)
    _overwrite_tensors(renormed, {"model.layers.1.input_layernorm.weight": state["model.layers.1.input_layernorm.weight"] * 1.5})
    with pytest.raises(CheckpointError, match="differ from the base's"):
        run_self_tests(renormed, dense["base"], [dense["a"], dense["b"]], experts, MIXTRAL)


def test_qwen3_experts_make_a_qwen3_moe(tmp_path):
    """mergekit's qwen3 output: experts under mlp.experts.N, the router at mlp.gate, renormalised top-k."""
    import transformers as tf
    from conftest import VOCAB, save_tokenizer
    from transformers import AutoModelForCausalLM

    config = tf.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    folders = {}
    for seed, name in enumerate(("base", "a", "b")):
        torch.manual_seed(seed)
        tf.Qwen3ForCausalLM(config).save_pretrained(tmp_path / name)
        save_tokenizer(tmp_path / name)
        folders[name] = tmp_path / name
    out = tmp_path / "out"
    result = run_cli("moe", write_config(tmp_path / "moe.yml", folders, dtype="float32"), out)
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == 2
    state = load_state(out)
    assert torch.equal(state["model.layers.1.mlp.experts.1.down_proj.weight"], load_state(folders["b"])["model.layers.1.mlp.down_proj.weight"])
    assert "model.layers.0.mlp.gate.weight" in state


def test_a_shared_expert_makes_a_qwen2_moe(dense, tmp_path):
    """mergekit's qwen output: one shared expert behind a sigmoid gate from its prompts, q/k/v
    biases as zeros for a Llama base; the self-tests check the shared expert too."""
    from transformers import AutoModelForCausalLM

    shared = [{"source_model": str(dense["base"]), "positive_prompts": ["a b", "y z"]}]
    out = tmp_path / "out"
    result = run_cli("moe", write_config(tmp_path / "moe.yml", dense, shared_experts=shared), out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "moe_report.json").read_text())
    assert report["architecture"] == "Qwen2-MoE" and report["self_tests"]["shared_mlp_error"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    state, base = load_state(out), load_state(dense["base"])
    assert torch.equal(state["model.layers.3.mlp.shared_expert.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])
    assert state["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert not state["model.layers.0.self_attn.k_proj.bias"].any()

    two = run_cli("moe", write_config(tmp_path / "two.yml", dense, shared_experts=shared * 2), tmp_path / "two")
    assert two.returncode != 0 and "needs exactly one shared expert" in two.stderr
    mixtral = run_cli("moe", write_config(tmp_path / "m.yml", dense, shared_experts=shared, architecture="mixtral"), tmp_path / "m")
    assert mixtral.returncode != 0 and "Mixtral has no shared expert" in mixtral.stderr
    silent = run_cli("moe", write_config(tmp_path / "s.yml", dense, shared_experts=[{"source_model": str(dense["base"])}]),
                     tmp_path / "s")
    assert silent.returncode != 0 and "shared_experts.0.positive_prompts" in silent.stderr


def test_the_routing_report_says_where_each_domain_goes(dense, tmp_path):
    """Every build with prompts writes routing_report.json and a self-contained HTML: per layer,
    utilisation (summing to 1), entropy in [0, 1], dead experts; and the domain × expert confusion
    on the calibration and the held-out prompts, whose diagonal is the routing accuracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeforge.moe.report import routing_statistics

    experts = [{"source_model": str(dense[n]), "positive_prompts": PROMPTS[n], "held_out_prompts": [PROMPTS[n][0] + " " + n]}
               for n in ("a", "b")]
    out = tmp_path / "out"
    result = run_cli("moe", write_config(tmp_path / "moe.yml", dense, gate_mode="calibrated", dtype="float32", experts=experts), out)
    assert result.returncode == 0, result.stderr
    assert "routing accuracy on the held-out prompts" in result.stdout
    report = json.loads((out / "routing_report.json").read_text())
    assert set(report["sets"]) == {"calibration", "held-out"}
    calibration = report["sets"]["calibration"]
    for layer in calibration["layers"]:
        assert sum(layer["utilisation"]) == pytest.approx(1.0) and 0 <= layer["entropy"] <= 1
        assert layer["dead_experts"] == []  # top-2 of 2 experts: every expert is chosen
    assert all(sum(row) == pytest.approx(1.0) for row in calibration["confusion"])
    assert calibration["routing_accuracy"] == pytest.approx(sum(calibration["confusion"][e][e] for e in range(2)) / 2)
    assert calibration["routing_accuracy"] > 0.5  # the calibrated router separates the prompts it was fitted on
    page = (out / "routing_report.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    assert json.loads((out / "moe_report.json").read_text())["routing_accuracy"]["held-out"] == report["sets"]["held-out"]["routing_accuracy"]

    # The accuracy counted by hand at layer 0: top-1 of the router logits on the block's input.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model.model.layers = model.model.layers[:1]
    single = routing_statistics(model, tokenizer, [PROMPTS["a"], PROMPTS["b"]], 2)
    assert single["layers"][0]["routing_accuracy"] == pytest.approx(calibration["layers"][0]["routing_accuracy"])


def test_shared_method_merges_the_tensors_outside_the_mlps(dense, tmp_path):
    """shared_method: attention, norms and embeddings are the experts' merge by that method (the
    engine's in-memory merge), not the base's; the MLP experts are unchanged, and the build's
    self-tests pass with the merged tensors as the base check's reference."""
    from mergeforge.engine.api import merge_state_dicts

    out = tmp_path / "out"
    config = write_config(tmp_path / "moe.yml", dense, dtype="float32", shared_method="ties",
                          shared_parameters={"density": 0.5, "weight": 1.0})
    result = run_cli("moe", config, out)
    assert result.returncode == 0, result.stderr
    state, base, a, b = (load_state(folder) for folder in (out, dense["base"], dense["a"], dense["b"]))
    shared = [name for name in base if ".mlp." not in name]
    expected = merge_state_dicts("ties", [{n: a[n] for n in shared}, {n: b[n] for n in shared}], base={n: base[n] for n in shared},
                                 parameters={"density": 0.5, "weight": 1.0})
    for name in shared:
        torch.testing.assert_close(state[name], expected[name].float())
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"].float())
    assert torch.equal(state["model.layers.1.block_sparse_moe.experts.1.w2.weight"], b["model.layers.1.mlp.down_proj.weight"].float())


@pytest.mark.parametrize(("fields", "message"), [
    ({"shared_method": "tise"}, r"field 'shared_method': unknown method 'tise'. Did you mean 'ties'"),
    ({"shared_parameters": {"density": 0.5}}, "'shared_parameters' is set without 'shared_method'"),
    ({"shared_method": "ties", "shared_parameters": {"densty": 0.5}}, "shared_method 'ties', tensor '"),
])
def test_bad_shared_methods_are_refused_with_the_field(dense, tmp_path, fields, message):
    out = tmp_path / "out"
    result = run_cli("moe", write_config(tmp_path / "moe.yml", dense, **fields), out, "--quiet")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1, result.stderr
    assert __import__("re").search(message, result.stderr), result.stderr
    assert not out.exists()


@pytest.mark.slow  # several real builds or a curve of evaluations: CI runs it with make test-slow
@pytest.mark.parametrize("shared", [False, True], ids=["mixtral", "qwen2_moe"])
def test_fused_experts_are_transformers_5s_own_tensors(dense, tmp_path, shared):
    """--fused-experts: mlp.experts.gate_up_proj [E, 2I, H] (gate rows first) and down_proj
    [E, H, I] and the router at mlp.gate; transformers loads it with no conversion and computes
    the same logits as the per-expert layout; the self-tests pass, noise_scale included."""
    from transformers import AutoModelForCausalLM

    fields = {"dtype": "float32", "shared_experts": [{"source_model": str(dense["base"]), "positive_prompts": ["a b"]}]} if shared \
        else {"dtype": "float32"}
    config = write_config(tmp_path / "moe.yml", dense, **fields)
    per_expert, fused = tmp_path / "per_expert", tmp_path / "fused"
    assert run_cli("moe", config, per_expert).returncode == 0
    result = run_cli("moe", config, fused, "--fused-experts")
    assert result.returncode == 0, result.stderr
    state, a, b = load_state(fused), load_state(dense["a"]), load_state(dense["b"])
    gate_up = state["model.layers.2.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (2, 128, 32) and state["model.layers.2.mlp.experts.down_proj"].shape == (2, 32, 64)
    assert torch.equal(gate_up[1, :64], b["model.layers.2.mlp.gate_proj.weight"].float())
    assert torch.equal(gate_up[0, 64:], a["model.layers.2.mlp.up_proj.weight"].float())
    assert torch.equal(state["model.layers.2.mlp.experts.down_proj"][1], b["model.layers.2.mlp.down_proj.weight"].float())
    assert "model.layers.2.mlp.gate.weight" in state and not any(".experts.0." in name for name in state)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits for folder in (per_expert, fused)]
    torch.testing.assert_close(logits[1], logits[0])

    noisy = write_config(tmp_path / "noisy.yml", dense, dtype="float32",
                         experts=[{"source_model": str(dense[n]), "positive_prompts": PROMPTS[n], "noise_scale": 0.01} for n in ("a", "b")])
    assert run_cli("moe", noisy, tmp_path / "noisy", "--fused-experts").returncode == 0
