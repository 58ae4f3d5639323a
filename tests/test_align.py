"""``mergeforge align``: the symmetry group is function-preserving (on a GQA Llama and its
relatives), weight matching recovers a known permutation exactly, the CLI writes a loadable,
function-identical folder with its report, and bad input fails in one line with no output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model, load_state, run_cli, tiny_config

from mergeforge.analysis.align import align, check_pair, relative_error
from mergeforge.analysis.matching import layout_of, match_weights
from mergeforge.analysis.symmetry import decoder_shape, permute_state, random_permutation
from mergeforge.checkpoint.reader import Checkpoint
from mergeforge.errors import CheckpointError, MergeforgeError


def _random_model(kind: str):
    """A random tiny model whose norms and biases are not all equal, so that a wrong
    permutation of them shows in the logits."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "bias" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def _logits(model, state):
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(torch.arange(2, 26).reshape(2, 12)).logits


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("residual,signs", [(False, False), (True, True)])
def test_a_random_legal_permutation_keeps_the_logits_and_weight_matching_undoes_it(kind, residual, signs):
    model = _random_model(kind)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    shape = decoder_shape(model.config.to_dict(), kind)
    assert (shape.heads, shape.kv_heads) == (4, 2)  # grouped-query attention
    permutation = random_permutation(shape, seed=3, residual=residual, signs=signs)
    permuted = permute_state(state, permutation, shape)
    assert any(not torch.equal(permuted[name], state[name]) for name in state)
    reference = _logits(model, state)
    assert relative_error(_logits(model, permuted), reference) < 1e-5

    found = match_weights(state.__getitem__, permuted.__getitem__,
                          layout_of(state, shape), shape, residual=residual, signs=signs).permutation
    realigned = permute_state(permuted, found, shape)
    assert all(torch.equal(realigned[name], state[name]) for name in state)


def test_permuting_query_key_dimensions_breaks_rope_so_they_stay_put():
    """The one permutation align refuses: swapping RoPE frequency pairs within a head (in q and k
    alike) changes the attention scores."""
    model = _random_model("llama")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    head_dim = 8
    pairs = np.r_[1, 0, 2:head_dim // 2]  # swap frequency pairs 0 and 1
    within = np.r_[pairs, pairs + head_dim // 2]
    broken = dict(state)
    for key, heads in (("q_proj", 4), ("k_proj", 2)):
        name = f"model.layers.0.self_attn.{key}.weight"
        rows = (np.arange(heads)[:, None] * head_dim + within).reshape(-1)
        broken[name] = state[name][torch.from_numpy(rows)]
    assert relative_error(_logits(model, broken), _logits(model, state)) > 1e-3


@pytest.mark.slow  # several real builds or a curve of evaluations: CI runs it with make test-slow
def test_the_cli_writes_b_aligned_with_its_report_and_the_same_function(tmp_path):
    a = build_model("llama", tmp_path / "a", seed=1)
    b = build_model("llama", tmp_path / "b", seed=2)
    out = tmp_path / "out"
    result = run_cli("align", a, b, out, "--residual", "--signs")
    assert result.returncode == 0, result.stderr
    assert "self-test passed" in result.stdout and "identity recovered" in result.stdout
    report = json.loads((out / "alignment_report.json").read_text())
    test = report["self_test"]
    assert test["identity_recovered"] and test["weight_distance_after_realigning"] == 0.0
    assert test["permuted_logits_error"] < 1e-4 and test["output_logits_error"] < 1e-4
    assert test["midpoint_logits_error_after_realigning"] == 0.0 < test["midpoint_logits_error_before_realigning"]
    assert report["weight_distance"]["after"] < report["weight_distance"]["before"]
    assert {"layer 0 mlp", "layer 3 attention", "embeddings and head"} <= set(report["matching_cost"]["parts"])
    for name in ("config.json", "tokenizer.json", "README.md", "model.safetensors"):
        assert (out / name).is_file()
    # The same values, rearranged (and some negated): every tensor keeps B's multiset of magnitudes.
    original, aligned = load_state(b), load_state(out)
    for name in original:
        assert torch.equal(original[name].abs().flatten().sort().values, aligned[name].abs().flatten().sort().values)


def test_activation_matching_recovers_the_self_tests_permutation(tmp_path):
    a = build_model("llama", tmp_path / "a", seed=1)
    b = build_model("llama", tmp_path / "b", seed=2)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["abc def ghi", "hello world", "xyz uvw rst", "q r s t"] * 4))
    report = align(a, b, tmp_path / "out", match="activations", data=data, residual=True).report
    assert report["self_test"]["identity_recovered"] and report["search"]["calibration_tokens"] > 0


def _refused(tmp_path: Path, *args: str, message: str) -> None:
    out = tmp_path / "refused"
    result = run_cli("align", *args, out)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_bad_input_is_one_line_and_no_output(tmp_path, model_factory):
    llama = model_factory("llama", "align-llama", seed=1)
    _refused(tmp_path, str(tmp_path / "missing"), str(llama), message="missing")
    _refused(tmp_path, str(llama), str(model_factory("mistral", "align-mistral")), message="model_type is 'mistral'")
    _refused(tmp_path, str(model_factory("gpt2", "align-gpt2")), str(llama), message="model_type 'gpt2' (GPT2LMHeadModel) is not supported")
    narrow = tmp_path / "narrow"
    build_model("llama", narrow, seed=3)
    config = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**config, "intermediate_size": 32}))
    _refused(tmp_path, str(llama), str(narrow), message="intermediate_size is 32")
    _refused(tmp_path, str(llama), str(llama), "--match", "activations", message="--match activations needs --data")


def test_a_tensor_of_another_shape_is_named(tmp_path, model_factory):
    from safetensors.torch import save_file

    llama = model_factory("llama", "align-llama", seed=1)
    other = tmp_path / "other"
    build_model("llama", other, seed=2)
    state = load_state(other)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :16].contiguous()
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight': shape \[64, 16\]"):
        check_pair(Checkpoint(llama), Checkpoint(other))
    with pytest.raises(MergeforgeError):
        align(llama, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from mergeforge.cli import main; sys.argv=['mergeforge','--help']\ntry: main()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().endswith("False") and "align" in result.stdout
