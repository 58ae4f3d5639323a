"""GGUF in and out, checked against independent readers: transformers' GGUF loader (always) and
llama.cpp (where llama-cpp-python is installed; it is not in CI, it compiles for 25 minutes).

Tiny llama, qwen2, qwen3 and gemma2 models with a real byte-level BPE tokenizer
(tests/gguf_support.py) go HF -> GGUF -> HF, are merged with GGUF and safetensors inputs mixed,
and every way a GGUF file can be broken gives one message and writes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_state, run_cli
from gguf_support import (
    ARCHS,
    build,
    logits,
    save_bpe_tokenizer,
    save_sentencepiece_style_tokenizer,
    tiny_config,
)

import mergeforge
from mergeforge.checkpoint.convert import convert
from mergeforge.checkpoint.gguf_arch import ARCHITECTURES, permuted_rows, to_gguf_order
from mergeforge.checkpoint.gguf_reader import GGUFCheckpoint
from mergeforge.errors import CheckpointError, MergeforgeError

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: a base, two fine-tunes (base + noise), and the base as F32 and Q8_0 GGUF."""
    root = tmp_path_factory.mktemp("gguf-models")
    out: dict[str, dict[str, Path]] = {}
    for arch in ARCHS:
        base = build(arch, root / f"{arch}-base")
        models = {"base": base, **{f"ft{i}": build(arch, root / f"{arch}-ft{i}", seed=i, base=base) for i in (1, 2)}}
        for name in ("base", "ft1"):
            for kind in ("f32", "q8_0"):
                models[f"{name}-{kind}"] = convert(models[name], root / f"{arch}-{name}-{kind}.gguf", "gguf", kind)[0]
        out[arch] = models
    return out


def recipe_file(path: Path, method: str, base: Path | None, models: list[Path], parameters: dict | None = None) -> Path:
    recipe: dict = {"merge_method": method, "models": [{"model": str(m)} for m in models], "dtype": "float32"}
    if base is not None:
        recipe["base_model"] = str(base)
    if parameters:
        recipe["parameters"] = parameters
    path.write_text(yaml.safe_dump(recipe))
    return path


# -- the name table and the permutation ----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_name_table_agrees_with_gguf_tensor_name_map(arch, family):
    table = ARCHITECTURES[arch]
    official = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    names = list(load_state(family[arch]["base"])) + (["lm_head.weight"] if table.untied_output else [])
    for name in names:
        assert table.gguf_name(name) == official.get_name(name, try_suffixes=(".weight", ".bias")), name
        assert table.hf_name(table.gguf_name(name)) == name


def test_permutation_is_llama_cpps_reshape_swapaxes():
    rows, cols, heads = 48, 5, 3
    weights = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    llama_cpp = weights.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    np.testing.assert_array_equal(to_gguf_order(weights, heads), llama_cpp)
    np.testing.assert_array_equal(llama_cpp[permuted_rows(rows, heads)], weights)


# -- reading and writing, against transformers' GGUF loader --------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_to_gguf_f32_to_hf_is_exact_and_transformers_reads_the_same_weights(arch, family, tmp_path):
    models = family[arch]
    back, _ = convert(models["base-f32"], tmp_path / "back", "hf")
    original, restored = load_state(models["base"]), load_state(back)
    assert set(restored) == set(original)
    for name, tensor in original.items():
        if ARCHITECTURES[arch].norm_offset and "norm" in name:
            # Gemma stores 1 + w (as llama.cpp's converter does): (1 + w) - 1 rounds w to a float32 step near 1
            torch.testing.assert_close(restored[name], tensor, rtol=0, atol=6e-8)
        else:
            assert torch.equal(restored[name], tensor), name
    # our reader and transformers' agree on every tensor of the Q8_0 file (dequantized, un-permuted)
    from transformers import AutoModelForCausalLM

    path = models["base-q8_0"]
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    with GGUFCheckpoint(path) as ours:
        for name in ours.names():
            assert torch.equal(ours.read(name), theirs[name]), name
        rows = ours.read("model.layers.0.self_attn.q_proj.weight", 16, 48)
        assert torch.equal(rows, theirs["model.layers.0.self_attn.q_proj.weight"][16:48])


