"""``mergeforge lora convert``: PEFT adapters as llama.cpp LoRA GGUF files, read back with the
``gguf`` package (always) and applied by llama.cpp itself (when llama-cpp-python is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import run_cli
from gguf_support import ARCHS, build

from mergeforge.checkpoint.convert import convert
from mergeforge.checkpoint.gguf_arch import to_gguf_order
from mergeforge.checkpoint.gguf_reader import GGUFCheckpoint
from mergeforge.checkpoint.lora_adapter import read_lora
from mergeforge.errors import CheckpointError, OutputError
from mergeforge.lora.gguf_export import convert_lora

peft = pytest.importorskip("peft")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [1, 5, 9, 42, 7, 100, 3, 250]
# Measured on the tiny models below (logits about 0.55, the adapter moves them by 0.8-1.4):
# llama.cpp + the F32 adapter against transformers + PEFT differ by 2.3e-5 (llama), 1.8e-4 (qwen2),
# 4.0e-4 (gemma2), as the base models alone do (1.1e-4, 2.0e-4, 3.1e-4); the bound is test_gguf.py's.
F32_BOUND = 1e-3


def make_adapter(base: Path, folder: Path, targets: list[str], seed: int = 3, **config):
    """A real PEFT adapter with random factors, in the scale a trained one has."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=config.pop("r", 8), lora_alpha=config.pop("lora_alpha", 16),
                                                            target_modules=targets, init_lora_weights=False, **config))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(0.5)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-gguf")
    return {arch: build(arch, root / arch) for arch in ARCHS}


def everything(arch: str) -> dict:
    """rsLoRA, rank and alpha patterns, every projection and (untied Llama) the embedding."""
    targets = PROJECTIONS + (["embed_tokens"] if arch == "llama" else [])
    return dict(targets=targets, use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 5.0})


def test_the_file_has_llama_cpps_keys_names_shapes_and_products(models, tmp_path):
    base = models["llama"]
    make_adapter(base, tmp_path / "adapter", **everything("llama"))
    result = convert_lora(tmp_path / "adapter", tmp_path / "adapter.gguf", base=base)
    reader = gguf.GGUFReader(result.path)
    fields = {key: reader.fields[key].contents() for key in ("general.type", "general.architecture", "adapter.type",
                                                             "adapter.lora.alpha")}
    assert fields == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora", "adapter.lora.alpha": 16.0}
    tensors = {t.name: t for t in reader.tensors}
    stems = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    expected_names = {f"blk.{i}.{stem}.weight.lora_{side}" for i in range(2) for stem in stems for side in "ab"}
    assert set(tensors) == expected_names | {"token_embd.weight.lora_a", "token_embd.weight.lora_b"}
    assert all(tensors[name].tensor_type == gguf.GGMLQuantizationType.F32 for name in tensors)
    config = json.loads((base / "config.json").read_text())
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    kv_rows = hidden // heads * kv_heads
    # GGML order: ne0 is the input dimension; lora_b's ne0 is the rank llama.cpp divides alpha by
    assert list(tensors["blk.0.attn_k.weight.lora_a"].shape) == [hidden, 8]
    assert list(tensors["blk.0.attn_k.weight.lora_b"].shape) == [8, kv_rows]
    assert list(tensors["blk.1.attn_v.weight.lora_b"].shape) == [4, kv_rows]
    assert list(tensors["token_embd.weight.lora_a"].shape) == [8, config["vocab_size"]]
    assert list(tensors["token_embd.weight.lora_b"].shape) == [8, hidden]
    # what llama.cpp adds, alpha / rank · B·A, is PEFT's update in llama.cpp's row order
    adapter = read_lora(tmp_path / "adapter")

    def product(stem: str, rank: int) -> np.ndarray:
        a, b = (np.array(tensors[f"{stem}.lora_{side}"].data, dtype=np.float64) for side in "ab")
        return 16.0 / rank * (b @ a)

    for module, stem, permute in (("self_attn.q_proj", "attn_q", heads), ("self_attn.k_proj", "attn_k", kv_heads),
                                  ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)):
        update = adapter.updates[f"model.layers.1.{module}"]
        delta = update.delta().double().numpy()
        expected = to_gguf_order(delta, permute) if permute else delta
        np.testing.assert_allclose(product(f"blk.1.{stem}.weight", update.rank), expected, rtol=0, atol=1e-6 * np.abs(delta).max())
    # the embedding's lora_a is lora_embedding_Aᵀ [vocab, r]: llama.cpp gathers its rows, then multiplies by lora_b
    a, b = (np.array(tensors[f"token_embd.weight.lora_{side}"].data, dtype=np.float64) for side in "ab")
    delta = adapter.updates["model.embed_tokens"].delta().double().numpy()
    np.testing.assert_allclose(16.0 / 8 * (a @ b.T), delta, rtol=0, atol=1e-6 * np.abs(delta).max())
    assert any("folded into their lora_b" in note for note in result.notes)


