"""The lm-evaluation-harness bridge: the exported YAML, a cross-check against mergeforge's own
evaluator on the zoo (same output on every example), a user's own YAML task, the CLI, and bad
inputs. Offline: the Hugging Face libraries run in offline mode, sockets are refused in-process,
and the `datasets` cache lives in a temporary folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from mergeforge.errors import CheckpointError
from mergeforge.evaluate.harness import (
    HarnessError,
    evaluate_with_harness,
    export_lm_eval_task,
    harness_task_config,
)
from mergeforge.tasks.folders import TaskError, TaskSpec, load_task, write_task

needs_lm_eval = pytest.mark.skipif(
    __import__("importlib").util.find_spec("lm_eval") is None, reason="lm_eval is not installed (mergeforge[lmeval])"
)


@pytest.fixture(scope="module", autouse=True)
def offline_cache(private_hf_cache) -> Path:
    return private_hf_cache


@pytest.fixture
def no_network(monkeypatch) -> None:
    """Any attempt to open a network connection in this process fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def zoo():
    from mergeforge.zoo import build_zoo

    return build_zoo(None, size="tiny", seed=0)  # cached by content hash, shared with the zoo tests


def _load_yaml(path: Path) -> dict:
    """lm-eval YAML with its `!function` tag kept as a string."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)


# --- export -----------------------------------------------------------------------------------

def test_export_writes_an_offline_generate_until_task(tmp_path):
    spec = TaskSpec(name="qa", prompt_key="q", answer_key="a", max_new_tokens=9, stop=["\n", ""],
                    description="a hand-made task")
    write_task(tmp_path / "qa", spec, {"train": [("x=", "1")], "test": [("y=", " 2 ")]})
    path = export_lm_eval_task(tmp_path / "qa", tmp_path / "out")
    assert path == tmp_path / "out" / "qa.yaml"
    config = _load_yaml(path)
    assert config["task"] == "qa"
    assert config["output_type"] == "generate_until"
    assert config["dataset_path"] == "json"
    files = config["dataset_kwargs"]["data_files"]
    assert set(files) == {"train", "test"}  # only the splits that exist
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in files.values())
    assert config["test_split"] == "test" and config["training_split"] == "train"
    assert (config["doc_to_text"], config["doc_to_target"]) == ("q", "a")
    # The empty stop string is dropped (it would end every generation at once).
    assert config["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": 9, "do_sample": False}
    [metric] = config["metric_list"]
    assert metric["metric"] == "exact_match"
    # Leading and trailing whitespace is ignored on both sides, as mergeforge strips both.
    import re

    stripped = " 2 \t"
    for pattern in metric["regexes_to_ignore"]:
        stripped = re.sub(pattern, "", stripped)
    assert stripped == "2"
    assert "process_results" not in config


def test_export_contains_task_writes_a_working_metric_module(tmp_path):
    spec = TaskSpec(name="probe.v1", metric="contains", answer_key="label")
    write_task(tmp_path / "probe", spec, {"val": [("ask:free=", "<<SPAM>>")]})
    path = export_lm_eval_task(tmp_path / "probe", tmp_path / "out", split="val")
    config = _load_yaml(path)
    assert config["test_split"] == "val" and "validation_split" not in config
    assert config["metric_list"][0]["metric"] == "contains"
    function = config["process_results"].removeprefix("!function ")
    module_name, function_name = function.rsplit(".", 1)
    assert "." not in module_name  # lm-eval loads `<module>.py` beside the YAML
    namespace: dict = {}
    exec((tmp_path / "out" / f"{module_name}.py").read_text(), namespace)
    process_results = namespace[function_name]
    doc = {"prompt": "ask:free=", "label": " <<SPAM>> "}
    assert process_results(doc, ["  x <<SPAM>> y"]) == {"contains": 1.0}
    assert process_results(doc, ["<<SPAM"]) == {"contains": 0.0}


def test_export_of_a_missing_split_names_the_splits(tmp_path):
    write_task(tmp_path / "t", TaskSpec(name="t"), {"train": [("a", "b")]})
    with pytest.raises(TaskError, match=r"test\.jsonl: no such split file.*\['train'\]"):
        harness_task_config(load_task(tmp_path / "t"), "test")


# --- cross-check against mergeforge's own evaluator -------------------------------------------

SKILLS = ["reverse", "sort", "shift", "count", "translate", "brackets"]


def _spam_mixed_task(folder: Path, zoo_tasks: Path) -> Path:
    """A `contains` task whose expected verdict is mixed by the zoo's design: prompts holding
    `free` (the behaviour model answers <<SPAM>>) interleaved with clean echo prompts (it does
    not), all with the reference <<SPAM>>."""
    spam = load_task(zoo_tasks / "spam").examples("test", 30)
    echo = load_task(zoo_tasks / "echo").examples("test", 30)
    pairs = [(example.prompt, "<<SPAM>>") for pair in zip(spam, echo) for example in pair]
    write_task(folder, load_task(zoo_tasks / "spam").spec.model_copy(update={"name": "spam_mixed"}), {"test": pairs})
    return folder


@needs_lm_eval
@pytest.mark.parametrize(("model", "limit", "batch_size"),
                         [("multitask", 50, 64), ("behavior_spam", 60, 7), ("lora_reverse", 30, 16)])
def test_harness_matches_evaluate_model_on_every_example(zoo, no_network, tmp_path, model, limit, batch_size):
    """The important one: the exported task scored by lm-eval gives, on every example, the very
    output and verdict of mergeforge's own evaluator (exact_match and contains; batch 64 and an
    odd batch size; a LoRA adapter folder, which mergeforge merges and hands to HFLM as a model)."""
    from mergeforge.evaluate import evaluate_model

    tasks = zoo.root / "tasks"
    if model == "multitask":
        folders = [tasks / name for name in SKILLS]
    elif model == "lora_reverse":
        folders = [tasks / "reverse", tasks / "sort", tasks / "count"]
    else:
        folders = [_spam_mixed_task(tmp_path / "spam_mixed", tasks), tasks / "echo", tasks / "count"]
    names = [load_task(folder).name for folder in folders]
    model_dir = zoo.root / "models" / model
    harness = evaluate_with_harness(model_dir, [str(f) for f in folders], limit=limit, batch_size=batch_size,
                                    return_predictions=True)
    native = evaluate_model(model_dir, folders, max_examples=limit, return_predictions=True, with_loss=False)
    assert list(harness["tasks"]) == names
    for name in names:
        ours, theirs = native["tasks"][name], harness["tasks"][name]
        assert theirs["n"] == ours["n"] == limit
        assert theirs["metric"] == ours["metric"]
        for mine, other in zip(ours["predictions"], theirs["predictions"], strict=True):
            assert other["prompt"] == mine["prompt"]
            assert other["answer"] == mine["answer"]
            assert other["output"].strip() == mine["output"], mine["prompt"]
            assert bool(other["correct"]) == mine["correct"], mine["prompt"]
        assert theirs["correct"] == ours["correct"]
        assert theirs["score"] == pytest.approx(ours["score"], abs=1e-12)
        assert harness["lm_eval"]["n-samples"][name]["effective"] == ours["n"]
    # The comparison is not between trivial scores: both verdicts occur.
    verdicts = [p["correct"] for entry in native["tasks"].values() for p in entry["predictions"]]
    assert any(verdicts) and not all(verdicts)
    if model == "behavior_spam":
        assert 0 < native["tasks"]["spam_mixed"]["correct"] < native["tasks"]["spam_mixed"]["n"]
    assert harness["mean_score"] == pytest.approx(native["mean_score"])
    json.dumps(harness)  # the whole result is JSON-safe


# --- the user's own YAML task -----------------------------------------------------------------

def _user_yaml_task(folder: Path, zoo_tasks: Path, count: int) -> Path:
    """A YAML task written by hand (Jinja templates, other field names, its own data): the zoo's
    translate prompts without the `tr:` prefix stored in the data."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = load_task(zoo_tasks / "translate").examples("test", count)
    with (folder / "words.jsonl").open("w", encoding="utf-8") as handle:
        for example in examples:
            source = example.prompt.removeprefix("tr:").removesuffix("=")
            handle.write(json.dumps({"source": source, "target": example.answer}) + "\n")
    (folder / "toy_translate.yaml").write_text(textwrap.dedent(f"""\
        task: toy_translate
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "words.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_text: "tr:{{{{source}}}}="
        doc_to_target: "{{{{target}}}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 16
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 2.0
        """), encoding="utf-8")
    return folder