# Stated bounds for these tiny models (logits of about 0.5-1.2): F16 within 1e-3, Q8_0 within 0.03.
BOUNDS = {"f32": 0.0, "f16": 1e-3, "q8_0": 0.03}


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_our_gguf_with_the_logits_of_the_safetensors_model(arch, family, tmp_path):
    models = family[arch]
    expected = logits(models["base"])
    convert(models["base"], tmp_path / "f16.gguf", "gguf", "f16")
    files = {"f32": models["base-f32"], "f16": tmp_path / "f16.gguf", "q8_0": models["base-q8_0"]}
    for kind, path in files.items():
        difference = (logits(path.parent, path.name) - expected).abs().max().item()
        assert difference <= BOUNDS[kind], (kind, difference)


def test_gguf_to_hf_folder_loads_with_from_pretrained_and_keeps_the_tokenizer(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("convert", family["llama"]["base-q8_0"], tmp_path / "hf", "--out-format", "hf")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    original = AutoTokenizer.from_pretrained(family["llama"]["base"])
    text = "the quick brown fox 123"
    assert tokenizer(text).input_ids == original(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)


def test_requantizing_keeps_the_metadata_and_norms_stay_f32(family, tmp_path):
    source = family["qwen2"]["base-f32"]
    out, _ = convert(source, tmp_path / "q4.gguf", "gguf", "q4_0", name="tiny q4")
    reader = gguf.GGUFReader(out)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.bias"] == "F32"
    assert kinds["blk.0.ffn_down.weight"] == "Q4_0"
    original = gguf.GGUFReader(source)
    for key in ("qwen2.rope.freq_base", "qwen2.attention.head_count_kv", "tokenizer.ggml.pre", "tokenizer.ggml.merges"):
        assert reader.fields[key].contents() == original.fields[key].contents(), key
    assert reader.fields["general.name"].contents() == "tiny q4"
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)


def test_a_sentencepiece_style_tokenizer_is_written_as_a_llama_vocabulary(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    size = save_sentencepiece_style_tokenizer(tmp_path / "m")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config("llama", size)).save_pretrained(tmp_path / "m")
    path, warnings = convert(tmp_path / "m", tmp_path / "m.gguf", "gguf", "f32")
    assert warnings == []
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.scores"].contents()) == size
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[3] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    text = "the quick brown fox 123 zebra!"
    original = AutoTokenizer.from_pretrained(tmp_path / "m")(text).input_ids
    converted = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")(text).input_ids
    assert converted[-len(original):] == original  # transformers' GGUF tokenizer adds <s> first, as Llama 2's does
    assert torch.equal(logits(tmp_path / "m"), logits(tmp_path, "m.gguf"))


# -- merging -------------------------------------------------------------------------------------


