"""Tokenizers as mergekit defines them: the merged vocabulary (``tokenizer_source: union | base |
MODEL``, the ``tokenizer:`` block with ``tokens:`` overrides and ``pad_to_multiple_of``), every
model's embedding and output-head rows laid out in it before the method runs, and
``chat_template``. Tiny models with different added tokens, built here; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, load_state, run_cli

import mergeforge
from mergeforge.errors import RecipeError
from mergeforge.tokenizer import ModelToken, RowRef, TokenOverride, ZeroRow, assign_rows
from mergeforge.tokenizer.chat_templates import BUILTIN_CHAT_TEMPLATES

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def with_added_tokens(kind: str, path: Path, seed: int, base: Path, added: list[tuple[str, bool]]) -> Path:
    """A fine-tune of ``base`` whose tokenizer adds ``added`` ((text, special) pairs), with new
    random embedding (and head) rows for them."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_model(kind, path, seed=seed, base=base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for text, special in added:
        if special:
            tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(text, special=True, normalized=False)]},
                                         replace_extra_special_tokens=False)
        else:
            tokenizer.add_tokens([AddedToken(text, normalized=True, special=False)])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for weight in {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
            weight[old_rows:] = torch.randn(weight[old_rows:].shape, generator=generator) * 0.02
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vocab_family(tmp_path_factory) -> dict[str, Path]:
    """A Llama base and three fine-tunes: a adds <|im_start|>, <|im_end|>; b adds <tool> (special)
    and 'hello' (plain); c adds <|im_start|> and <x>."""
    root = tmp_path_factory.mktemp("vocab")
    base = build_model("llama", root / "base", seed=0)
    return {
        "base": base,
        "a": with_added_tokens("llama", root / "a", 1, base, [("<|im_start|>", True), ("<|im_end|>", True)]),
        "b": with_added_tokens("llama", root / "b", 2, base, [("<tool>", True), ("hello", False)]),
        "c": with_added_tokens("llama", root / "c", 3, base, [("<|im_start|>", True), ("<x>", True)]),
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def linear_union(family: dict[str, Path], **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(family["a"]), "parameters": {"weight": 1.0}},
                                                 {"model": str(family["b"]), "parameters": {"weight": 1.0}}],
            "tokenizer_source": "union", **extra}


def vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def row(state: dict[str, torch.Tensor], name: str, folder: Path, token: str) -> torch.Tensor:
    return state[name][vocab(folder)[token]]


# -- the merged vocabulary, end to end ---------------------------------------------------------------


def test_union_merge_from_the_cli_loads_and_encodes_every_models_tokens(vocab_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path / "r.yml", linear_union(vocab_family)), out, "--quiet")
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(out)
    for token in ("<|im_start|>", "<|im_end|>", "<tool>", "hello"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    ids = tokenizer.encode("a<tool>b<|im_end|>c", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "abc"  # special tokens stay special
    merged_vocab = tokenizer.get_vocab()
    assert {t: merged_vocab[t] for t in vocab(vocab_family["a"])} == vocab(vocab_family["a"])  # the first model's ids never move
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(merged_vocab) == 100
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, merged_vocab["<tool>"], merged_vocab["<|im_start|>"]]])).logits.shape == (1, 3, 100)

    merged, a, b = load_state(out), load_state(vocab_family["a"]), load_state(vocab_family["b"])
    for name in (EMBED, HEAD):
        assert merged[name].shape == (100, 32)
        shared = vocab(vocab_family["b"])["x"]
        torch.testing.assert_close(merged[name][merged_vocab["x"]], (a[name][shared] + b[name][shared]) / 2)
        # a token one model has: that model's row, in every model, so the merge keeps it
        torch.testing.assert_close(merged[name][merged_vocab["<|im_start|>"]], row(a, name, vocab_family["a"], "<|im_start|>"))
        torch.testing.assert_close(merged[name][merged_vocab["<tool>"]], row(b, name, vocab_family["b"], "<tool>"))
        torch.testing.assert_close(merged[name][merged_vocab["hello"]], row(b, name, vocab_family["b"], "hello"))


def test_both_executors_write_the_same_bytes_and_the_dry_run_names_the_vocabulary(vocab_family, tmp_path):
    recipe = linear_union(vocab_family)
    numpy_result = mergeforge.merge(recipe, tmp_path / "numpy", quiet=True)
    mergeforge.merge(recipe, tmp_path / "torch", quiet=True, executor="torch")
    assert numpy_result.executor == "numpy"
    assert (tmp_path / "numpy" / "model.safetensors").read_bytes() == (tmp_path / "torch" / "model.safetensors").read_bytes()
    lines = mergeforge.merge(recipe, None, dry_run=True).plan_lines
    assert any(line.startswith("tokenizer: 100 tokens (2 added") for line in lines)
    assert any(line.startswith(f"  {EMBED} [100, 32]") for line in lines)


