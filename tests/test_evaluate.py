"""The evaluator against scores computed by hand on a hand-built model, and its user errors.

The hand-built model is a real ``LlamaForCausalLM`` whose attention and MLP weights are zero, so
the residual stream at each position is the current token's embedding: it is a bigram model. With
one-hot embeddings and an output matrix holding ``C`` at ``(f(i), i)``, the final RMSNorm scales the
one-hot vector by ``1 / sqrt(1/d + eps)``, so the logits of token ``i`` are ``s`` at ``f(i)`` and 0
elsewhere, with ``s = C / sqrt(1/d + eps)``. Greedy generation follows ``f``, and every answer
token's log-probability is ``s * [token == f(previous)] - log(e^s + V - 1)``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

HIDDEN = 128
SCALE = 0.5
NEXT_CHAR = {"=": "x", "x": "y"}  # and "y" -> end of sequence; every other token -> "="

# prompt, answer, and how many of the answer's tokens (end of sequence included) the bigram
# model predicts: "xy" is its own continuation of "=", so all 3; "yx": none of 3; "xyz": x and y.
EXAMPLES = [("ab=", "xy", 3), ("hello=", "xy", 3), ("a=", "yx", 0), ("q=", "xyz", 2)]


def bigram_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    token_id = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for index in range(vocab):
            token = tokenizer.convert_ids_to_tokens(index)
            if token == "y":
                target = tokenizer.eos_token_id
            else:
                target = token_id(NEXT_CHAR.get(token, "="))
            model.lm_head.weight[target, index] = SCALE
    return model.eval()


def expected_loss(vocab: int, eps: float) -> float:
    s = SCALE / math.sqrt(1 / HIDDEN + eps)
    log_normaliser = math.log(math.exp(s) + vocab - 1)
    tokens = sum(len(answer) + 1 for _, answer, _ in EXAMPLES)
    hits = sum(hit for _, _, hit in EXAMPLES)
    return (tokens * log_normaliser - hits * s) / tokens


@pytest.fixture(scope="module")
def tokenizer():
    from mergeforge.zoo.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def hand_task(tmp_path_factory) -> Path:
    from mergeforge.tasks.folders import TaskSpec, write_task

    folder = tmp_path_factory.mktemp("tasks") / "chain"
    write_task(folder, TaskSpec(name="chain", max_new_tokens=5), {"test": [(p, a) for p, a, _ in EXAMPLES]})
    return folder


@pytest.fixture(scope="module")
def hand_model_dir(tmp_path_factory, tokenizer) -> Path:
    from mergeforge.zoo.tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("bigram") / "model"
    bigram_model(tokenizer).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_scores_match_hand_computation(tokenizer, hand_task, batch_size):
    from mergeforge.evaluate import evaluate_model

    model = bigram_model(tokenizer)
    result = evaluate_model(model, [hand_task], tokenizer=tokenizer, batch_size=batch_size, return_predictions=True)
    entry = result["tasks"]["chain"]
    assert [p["output"] for p in entry["predictions"]] == ["xy"] * 4
    assert (entry["correct"], entry["n"], entry["score"]) == (2, 4, 0.5)
    loss = expected_loss(len(tokenizer), model.config.rms_norm_eps)
    assert entry["answer_tokens"] == 13
    assert entry["loss"] == pytest.approx(loss, rel=1e-5)
    assert entry["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_contains_metric_and_limit(tokenizer, tmp_path):
    from mergeforge.evaluate import TaskSpec, evaluate_model, write_task

    pairs = [("a=", "y"), ("b=", "x"), ("c=", "z")]
    task = write_task(tmp_path / "sub", TaskSpec(name="sub", max_new_tokens=5, metric="contains"), {"test": pairs})
    result = evaluate_model(bigram_model(tokenizer), [task], tokenizer=tokenizer, with_loss=False)
    assert result["tasks"]["sub"]["correct"] == 2 and "loss" not in result["tasks"]["sub"]
    limited = evaluate_model(bigram_model(tokenizer), [task], tokenizer=tokenizer, max_examples=1, with_loss=False)
    assert limited["tasks"]["sub"]["n"] == 1


def test_stop_strings_cut_the_output(tokenizer, tmp_path):
    from mergeforge.evaluate import TaskSpec, evaluate_model, write_task

    task = write_task(tmp_path / "stop", TaskSpec(name="stop", max_new_tokens=5, stop=("y",)), {"test": [("a=", "x")]})
    result = evaluate_model(bigram_model(tokenizer), [task], tokenizer=tokenizer, with_loss=False)
    assert result["tasks"]["stop"]["score"] == 1.0


def test_cli_json_matches_hand_computation(hand_model_dir, hand_task, tmp_path, tokenizer):
    out = tmp_path / "result.json"
    completed = run_cli("eval", hand_model_dir, "--tasks", hand_task, "--json", out, "--batch-size", "2")
    assert completed.returncode == 0, completed.stderr
    assert "chain" in completed.stdout and "50.0%" in completed.stdout
    result = json.loads(out.read_text())
    entry = result["tasks"]["chain"]
    assert (entry["correct"], entry["n"]) == (2, 4)
    assert entry["loss"] == pytest.approx(expected_loss(len(tokenizer), 1e-6), rel=1e-5)
    assert result["split"] == "test" and result["mean_score"] == 0.5


def test_task_names_resolve_in_a_task_root(hand_model_dir, hand_task):
    completed = run_cli("eval", hand_model_dir, "--tasks", "chain", "--task-root", hand_task.parent, "--no-loss", "--limit", "2")
    assert completed.returncode == 0, completed.stderr
    assert "(2/2)" in completed.stdout


def one_line_error(completed: subprocess.CompletedProcess) -> str:
    assert completed.returncode == 2, (completed.stdout, completed.stderr)
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), completed.stderr
    assert "Traceback" not in completed.stderr
    return lines[0]


def test_missing_model_dir(hand_task, tmp_path):
    line = one_line_error(run_cli("eval", tmp_path / "nowhere", "--tasks", hand_task))
    assert "nowhere" in line and "not found" in line


def test_folder_without_a_model(hand_task, tmp_path):
    line = one_line_error(run_cli("eval", tmp_path, "--tasks", hand_task))
    assert "config.json" in line


def test_unknown_task_name(hand_model_dir, hand_task):
    line = one_line_error(run_cli("eval", hand_model_dir, "--tasks", "chain,nosuchtask", "--task-root", hand_task.parent))
    assert "nosuchtask" in line and "chain" in line


def test_task_name_without_a_root(hand_model_dir):
    line = one_line_error(run_cli("eval", hand_model_dir, "--tasks", "reverse"))
    assert "reverse" in line and "--task-root" in line


def task_folder(root: Path, name: str, spec: dict | bytes, test_jsonl: str | bytes) -> Path:
    """A task folder holding ``spec.json`` and ``test.jsonl`` exactly as given (bytes are written raw)."""
    folder = root / name
    folder.mkdir()
    (folder / "spec.json").write_bytes(spec if isinstance(spec, bytes) else json.dumps(spec).encode())
    (folder / "test.jsonl").write_bytes(test_jsonl if isinstance(test_jsonl, bytes) else test_jsonl.encode())
    return folder


def test_malformed_jsonl_names_file_and_line(hand_model_dir, tmp_path):
    folder = task_folder(tmp_path, "broken", {"name": "broken"}, '{"prompt": "a=", "answer": "x"}\n\n{"prompt": "b=", "answer": \n')
    line = one_line_error(run_cli("eval", hand_model_dir, "--tasks", folder))
    assert f"{folder / 'test.jsonl'}:3:" in line and "not valid JSON" in line


def test_non_utf8_jsonl_and_spec_name_the_file(hand_model_dir, tmp_path):
    folder = task_folder(tmp_path, "latin1", {"name": "latin1"}, b'{"prompt": "a=", "answer": "x"}\n{"prompt": "caf\xe9=", "answer": "x"}\n')
    line = one_line_error(run_cli("eval", hand_model_dir, "--tasks", folder))
    assert f"{folder / 'test.jsonl'}:2:" in line and "not UTF-8" in line
    (folder / "spec.json").write_bytes(b'{"name": "caf\xe9"}')
    line = one_line_error(run_cli("eval", hand_model_dir, "--tasks", folder))
    assert str(folder / "spec.json") in line and "not UTF-8" in line


def test_jsonl_line_missing_a_field(hand_model_dir, tmp_path):
    folder = task_folder(tmp_path, "nofield", {"name": "nofield", "answer_key": "target"},
                         '{"prompt": "a=", "target": "x"}\n{"prompt": "b=", "answer": "x"}\n')
    line = one_line_error(run_cli("eval", hand_model_dir, "--tasks", folder))
    assert f"{folder / 'test.jsonl'}:2:" in line and "'target'" in line


def test_bad_spec_field(hand_model_dir, tmp_path):
    folder = task_folder(tmp_path, "badspec", {"name": "badspec", "metrc": "exact_match"}, '{"prompt": "a=", "answer": "x"}\n')
    line = one_line_error(run_cli("eval", hand_model_dir, "--tasks", folder))
    assert "spec.json" in line and "metrc" in line


def test_missing_split(hand_model_dir, hand_task):
    line = one_line_error(run_cli("eval", hand_model_dir, "--tasks", hand_task, "--split", "val"))
    assert "val.jsonl" in line and "test" in line


def test_package_import_is_light():
    code = "import sys, mergeforge.evaluate, mergeforge.zoo; assert 'torch' not in sys.modules, 'torch imported'"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