def test_gguf_base_with_safetensors_fine_tunes_merges_into_q8_0_matching_the_safetensors_merge(family, tmp_path):
    models = family["llama"]
    fine_tunes = [models["ft1"], models["ft2"]]
    recipe = recipe_file(tmp_path / "gguf.yml", "ties", models["base-f32"], fine_tunes, {"weight": 0.5, "density": 0.5})
    reference = recipe_file(tmp_path / "hf.yml", "ties", models["base"], fine_tunes, {"weight": 0.5, "density": 0.5})
    result = run_cli("merge", recipe, tmp_path / "q8", "--out-format", "gguf", "--out-type", "q8_0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "q8").iterdir()) == ["README.md", "mergeforge_config.yml", "model.gguf"]
    assert run_cli("merge", reference, tmp_path / "hf", "--quiet").returncode == 0
    expected = logits(tmp_path / "hf")
    mergeforge.merge(recipe, tmp_path / "f32", out_format="gguf", out_type="f32", quiet=True)
    assert (logits(tmp_path / "f32", "model.gguf") - expected).abs().max().item() < 1e-5
    assert (logits(tmp_path / "q8", "model.gguf") - expected).abs().max().item() < BOUNDS["q8_0"]


DATA_FREE = [m for m in mergeforge.all_methods() if m.calibrate is None and m.plugin is None]


def _parameters(method) -> dict:
    values = {"weight": 0.5, "t": 0.5}
    return {p.name: values[p.name] for p in method.params if p.required}


@pytest.mark.parametrize("method", DATA_FREE, ids=lambda m: m.name)
def test_every_method_gives_the_same_bytes_from_f32_gguf_inputs_as_from_safetensors(method, family, tmp_path):
    models = family["qwen2"]
    count = max(method.min_models, 1 if method.max_models == 1 else 2)
    uses_base = method.base.value != "none"
    if method.max_models == 1 and not uses_base:  # passthrough: one model
        count = 1
    as_gguf = [models["ft1-f32"], models["ft2"]][:count]  # mixed: a GGUF fine-tune beside a safetensors one
    as_hf = [models["ft1"], models["ft2"]][:count]
    params = _parameters(method)
    gguf_recipe = recipe_file(tmp_path / "a.yml", method.name, models["base-f32"] if uses_base else None, as_gguf, params)
    hf_recipe = recipe_file(tmp_path / "b.yml", method.name, models["base"] if uses_base else None, as_hf, params)
    mergeforge.merge(gguf_recipe, tmp_path / "a", quiet=True, executor="torch")
    mergeforge.merge(hf_recipe, tmp_path / "b", quiet=True, executor="torch")
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert set(a) == set(b)
    for name in b:
        assert torch.equal(a[name], b[name]), name


def test_dry_run_lists_each_inputs_tensor_types_and_warns_about_a_quantized_fine_tune(family, tmp_path):
    models = family["llama"]
    q4 = convert(models["ft1"], tmp_path / "ft1-q4_0.gguf", "gguf", "q4_0")[0]
    recipe = recipe_file(tmp_path / "r.yml", "task_arithmetic", models["base"], [q4], {"weight": 1.0})
    result = run_cli("merge", recipe, "--dry-run", "--out-format", "gguf", "--out-type", "q8_0")
    assert result.returncode == 0, result.stderr
    assert f"input {q4}: GGUF llama; tensor types: Q4_0 x16, F32 x5" in result.stdout
    assert "executor: torch (model '" in result.stdout and "is a GGUF file)" in result.stdout
    assert "output: GGUF q8_0 (model.gguf)" in result.stdout
    warning = next(line for line in result.stderr.splitlines() if "is quantized (Q4_0)" in line)
    # its task vector (noise 0.02 on weights of about 0.02) against Q4_0's measured noise
    assert "of the base's weight norm" in warning and "Q4_0 adds about" in warning
    assert not (tmp_path / "out").exists()


def test_data_aware_method_runs_on_a_gguf_model(family, tmp_path):
    models = family["llama"]
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(f'{{"text": "the quick brown fox {i}"}}\n' for i in range(4)))
    recipe = {"merge_method": "regmean", "models": [{"model": str(models["ft1-f32"])}, {"model": str(models["ft2"])}],
              "dtype": "float32", "calibration": {"data": str(data), "batch_size": 2}}
    mergeforge.merge(recipe, tmp_path / "a", quiet=True)
    recipe["models"][0]["model"] = str(models["ft1"])
    mergeforge.merge(recipe, tmp_path / "b", quiet=True)
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


# -- bad input: one message, nothing written -----------------------------------------------------


def _broken(tmp_path: Path, source: Path, how: str) -> Path:
    data = bytearray(source.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 4096]
    elif how == "magic":
        data[:4] = b"GGML"
    elif how == "version":
        data[4:8] = (7).to_bytes(4, "little")
    path = tmp_path / f"{how}.gguf"
    path.write_bytes(bytes(data))
    return path


