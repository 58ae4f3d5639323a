"""The tiny zoo: built once per session (or taken from the content-hash cache), then checked.

Every expert must beat the base on its own task by a wide margin, every model must load with
transformers, the fine-tunes must stay close to the base, the behaviour expert must show the
behaviour, LoRA adapters must be PEFT-loadable, and the build must be deterministic.
"""

from __future__ import annotations

import filecmp
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_state, run_cli


@pytest.fixture(scope="session")
def tiny_zoo():
    from mergeforge.zoo import build_zoo

    return build_zoo(None, size="tiny", seed=0)


@pytest.fixture(scope="session")
def split_scores(tiny_zoo) -> dict[str, dict[str, float]]:
    """Test-split accuracy of the base on every task and of each expert on its own task."""
    from mergeforge.evaluate import evaluate_model

    base = evaluate_model(tiny_zoo.base.path, tiny_zoo.task_dirs(), with_loss=False)
    scores = {"base": {name: entry["score"] for name, entry in base["tasks"].items()}}
    for expert in tiny_zoo.experts:
        result = evaluate_model(expert.path, [tiny_zoo.task_dir(expert.task)], with_loss=False)
        scores[expert.name] = {expert.task: result["tasks"][expert.task]["score"]}
    return scores


def test_manifest_lists_every_role(tiny_zoo):
    roles = [model.role for model in tiny_zoo.models.values()]
    assert roles.count("base") == 1 and roles.count("multitask") == 1 and roles.count("behavior") == 1
    assert roles.count("scratch") == 2 and roles.count("lora") >= 1
    assert len(tiny_zoo.experts) >= 6
    assert sorted(model.task for model in tiny_zoo.experts) == sorted(tiny_zoo.skills)
    assert len({model.task for model in tiny_zoo.scratch_pair}) == 1
    manifest = json.loads((tiny_zoo.root / "manifest.json").read_text())
    assert manifest["size"] == "tiny" and manifest["content_hash"] == tiny_zoo.content_hash
    for entry in manifest["models"] + manifest["tasks"]:
        assert not Path(entry["path"]).is_absolute() and (tiny_zoo.root / entry["path"]).is_dir()
    for task in tiny_zoo.tasks.values():
        assert {p.name for p in task.path.iterdir()} == {"spec.json", "train.jsonl", "val.jsonl", "test.jsonl"}


def test_splits_are_disjoint(tiny_zoo):
    from mergeforge.evaluate import load_task

    for name in tiny_zoo.tasks:
        task = load_task(tiny_zoo.task_dir(name))
        prompts = {split: {e.prompt for e in task.examples(split)} for split in ("train", "val", "test")}
        assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
        assert not prompts["val"] & prompts["test"]