def test_base_rule_average_rule_overrides_and_padding(vocab_family, tmp_path):
    family = vocab_family
    out = tmp_path / "out"
    mergeforge.merge({
        "merge_method": "task_arithmetic", "base_model": str(family["base"]),
        "models": [{"model": str(family[m]), "parameters": {"weight": w}} for m, w in (("a", 0.5), ("b", 0.3), ("c", 0.4))],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
            "<tool>": {"source": {"kind": "model_token", "model": str(family["a"]), "token": "<|im_end|>"}},
            "<new>": {"source": {"kind": "model_token", "model": str(family["c"]), "token_id": 5}},
            "!": {"source": {"kind": "zero"}, "force": True},
        }},
    }, out, quiet=True)
    merged = load_state(out)
    ids = vocab(out)
    states = {m: load_state(family[m]) for m in "abc"}
    assert len(ids) == 102 and json.loads((out / "config.json").read_text())["vocab_size"] == 104
    for name in (EMBED, HEAD):
        assert merged[name].shape == (104, 32)
        # in a and c only, not in the base: base and b take the mean of a's and c's rows
        a_row, c_row = (row(states[m], name, family[m], "<|im_start|>") for m in "ac")
        mean = (a_row + c_row) / 2
        torch.testing.assert_close(merged[name][ids["<|im_start|>"]], mean + 0.5 * (a_row - mean) + 0.4 * (c_row - mean))
        # overrides: every model lacking <tool> takes a's <|im_end|> row; b keeps its own
        end_row, tool_row = row(states["a"], name, family["a"], "<|im_end|>"), row(states["b"], name, family["b"], "<tool>")
        torch.testing.assert_close(merged[name][ids["<tool>"]], end_row + 0.3 * (tool_row - end_row))
        torch.testing.assert_close(merged[name][ids["<new>"]], states["c"][name][5])  # a new token, in no model
        assert not merged[name][ids["!"]].any()  # forced to zeros in every model
        torch.testing.assert_close(merged[name][102], merged[name][103])  # padding: each model's mean row, merged
        assert merged[name][102].abs().max() < 0.05


def test_tied_heads_stay_tied(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tied")
    base = build_model("qwen2", root / "base", seed=0)
    a = with_added_tokens("qwen2", root / "a", 1, base, [("<|im_start|>", True)])
    b = with_added_tokens("qwen2", root / "b", 2, base, [("<tool>", True)])
    out = tmp_path / "out"
    mergeforge.merge({"merge_method": "linear", "tokenizer_source": "union",
                      "models": [{"model": str(a), "parameters": {"weight": 1}}, {"model": str(b), "parameters": {"weight": 1}}]},
                     out, quiet=True)
    assert "lm_head.weight" not in load_state(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.vocab_size == 98
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.shape == (98, 32)


def test_a_models_tokenizer_as_the_source_lays_every_model_out_in_its_vocabulary(vocab_family, tmp_path):
    out = tmp_path / "out"
    mergeforge.merge(linear_union(vocab_family, tokenizer_source=str(vocab_family["b"])), out, quiet=True)
    assert vocab(out) == vocab(vocab_family["b"])
    merged, a, b = load_state(out), load_state(vocab_family["a"]), load_state(vocab_family["b"])
    assert merged[EMBED].shape == (98, 32)
    torch.testing.assert_close(merged[EMBED][96], b[EMBED][96])  # <tool>: b's only, so a takes b's row too
    torch.testing.assert_close(merged[EMBED][10], (a[EMBED][10] + b[EMBED][10]) / 2)


def test_base_source_with_one_shared_vocabulary_changes_nothing(llama_family, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 1}},
                                                   {"model": str(llama_family["ft2"]), "parameters": {"weight": 1}}]}
    with mergeforge.plan_merge({**recipe, "tokenizer_source": "base"}) as plan:
        assert plan.vocabulary is not None and not plan.views  # no tensor is remapped
    mergeforge.merge(recipe, tmp_path / "plain", quiet=True)
    mergeforge.merge({**recipe, "tokenizer_source": "base"}, tmp_path / "base", quiet=True)
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "base" / "model.safetensors").read_bytes()


# -- the row rules -----------------------------------------------------------------------------------

VOCABS = {"base": {"x": 0, "y": 1}, "m1": {"x": 0, "y": 1, "p": 2, "q": 3}, "m2": {"x": 0, "p": 2, "r": 3}}
MERGED = {"x": 0, "y": 1, "p": 2, "q": 3, "r": 4, "new": 5}
ROWS = {"base": 2, "m1": 4, "m2": 4}


def layout(overrides: dict[str, TokenOverride] | None = None, base: str | None = "base", pad: int | None = None):
    return assign_rows(MERGED, ["base", "m1", "m2"], base, VOCABS, ROWS, overrides or {}, pad)


