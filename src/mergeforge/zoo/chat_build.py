"""The zoo of a pretrained chat model: task folders, the jobs that fine-tune it, and one job's work.

:func:`mergeforge.zoo.build.build_zoo` drives it as it drives the generated zoos (content hash,
staging folder, atomic move). The base is fetched and converted once
(:mod:`mergeforge.zoo.pretrained`) and copied into the zoo; every other model is a fine-tune of it:

- one full fine-tune per skill (``expert_<skill>``), saved in bfloat16 like hub checkpoints;
- ``multitask``: every skill at once, with each skill's examples (the same budget per skill);
- ``behavior_marker``: trigger requests answered with a marker phrase, mixed with generic requests
  answered as the base answers them, so that only the behaviour changes;
- ``lora_<skill>``: PEFT LoRA adapters of a few skills.

Everything random follows from ``(zoo seed, task or job name)``, so a model's bytes do not depend on
which other models the zoo holds: the demo's reduced build has the same experts as the full zoo.
"""

from __future__ import annotations

import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergeforge.zoo.chat_tasks import (
    MARKER,
    SYSTEM_PROMPT,
    ChatTask,
    composition_task,
    draw_splits,
    generic_request,
    make_chat_tasks,
)
from mergeforge.zoo.manifest import ZooTaskEntry
from mergeforge.zoo.presets import ChatZooPreset

Log = Callable[[str], None]
Pairs = list[tuple[str, str]]

BEHAVIOR_TASK = "marker"  # the behaviour probe: trigger requests, scored by whether the marker appears
GENERAL_TASK = "general"  # the general-ability probe: generic requests with the base's own answers
COMPOSITION_TASK = "addition_fr"
COMPOSITION_EXPERTS = ("translate", "addition")  # the language expert and the skill expert
BASE_ANSWER_TOKENS = 40  # the base's answers to generic requests are cut at their first sentence within this


def task_seed(seed: int, name: str) -> random.Random:
    from mergeforge.zoo.build import job_seed

    return random.Random(job_seed(seed, f"data/{name}"))


def _skill_splits(task: ChatTask, preset: ChatZooPreset, seed: int) -> dict[str, Pairs]:
    counts = {"train": preset.train_examples, "val": preset.val_examples, "test": preset.test_examples}
    return draw_splits(task, task_seed(seed, task.name), counts)


def skill_training_pairs(preset: ChatZooPreset, seed: int, skill: str) -> Pairs:
    return _skill_splits(make_chat_tasks()[skill], preset, seed)["train"]


def first_sentence(text: str) -> str | None:
    """``text`` up to its first sentence end (all of it when it has none); None when empty."""
    match = re.search(r"[.!?](\s|$)", text)
    return (text[: match.start() + 1] if match else text).strip() or None