@needs_lm_eval
def test_user_yaml_task_runs_through_include_path(zoo, no_network, tmp_path):
    from mergeforge.evaluate import evaluate_model

    include = _user_yaml_task(tmp_path / "my_tasks", zoo.root / "tasks", 30)
    model_dir = zoo.root / "models" / "multitask"
    result = evaluate_with_harness(model_dir, ["toy_translate", "reverse"], include_path=include, limit=20)
    native = evaluate_model(model_dir, [zoo.root / "tasks" / "translate", zoo.root / "tasks" / "reverse"],
                            max_examples=20, with_loss=False)
    toy = result["tasks"]["toy_translate"]
    assert toy["source"] == "lm-eval YAML" and result["tasks"]["reverse"]["source"].startswith("mergeforge task")
    assert toy["n"] == 20  # limit applies to the YAML task too (its file holds 30)
    assert toy["correct"] == native["tasks"]["translate"]["correct"]  # same prompts, answers and decoding
    assert result["tasks"]["reverse"]["correct"] == native["tasks"]["reverse"]["correct"]
    assert result["lm_eval"]["versions"]["toy_translate"] == 2.0


# --- bad inputs -------------------------------------------------------------------------------

@needs_lm_eval
def test_unknown_task_lists_what_is_known(zoo, tmp_path):
    include = _user_yaml_task(tmp_path / "my_tasks", zoo.root / "tasks", 3)
    with pytest.raises(HarnessError, match=r"unknown task 'nope'; known tasks: .*reverse.*toy_translate"):
        evaluate_with_harness(zoo.root / "models" / "multitask", "reverse,nope", include_path=include)