def test_a_plain_adapter_is_written_as_stored(models, tmp_path):
    """Without patterns or rsLoRA nothing is folded: the factors are PEFT's, bit for bit, as llama.cpp's converter writes them."""
    base = models["qwen2"]
    make_adapter(base, tmp_path / "adapter", ["v_proj", "up_proj"], r=4, lora_alpha=8)
    result = convert_lora(tmp_path / "adapter", tmp_path / "out", base=base, out_type="f32")
    assert result.path == tmp_path / "out" / "adapter.gguf" and not result.notes
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(result.path).tensors}
    state = load_state_of(tmp_path / "adapter")
    assert np.array_equal(tensors["blk.0.ffn_up.weight.lora_a"], state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"])
    assert np.array_equal(tensors["blk.0.ffn_up.weight.lora_b"], state["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"])


def load_state_of(adapter: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(adapter / "adapter_model.safetensors")


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_other_types_follow_llama_cpps_converter(models, tmp_path, out_type):
    base = models["llama"]
    make_adapter(base, tmp_path / "adapter", ["q_proj"], r=8)
    path = convert_lora(tmp_path / "adapter", tmp_path / "a.gguf", base=base, out_type=out_type).path
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    # lora_a rows are the hidden size (64, whole Q8_0 blocks); lora_b rows are the rank (8): F16, as the converter falls back
    assert kinds["blk.0.attn_q.weight.lora_a"] == out_type.upper()
    assert kinds["blk.0.attn_q.weight.lora_b"] == ("F16" if out_type == "q8_0" else out_type.upper())


def test_what_the_format_cannot_hold_is_refused(models, tmp_path):
    llama, qwen2, gemma2 = models["llama"], models["qwen2"], models["gemma2"]
    peft_model = make_adapter(llama, tmp_path / "saved", ["q_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    peft_model.save_pretrained(tmp_path / "saved")
    make_adapter(qwen2, tmp_path / "tied-embed", ["embed_tokens", "q_proj"])
    make_adapter(llama, tmp_path / "plain", ["q_proj"])
    cases = [
        (lambda: convert_lora(tmp_path / "saved", tmp_path / "o.gguf", base=llama), CheckpointError,
         "tensor 'lm_head.weight' is saved whole (modules_to_save)"),
        (lambda: convert_lora(tmp_path / "tied-embed", tmp_path / "o.gguf", base=qwen2), CheckpointError,
         "embedding LoRA on a model whose output layer is its embedding"),
        (lambda: convert_lora(tmp_path / "plain", tmp_path / "o.gguf", base=gemma2), CheckpointError,
         "has shape"),  # an adapter of another model
        (lambda: convert_lora(tmp_path / "plain", tmp_path / "o.gguf", base=llama, out_type="q4_0"), OutputError,
         "a LoRA GGUF is f32, f16, bf16, q8_0"),
        (lambda: convert_lora(tmp_path / "plain", tmp_path / "plain" / "a.gguf", base=llama), OutputError,
         "is inside the input model folder"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=None) as caught:
            call()
        assert message in str(caught.value), str(caught.value)
    assert not (tmp_path / "o.gguf").exists()


def test_cli_convert_and_its_errors(models, tmp_path):
    base = models["llama"]
    make_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj"])
    result = run_cli("lora", "convert", tmp_path / "adapter", tmp_path / "adapter.gguf", "--base", base, "--out-type", "f16")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and gguf.GGUFReader(tmp_path / "adapter.gguf").fields["general.file_type"].contents() == 1
    again = run_cli("lora", "convert", tmp_path / "adapter", tmp_path / "adapter.gguf", "--base", base)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--overwrite" in again.stderr, again.stderr
    missing = run_cli("lora", "convert", tmp_path / "nope", tmp_path / "x.gguf", "--base", base)
    assert missing.returncode == 2 and "adapter folder not found" in missing.stderr, missing.stderr


def test_the_adapted_model_converts_to_gguf_as_the_alternative(models, tmp_path):
    """What the refusals suggest: ``mergeforge convert BASE+ADAPTER out.gguf`` writes the model with the adapter merged."""
    base = models["qwen2"]
    peft_model = make_adapter(base, tmp_path / "adapter", ["embed_tokens", "q_proj"])
    expected = peft_model.merge_and_unload().state_dict()
    result = run_cli("convert", f"{base}+{tmp_path / 'adapter'}", tmp_path / "adapted.gguf", "--out-type", "f32")
    assert result.returncode == 0, result.stderr
    with GGUFCheckpoint(tmp_path / "adapted.gguf") as written:
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
            torch.testing.assert_close(written.read(name), expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_applies_the_adapter_with_peft_logits(arch, models, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional, hand-run check")
    base = models[arch]
    options = everything(arch)
    peft_model = make_adapter(base, tmp_path / "adapter", options.pop("targets"), **options)
    with torch.no_grad():
        expected = peft_model(torch.tensor([IDS])).logits[0].numpy()
        with peft_model.disable_adapter():
            plain = peft_model(torch.tensor([IDS])).logits[0].numpy()
    base_gguf = convert(base, tmp_path / "base.gguf", "gguf", "f32")[0]
    adapter_gguf = convert_lora(tmp_path / "adapter", tmp_path / "adapter.gguf", base=base).path
    model = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf), logits_all=True, verbose=False, n_ctx=64)
    model.eval(IDS)
    difference = np.abs(np.array(model.scores[: len(IDS)]) - expected).max()
    assert np.abs(expected - plain).max() > 0.3  # the adapter matters
    assert difference < F32_BOUND, difference