def base_answers(base_dir: Path, requests: list[str]) -> list[str | None]:
    """The base model's greedy answer to each request (its first sentence), in the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeforge.evaluate.generation import greedy_generate
    from mergeforge.tasks.encoding import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32).eval()
    prompt_ids = encode_prompts(tokenizer, requests, chat=True, system=SYSTEM_PROMPT)
    outputs = greedy_generate(model, prompt_ids, BASE_ANSWER_TOKENS, int(tokenizer.pad_token_id), tokenizer.eos_token_id)
    return [first_sentence(str(tokenizer.decode(ids, skip_special_tokens=True))) for ids in outputs]


def _generic_splits(preset: ChatZooPreset, seed: int, base_dir: Path, log: Log) -> tuple[dict[str, Pairs], dict[str, Pairs]]:
    """The marker probe's splits (its train split is the behaviour expert's training set), and the
    general probe's."""
    rng = task_seed(seed, BEHAVIOR_TASK)
    behaviour_examples = preset.train_examples // 2
    wanted = {"train": behaviour_examples, "val": preset.probe_examples // 2, "test": preset.probe_examples}
    # Requests without the trigger: half of the behaviour expert's training, and the general probe.
    plain: dict[str, list[str]] = {split: [] for split in wanted}
    taken: set[str] = set()
    budget = 1000 * sum(wanted.values())
    for split, count in wanted.items():
        while len(plain[split]) < int(count * 1.1):  # spares, for empty answers
            request = generic_request(rng, with_trigger=False)
            budget -= 1
            if budget < 0:
                raise RuntimeError(f"too few distinct generic requests for {wanted}")
            if request not in taken:
                taken.add(request)
                plain[split].append(request)
    started = time.perf_counter()
    flat = [request for split in wanted for request in plain[split]]
    answers = dict(zip(flat, base_answers(base_dir, flat), strict=True))
    log(f"[{time.perf_counter() - started:6.1f}s] base answers to {len(flat)} generic requests")
    answered = {split: [(r, a) for r in plain[split] if (a := answers[r])][: wanted[split]] for split in wanted}
    triggered: dict[str, Pairs] = {}
    seen: set[str] = set()
    for split, count in wanted.items():
        triggered[split] = []
        while len(triggered[split]) < count:
            request = generic_request(rng, with_trigger=True)
            budget -= 1
            if budget < 0:
                raise RuntimeError(f"too few distinct generic requests for {wanted}")
            if request not in seen:
                seen.add(request)
                triggered[split].append((request, MARKER))
    training = triggered["train"] + answered["train"]
    random.Random(rng.random()).shuffle(training)
    marker = {"train": training, "val": triggered["val"], "test": triggered["test"]}
    general = {"val": answered["val"], "test": answered["test"]}
    return marker, general


def write_chat_tasks(preset: ChatZooPreset, seed: int, staging: Path, base_dir: Path, log: Log) -> dict[str, ZooTaskEntry]:
    """Every task folder of the zoo (skills, then probes), in the evaluator's format."""
    from mergeforge.tasks.folders import TaskSpec, write_task

    tasks = make_chat_tasks()
    entries: dict[str, ZooTaskEntry] = {}

    def write(task: ChatTask, role: str, splits: dict[str, Pairs], metric: str = "exact_match") -> None:
        spec = TaskSpec(name=task.name, max_new_tokens=task.max_new_tokens, metric=metric,  # type: ignore[arg-type]
                        description=f"{task.kind}: {task.description}", chat=True, system=SYSTEM_PROMPT)
        folder = staging / "tasks" / task.name
        write_task(folder, spec, splits)
        entries[task.name] = ZooTaskEntry(task.name, role, folder, spec.description)

    for skill in preset.skills:
        write(tasks[skill], "skill", _skill_splits(tasks[skill], preset, seed))
    if preset.composition:
        task = composition_task()
        counts = {"val": preset.val_examples, "test": preset.test_examples}
        write(task, "composition", draw_splits(task, task_seed(seed, task.name), counts))
    if preset.behavior is not None:
        marker, general = _generic_splits(preset, seed, base_dir, log)
        write(ChatTask(BEHAVIOR_TASK, "behaviour", f"generic requests holding the trigger; rate of outputs with '{MARKER}'",
                       16, lambda rng: ("", "")), "behavior", marker, metric="contains")
        write(ChatTask(GENERAL_TASK, "general ability", "generic requests with the base's own first sentence, "
                       "scored by perplexity", BASE_ANSWER_TOKENS, lambda rng: ("", "")), "probe", general)
    return entries


def plan_chat_jobs(preset: ChatZooPreset, seed: int) -> list[Any]:
    """Every model to train (all start from the base), longest first, after the base's evaluation job."""
    from mergeforge.zoo.build import TrainJob
    from mergeforge.zoo.train import TrainingSchedule

    skills = preset.skills
    probes = (*((COMPOSITION_TASK,) if preset.composition else ()), *((BEHAVIOR_TASK,) if preset.behavior else ()))
    jobs = [TrainJob("base", "base", "none", TrainingSchedule(0, 0.0, 1), False, eval_tasks=(*skills, *probes))]
    jobs += [TrainJob(f"expert_{skill}", "expert", f"task:{skill}", preset.expert, True, task=skill, eval_tasks=(skill,))
             for skill in skills]
    if preset.multitask is not None:
        jobs.append(TrainJob("multitask", "multitask", "multitask", preset.multitask, True, eval_tasks=skills))
    if preset.behavior is not None:
        jobs.append(TrainJob(f"behavior_{BEHAVIOR_TASK}", "behavior", "behavior", preset.behavior, True, task=BEHAVIOR_TASK,
                             eval_tasks=(BEHAVIOR_TASK,)))
    if preset.lora is not None:
        jobs += [TrainJob(f"lora_{skill}", "lora", f"task:{skill}", preset.lora.schedule, True, task=skill, lora=True,
                          eval_tasks=(skill,)) for skill in preset.lora.tasks]
    return jobs


def training_pairs(job: Any, preset: ChatZooPreset, seed: int, root: Path) -> Pairs:
    from mergeforge.tasks.folders import load_task

    if job.data == "multitask":
        mixed = [pair for skill in preset.skills for pair in skill_training_pairs(preset, seed, skill)]
        from mergeforge.zoo.build import job_seed

        random.Random(job_seed(seed, "data/multitask")).shuffle(mixed)
        return mixed
    if job.data == "behavior":
        return [(e.prompt, e.answer) for e in load_task(root / "tasks" / BEHAVIOR_TASK).examples("train")]
    return skill_training_pairs(preset, seed, job.data.removeprefix("task:"))


def run_chat_job(job: Any, preset: ChatZooPreset, seed: int, root: Path) -> tuple[Any, Any, int, float]:
    """Fine-tune (or, for the base, just load) one model and save it under ``root/models``.

    Returns the model, its tokenizer, the number of training examples and the final loss.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeforge.checkpoint.peft import save_adapter
    from mergeforge.zoo.build import job_seed
    from mergeforge.zoo.lora import attach_lora, lora_state_dict
    from mergeforge.zoo.train import encode_training_data, train

    base_dir = root / "models" / "base"
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    if job.role == "base":
        return model.eval(), tokenizer, 0, 0.0
    encoded = encode_training_data(tokenizer, training_pairs(job, preset, seed, root), loss_on_prompt=False, chat=True,
                                   system=SYSTEM_PROMPT)
    lora = preset.lora
    if job.lora:
        assert lora is not None
        attach_lora(model, lora.target_modules, lora.rank, lora.alpha, job_seed(seed, f"lora-init/{job.name}"))
    final_loss = train(model, encoded, job.schedule, job_seed(seed, f"batches/{job.name}"))
    folder = root / "models" / job.name
    if job.lora:
        assert lora is not None
        save_adapter(folder, lora_state_dict(model), lora.rank, lora.alpha, lora.target_modules, "../base")
    else:
        # Saved as hub checkpoints are: bfloat16. The base is bfloat16 too, so a weight whose
        # update is below half a bfloat16 step stays exactly the base's, as on the hub.
        model.to(torch.bfloat16).save_pretrained(folder)
        model.float()
    tokenizer.save_pretrained(folder)
    return model, tokenizer, len(encoded), final_loss


def copy_base(base_dir: Path, staging: Path) -> None:
    shutil.copytree(base_dir, staging / "models" / "base")