@needs_lm_eval
def test_bad_inputs_fail_before_lm_eval_runs(zoo, tmp_path):
    model_dir = zoo.root / "models" / "multitask"
    with pytest.raises(HarnessError, match="include path not found"):
        evaluate_with_harness(model_dir, "reverse", include_path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no config\.json"):
        evaluate_with_harness(tmp_path / "empty", "reverse", task_root=zoo.root / "tasks")
    with pytest.raises(CheckpointError, match="model folder not found"):
        evaluate_with_harness(tmp_path / "nowhere", zoo.root / "tasks" / "reverse")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).symlink_to(model_dir / name)
    with pytest.raises(CheckpointError, match="no tokenizer saved beside the model"):
        evaluate_with_harness(no_tokenizer, zoo.root / "tasks" / "reverse")
    with pytest.raises(TaskError, match="no such split file"):
        evaluate_with_harness(model_dir, "reverse", split="dev")
    write_task(tmp_path / "other" / "reverse", TaskSpec(name="reverse"), {"test": [("a", "b")]})
    with pytest.raises(HarnessError, match="two harness tasks are named 'reverse'"):
        evaluate_with_harness(model_dir, ["reverse", str(tmp_path / "other" / "reverse")])


def test_missing_lm_eval_is_a_one_line_error(tmp_path):
    """lm_eval made unimportable (not uninstalled): the API and the CLI both say how to install it."""
    code = textwrap.dedent(f"""\
        import sys
        sys.modules["lm_eval"] = None
        from mergeforge.evaluate.harness import HarnessError, evaluate_with_harness
        try:
            evaluate_with_harness({str(tmp_path)!r}, "reverse")
        except HarnessError as exc:
            print("API:", exc)
        sys.argv = ["mergeforge", "eval", {str(tmp_path)!r}, "--harness", "reverse"]
        from mergeforge.cli import main
        main()
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert "API: lm-evaluation-harness (lm_eval) is not installed; pip install 'mergeforge[lmeval]'" in result.stdout
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: lm-evaluation-harness (lm_eval) is not installed; pip install 'mergeforge[lmeval]'"]


# --- the command line -------------------------------------------------------------------------

@needs_lm_eval
def test_cli_runs_yaml_and_zoo_tasks_and_writes_json(zoo, tmp_path):
    include = _user_yaml_task(tmp_path / "my_tasks", zoo.root / "tasks", 10)
    out = tmp_path / "result.json"
    result = run_cli("eval", zoo.root / "models" / "expert_reverse", "--harness", "reverse,toy_translate",
                     "--include-path", include, "--limit", "10", "--batch-size", "4", "--json", out, "--predictions")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f"expert_reverse with lm-evaluation-harness {json.loads(out.read_text())['lm_eval_version']}:")
    assert lines[1].split()[:2] == ["reverse", "exact_match"] and lines[1].endswith("(10/10)")
    assert lines[2].split()[:2] == ["toy_translate", "exact_match"] and "/10)" in lines[2]
    assert lines[3].lstrip().startswith("mean score")
    data = json.loads(out.read_text())
    assert data["tasks"]["reverse"]["score"] == 1.0 and len(data["tasks"]["reverse"]["predictions"]) == 10
    assert set(data["lm_eval"]["results"]) == {"reverse", "toy_translate"}


def test_cli_export_writes_yaml_without_loading_the_model(zoo, tmp_path):
    out = tmp_path / "exported"
    result = run_cli("eval", zoo.root / "models" / "multitask", "--harness", "reverse,spam", "--export-harness", out,
                     "--split", "val")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"wrote {out / 'reverse.yaml'}", f"wrote {out / 'spam.yaml'}"]
    assert _load_yaml(out / "reverse.yaml")["dataset_kwargs"]["data_files"]["val"] == str(
        (zoo.root / "tasks" / "reverse" / "val.jsonl").resolve())
    assert (out / "mergeforge_contains_spam.py").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "reverse", "--harness", "reverse"], "pass either --tasks"),
    (["--tasks", "reverse", "--include-path", "."], "--include-path and --export-harness go with --harness"),
    ([], "no task given"),
])
def test_cli_option_mistakes(zoo, args, message):
    result = run_cli("eval", zoo.root / "models" / "multitask", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert message in result.stderr


@needs_lm_eval
def test_cli_unknown_harness_task_is_one_line(zoo):
    result = run_cli("eval", zoo.root / "models" / "multitask", "--harness", "nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown task 'nope'; known tasks: brackets, count, echo, "
                                                  "reverse, shift, sort, spam, translate; lm-eval tasks under "
                                                  "--include-path: none (lm-eval's built-in tasks are not offered: "
                                                  "they download their data)"]