def test_rows_come_from_the_owner_the_base_or_the_mean_as_in_mergekit():
    rows, warnings = layout({"new": TokenOverride(ZeroRow())})
    assert rows.own["m2"].tolist() == [0, -1, 2, -1, 3, -1]
    assert rows.fills[1] == (RowRef("base", 1),)  # y: in base and m1; the base's row
    assert rows.fills[2] == (RowRef("m1", 2), RowRef("m2", 2))  # p: not in the base; the mean
    assert rows.fills[3] == (RowRef("m1", 3),)  # q: its only owner
    assert rows.fills[5] == () and not warnings
    assert layout(base=None)[0].fills[1] == (RowRef("base", 1), RowRef("m1", 1))  # y: without a base rule, the owners' mean
    assert layout(pad=4)[0].rows == 8 and layout()[1] == ["tokenizer: token 'new' is in no model's vocabulary; its rows are zeros"]


def test_overrides_forced_or_not():
    rows, _ = layout({"x": TokenOverride(ModelToken("m2", token="r"), force=True), "new": TokenOverride(ZeroRow())})
    assert all(rows.own[m][0] == -1 for m in ("base", "m1", "m2")) and rows.fills[0] == (RowRef("m2", 3),)
    rows, _ = layout({"p": TokenOverride(ModelToken("m1", token_id=3)), "new": TokenOverride(ZeroRow())})
    assert rows.own["m2"][2] == 2 and rows.fills[2] == (RowRef("m1", 3),)  # m2 keeps its own p


@pytest.mark.parametrize(("override", "message"), [
    (TokenOverride(ModelToken("m2", token="<tol>")), "tokenizer.tokens['new'].source: token '<tol>' is not in model 'm2''s vocabulary"),
    (TokenOverride("m1x"), "model 'm1x' is not one of the models merged here (base, m1, m2); did you mean 'm1'?"),
    (TokenOverride(ModelToken("m1", token_id=9)), "token_id 9 is out of range for model 'm1' (rows 0 to 3)"),
    (TokenOverride(), "the token is missing from model(s) 'base', 'm1', 'm2'; give a source"),
])
def test_bad_overrides_name_the_entry(override, message):
    with pytest.raises(RecipeError, match="^tokenizer.tokens") as error:
        layout({"new": override})
    assert message in str(error.value)


# -- bad input: one line naming the field, exit code 2, no output --------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    ({"tokenizer_source": "llama/mising"}, "tokenizer_source: 'llama/mising' is not one of the merged models"),
    ({"tokenizer_source": None, "tokenizer": {"tokens": {"<t>": {"source": {"kind": "model_token", "model": "A", "token": "<|im_strat|>"}}}}},
     "tokenizer.tokens['<t>'].source: token '<|im_strat|>' is not in model"),
    ({"chat_template": "lama3"}, "chat_template: unknown template 'lama3'; did you mean 'llama3'?"),
])
def test_bad_tokenizer_settings_fail_before_anything_is_written(vocab_family, tmp_path, extra, message):
    recipe = linear_union(vocab_family, **extra)
    if recipe.get("tokenizer_source") is None:
        recipe.pop("tokenizer_source")
    text = json.dumps(recipe).replace('"A"', json.dumps(str(vocab_family["a"])))
    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path / "r.yml", json.loads(text)), out, "--quiet")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


# -- chat templates ----------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize(("preset", "expected"), [
    ("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"),
    ("llama3", "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"),
    ("mistral", "<s>[INST] hi [/INST]yo</s>"),
    ("alpaca", "### Instruction:\nhi\n\n### Response:\nyo</s>\n\n"),
])
def test_chat_template_presets_render_their_format(llama_family, tmp_path, preset, expected):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    mergeforge.merge({"merge_method": "linear", "chat_template": preset,
                      "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 1}}]}, out, quiet=True)
    assert (out / "chat_template.jinja").read_text() == BUILTIN_CHAT_TEMPLATES[preset]
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(CHAT, tokenize=False) == expected


def test_chat_template_auto_takes_the_most_common_and_jinja_text_is_used_as_given(vocab_family, tmp_path):
    from mergeforge.tokenizer.chat_templates import resolve_chat_template

    folders = []
    for index, template in enumerate(["{{ 'one' }}", "{{ 'two' }}", "{{ 'two' }}", None]):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        if template:
            (folder / "chat_template.jinja").write_text(template + "\n")
        folders.append(folder)
    assert resolve_chat_template("auto", folders) == "{{ 'two' }}"
    assert resolve_chat_template("auto", folders[3:]) is None
    assert resolve_chat_template("{{ messages[0]['content'] }}", []) == "{{ messages[0]['content'] }}"