def _writer_file(tmp_path: Path, name: str, arch: str, kind) -> Path:
    """A minimal GGUF written with the gguf package itself: one 32x32 tensor of type ``kind``."""
    path = tmp_path / f"{name}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32(f"{arch}.attention.head_count", 4)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    writer.add_tensor("token_embd.weight", np.zeros((32, 32 // block * size), dtype=np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "truncated"),
        ("magic", "not a GGUF file (bad magic b'GGML'"),
        ("version", "GGUF version 7 is not supported"),
        ("arch", "architecture 'bert' is not supported for GGUF; supported: llama, qwen2, qwen3, gemma2"),
        ("type", "is Q8_1, which the gguf package cannot dequantize"),
    ],
)
def test_a_broken_gguf_gives_one_message_and_writes_nothing(how, message, family, tmp_path):
    source = family["llama"]["ft1-f32"]
    if how == "arch":
        broken = _writer_file(tmp_path, how, "bert", gguf.GGMLQuantizationType.F16)
    elif how == "type":
        broken = _writer_file(tmp_path, how, "llama", gguf.GGMLQuantizationType.Q8_1)
    else:
        broken = _broken(tmp_path, source, how)
    before = broken.read_bytes()
    recipe = recipe_file(tmp_path / "r.yml", "task_arithmetic", family["llama"]["base"], [broken], {"weight": 1.0})
    for command in (["merge", recipe, tmp_path / "out"], ["convert", broken, tmp_path / "out", "--out-format", "hf"]):
        result = run_cli(*command)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert str(broken) in result.stderr
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert broken.read_bytes() == before


def test_an_output_that_would_lack_a_tensor_llama_cpp_needs_is_refused_before_merging(family, tmp_path):
    models = family["llama"]
    partial = tmp_path / "partial"
    shutil.copytree(models["base"], partial)
    state = load_state(partial)
    del state["model.layers.1.self_attn.v_proj.weight"]
    from safetensors.torch import save_file

    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    recipe = recipe_file(tmp_path / "r.yml", "linear", None, [partial], {"weight": 1.0})
    result = run_cli("merge", recipe, tmp_path / "out", "--out-format", "gguf")
    assert result.returncode == 2
    assert "would lack tensor 'blk.1.attn_v.weight' ('model.layers.1.self_attn.v_proj.weight')" in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused(family, tmp_path):
    base = family["llama"]["base"]
    recipe = recipe_file(tmp_path / "r.yml", "linear", None, [base], {"weight": 1.0})
    cases = [
        (["merge", recipe, tmp_path / "o", "--out-type", "q8_0"], "--out-type sets the type of a GGUF output"),
        (["merge", recipe, tmp_path / "o", "--out-format", "gguf", "--out-type", "q3_0"], "unknown GGUF type 'q3_0'"),
        (["convert", base, tmp_path / "o", "--out-format", "hf", "--out-type", "q8_0"], "'q8_0' is not a Hugging Face dtype"),
        (["convert", base, base / "out"], "is, or is inside, the input model folder"),
        (["convert", base, base / "o.gguf"], "is inside the input model folder"),
    ]
    if shutil.which("llama-quantize") is None:
        cases.append((["merge", recipe, tmp_path / "o", "--out-format", "gguf", "--out-type", "q4_k_m"],
                      "llama-quantize, which is not on PATH"))
    for command, message in cases:
        result = run_cli(*command)
        assert result.returncode == 2 and message in result.stderr, (command, result.stderr)
        assert not (tmp_path / "o").exists()


def test_a_folder_with_two_gguf_files_is_ambiguous(family, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(family["llama"]["base-f32"], tmp_path / name)
    with pytest.raises(MergeforgeError, match="holds 2 GGUF files"):
        mergeforge.merge({"merge_method": "linear", "models": [{"model": str(tmp_path), "parameters": {"weight": 1.0}}]},
                         tmp_path.parent / "never", dry_run=True)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="is a file; give a model folder or a .gguf file"):
        convert(tmp_path / "notes.txt", tmp_path / "o")