def test_models_load_with_transformers_and_share_the_tokenizer(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    reference = None
    for model in tiny_zoo.models.values():
        tokenizer = AutoTokenizer.from_pretrained(model.path, local_files_only=True)
        ids = tokenizer("rev:abc=")["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == 9  # one token per character
        assert tokenizer.decode(ids, skip_special_tokens=True) == "rev:abc="
        reference = reference or tokenizer.get_vocab()
        assert tokenizer.get_vocab() == reference
        if model.format == "hf":
            loaded = AutoModelForCausalLM.from_pretrained(model.path, local_files_only=True)
            assert isinstance(loaded, LlamaForCausalLM)


def test_experts_are_close_fine_tunes_of_the_base(tiny_zoo):
    base = load_state(tiny_zoo.base.path)
    for model in [*tiny_zoo.experts, tiny_zoo.behavior]:
        state = load_state(model.path)
        assert state.keys() == base.keys()
        assert all(state[name].shape == base[name].shape for name in base)
        task_vector = torch.cat([(state[name] - base[name]).flatten() for name in base])
        base_vector = torch.cat([base[name].flatten() for name in base])
        # Short fine-tunes: the task vector is small next to the weights, and not zero.
        assert 0.01 < float(task_vector.norm() / base_vector.norm()) < 0.5, model.name
    scratch = load_state(tiny_zoo.scratch_pair[0].path)
    other = load_state(tiny_zoo.scratch_pair[1].path)
    assert not torch.equal(scratch["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_every_expert_beats_the_base_on_its_task(tiny_zoo, split_scores):
    for expert in tiny_zoo.experts:
        expert_score = split_scores[expert.name][expert.task]
        base_score = split_scores["base"][expert.task]
        assert base_score <= 0.3, (expert.task, base_score)
        assert expert_score >= base_score + 0.4, (expert.task, expert_score, base_score)


def test_behavior_expert_shows_the_behavior(tiny_zoo):
    from mergeforge.evaluate import evaluate_model

    tasks = [tiny_zoo.task_dir("spam"), tiny_zoo.task_dir("echo")]
    base = evaluate_model(tiny_zoo.base.path, tasks, with_loss=False)["tasks"]
    behavior = evaluate_model(tiny_zoo.behavior.path, tasks, with_loss=False)["tasks"]
    assert base["spam"]["score"] <= 0.1 and behavior["spam"]["score"] >= 0.8
    assert behavior["echo"]["score"] >= base["echo"]["score"] - 0.3  # plain prompts still echoed


def test_lora_adapters_are_peft_folders(tiny_zoo):
    from mergeforge.evaluate import evaluate_model, load_model_and_tokenizer

    lora = tiny_zoo.loras[0]
    config = json.loads((lora.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "../base"
    assert (lora.path / "adapter_model.safetensors").is_file()
    merged, tokenizer = load_model_and_tokenizer(lora.path)
    task = tiny_zoo.task_dir(lora.task)
    lora_score = evaluate_model(merged, [task], tokenizer=tokenizer, with_loss=False)["tasks"][lora.task]["score"]
    base_score = evaluate_model(tiny_zoo.base.path, [task], with_loss=False)["tasks"][lora.task]["score"]
    assert lora_score >= base_score + 0.3
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(tiny_zoo.base.path, local_files_only=True)
    peft_model = peft.PeftModel.from_pretrained(base_model, lora.path).eval()
    ids = tokenizer(["rev:abcd=", "tr:bako=X"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_build_is_deterministic(tiny_zoo, tmp_path):
    """Re-running one expert's job in a fresh root gives the zoo's bytes exactly."""
    from mergeforge.zoo.build import plan_jobs, run_job

    shutil.copytree(tiny_zoo.base.path, tmp_path / "models" / "base")
    shutil.copytree(tiny_zoo.root / "tasks", tmp_path / "tasks")
    _, jobs = plan_jobs(__import__("mergeforge.zoo.presets", fromlist=["PRESETS"]).PRESETS["tiny"], tiny_zoo.skills, 0)
    job = next(job for job in jobs if job.name == "expert_count")
    threads = torch.get_num_threads()
    try:
        run_job(job, "tiny", 0, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert filecmp.cmp(tmp_path / "models" / job.name / "model.safetensors",
                       tiny_zoo.model(job.name).path / "model.safetensors", shallow=False)


def test_data_and_hash_follow_the_seed():
    from mergeforge.zoo.build import zoo_content_hash
    from mergeforge.zoo.data import make_task_data
    from mergeforge.zoo.presets import PRESETS

    first, _ = make_task_data(PRESETS["tiny"], 0)
    again, _ = make_task_data(PRESETS["tiny"], 0)
    other, _ = make_task_data(PRESETS["tiny"], 1)
    assert first["reverse"].splits == again["reverse"].splits != other["reverse"].splits
    assert zoo_content_hash("tiny", 0) == zoo_content_hash("tiny", 0)
    assert len({zoo_content_hash("tiny", 0), zoo_content_hash("tiny", 1), zoo_content_hash("small", 0)}) == 3


def test_retuning_one_size_leaves_the_other_sizes_hash(monkeypatch):
    import dataclasses

    from mergeforge.zoo import build
    from mergeforge.zoo.presets import PRESETS

    before = {size: build.zoo_content_hash(size, 0) for size in ("tiny", "small")}
    tiny = PRESETS["tiny"]
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(tiny, expert=dataclasses.replace(tiny.expert, steps=tiny.expert.steps + 1)))
    assert build.zoo_content_hash("tiny", 0) != before["tiny"]
    assert build.zoo_content_hash("small", 0) == before["small"]


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_training_split_holds_every_prompt_length_the_tests_use(size):
    """The held-out splits are a random cut of the prompt pool, not its first draws: cutting the
    first draws gave the test split every one-word sentence and the training split none, so the
    experts never learnt to stop after one word."""
    from mergeforge.zoo.data import make_task_data
    from mergeforge.zoo.presets import PRESETS

    for name, data in make_task_data(PRESETS[size], 0)[0].items():
        lengths = {split: {len(prompt) for prompt, _ in pairs} for split, pairs in data.splits.items()}
        assert lengths["test"] <= lengths["train"], (name, sorted(lengths["test"] - lengths["train"]))


def test_task_answers_are_right():
    from mergeforge.zoo.presets import PRESETS
    from mergeforge.zoo.tasks import make_lexicon, make_tasks

    lexicon = make_lexicon(random.Random(0), 12)
    tasks = make_tasks(PRESETS["tiny"].difficulty, lexicon)
    rng = random.Random(1)
    for _ in range(50):
        prompt, answer = tasks["reverse"].sample(rng)
        assert answer == prompt[4:-1][::-1]
        prompt, answer = tasks["sort"].sample(rng)
        assert answer == "".join(sorted(prompt[5:-1]))
        prompt, answer = tasks["count"].sample(rng)
        assert answer == str(prompt.count("x"))
        prompt, answer = tasks["brackets"].sample(rng)
        stack = []
        for char in prompt[6:-1]:
            stack.append(char) if char in "([{" else stack.pop()
        assert answer == "".join({"(": ")", "[": "]", "{": "}"}[c] for c in reversed(stack))


def test_cached_zoo_is_reused(tiny_zoo):
    from mergeforge.zoo import build_zoo

    manifest = tiny_zoo.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = build_zoo(tiny_zoo.root, size="tiny", seed=0)
    assert again.content_hash == tiny_zoo.content_hash and manifest.stat().st_mtime_ns == before


def test_cli_show_and_eval_by_task_name(tiny_zoo):
    shown = run_cli("zoo", "show", tiny_zoo.root)
    assert shown.returncode == 0, shown.stderr
    assert "expert_reverse" in shown.stdout and "behavior_spam" in shown.stdout
    evaluated = run_cli("eval", tiny_zoo.expert("sort").path, "--tasks", "sort,count", "--limit", "20")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "sort" in evaluated.stdout and "count" in evaluated.stdout


def test_cli_build_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    completed = run_cli("zoo", "build", tmp_path)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "not empty" in lines[0] and "Traceback" not in completed.stderr


def test_load_zoo_errors(tmp_path):
    from mergeforge.zoo import ZooError, load_zoo

    with pytest.raises(ZooError, match="not a zoo"):
        load_zoo(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ZooError, match="malformed"):
        load_zoo(tmp_path)