# -- llama.cpp, where installed --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_loads_our_gguf_with_transformers_logits(arch, family):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional, hand-run check")
    ids = [1, 5, 9, 42, 7, 100, 3, 250]
    expected = logits(family[arch]["base"], ids=ids).numpy()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family[arch]["base"])
    for kind, bound in (("f32", 1e-3), ("q8_0", BOUNDS["q8_0"])):
        model = llama_cpp.Llama(model_path=str(family[arch][f"base-{kind}"]), logits_all=True, verbose=False, n_ctx=64)
        model.eval(ids)
        difference = np.abs(np.array(model.scores[: len(ids)]) - expected).max()
        assert difference < bound, (kind, difference)
        for text in ("the quick brown fox 123", "one two three 12345", "  multiple   spaces", "gguf files; 42!"):
            assert model.tokenize(text.encode(), add_bos=False) == tokenizer(text).input_ids, (kind, text)


def test_the_readme_gguf_commands_run(family, tmp_path):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("## GGUF (llama.cpp) models")
    block = re.search(r"```bash\n(.*?)```", readme[start:], flags=re.S).group(1)
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["mergeforge", "merge"], ["mergeforge", "convert"], ["mergeforge", "convert"]]
    models = family["llama"]
    convert(models["base"], tmp_path / "model.Q4_1.gguf", "gguf", "q4_1")
    recipe_file(tmp_path / "recipe.yml", "task_arithmetic", tmp_path / "model.Q4_1.gguf", [models["ft1"], models["ft2"]],
                {"weight": 0.5})
    for command in commands:
        result = run_cli(*command[1:], cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
    for path in (tmp_path / "out" / "model.gguf", tmp_path / "model.q8_0.gguf"):
        assert gguf.GGUFReader(path).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    with GGUFCheckpoint(tmp_path / "model.Q4_1.gguf") as q4:
        back = load_state(tmp_path / "hf")
        assert all(torch.equal(back[name], q4.read(name)) for name in q4.names())


@pytest.mark.slow  # builds a 260 MB model: about 15 s
def test_reading_a_gguf_keeps_resident_memory_bounded_by_tensors_not_the_file(tmp_path):
    """Mapped pages are dropped once a tensor is read: a merge from a 260 MB F32 GGUF base peaks
    less than half a file above the same merge from safetensors (the rest: deriving config.json and
    the tokenizer with transformers, once per file, about 70 MB), not a whole file higher."""
    from test_memory import peak_rss
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=512, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    save_bpe_tokenizer(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "ft")
    base_gguf = convert(tmp_path / "base", tmp_path / "base.gguf", "gguf", "f32")[0]
    size = base_gguf.stat().st_size
    assert size > 250e6
    peaks = {}
    for name, base in (("safetensors", tmp_path / "base"), ("gguf", base_gguf)):
        recipe = recipe_file(tmp_path / f"{name}.yml", "task_arithmetic", base, [tmp_path / "ft"], {"weight": 0.5})
        peaks[name] = peak_rss(recipe, tmp_path / f"out-{name}", "--executor", "torch")
    assert peaks["gguf"] < peaks["safetensors"] + size / 2, (peaks, size)


@pytest.mark.skipif(shutil.which("llama-quantize") is None, reason="llama.cpp's llama-quantize is not on PATH (hand-run check)")
def test_k_quants_go_through_llama_quantize(family, tmp_path):
    models = family["llama"]
    recipe = recipe_file(tmp_path / "r.yml", "task_arithmetic", models["base-f32"], [models["ft1"]], {"weight": 0.5})
    result = run_cli("merge", recipe, tmp_path / "out", "--out-format", "gguf", "--out-type", "q4_k_m", "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "mergeforge_config.yml", "model.gguf"]
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    mergeforge.merge(recipe, tmp_path / "hf", quiet=True)
    assert (logits(tmp_path / "out", "model.gguf") - logits(tmp_path / "hf")).abs().max().item() < 0.3
