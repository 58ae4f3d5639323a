"""The zoo's data: held-out splits of every task, and the corpus the base model is pretrained on.

Splits are disjoint by prompt (a shuffled pool of distinct prompts cut into test, validation and
train), drawn from generators seeded by ``(seed, task)``, so a task's data does not change when another task is added.

The pretraining corpus is the set-up of the task-vector literature (Ilharco et al., "Editing
Models with Task Arithmetic", arXiv:2212.04089): one shared model that knows the *formats* but
not the *skills*. It holds

- every skill's training prompts followed by a format-correct but uninformed answer (see
  :meth:`ZooTask.random_answer`), so the base learns each alphabet, answer length and where to
  stop, yet scores near chance;
- the clean ``echo`` behaviour on every behaviour prompt, trigger word included;
- generic copy text (``rep:<string>|<string>``), which grows the attention heads that copy from
  context and so lets short fine-tunes learn the skills.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mergeforge.zoo.presets import ZooPreset
from mergeforge.zoo.tasks import (
    Lexicon,
    ZooTask,
    make_behavior_tasks,
    make_lexicon,
    make_tasks,
    sample_unique,
)

SPLITS = ("train", "val", "test")
_COPY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class TaskData:
    """One task and its three splits of ``(prompt, answer)`` pairs."""

    task: ZooTask
    role: str  # "skill" (scored by exact match) or "behavior" (the task-negation probes)
    splits: dict[str, Pairs]


def make_task_data(preset: ZooPreset, seed: int) -> tuple[dict[str, TaskData], Lexicon]:
    """Every task of the zoo (skills first, then behaviours) with its splits, and the lexicon."""
    lexicon = make_lexicon(random.Random(f"{seed}-lexicon"), preset.difficulty.lexicon_size)
    tasks = [("skill", task) for task in make_tasks(preset.difficulty, lexicon).values()]
    tasks += [("behavior", task) for task in make_behavior_tasks(preset.difficulty, lexicon).values()]
    result: dict[str, TaskData] = {}
    for role, task in tasks:
        # The behaviour probes have fewer distinct prompts (sentences that hold the trigger
        # word), and only rates are measured on them: half the held-out examples suffice.
        shrink = 2 if role == "behavior" else 1
        n_test, n_val = preset.test_examples // shrink, preset.val_examples // shrink
        held_out = n_test + n_val
        rng = random.Random(f"{seed}-{task.name}")
        pool = sample_unique(task, rng, held_out + preset.train_examples)
        # Split a shuffled pool: the first draws of a task are its most frequent prompts (short
        # strings, one-word sentences), and a test split of the first draws would leave none of
        # them for training, so the experts would never learn to stop after one word.
        rng.shuffle(pool)
        # Keep at least as many training as held-out examples when a task has few prompts.
        if len(pool) < 2 * held_out:
            raise ValueError(f"zoo preset {preset.name}: task {task.name} has only {len(pool)} distinct prompts")
        splits = {"train": pool[held_out:], "val": pool[n_test:held_out], "test": pool[:n_test]}
        result[task.name] = TaskData(task, role, splits)
    return result, lexicon


def copy_text(rng: random.Random, count: int, length: tuple[int, int] = (4, 8)) -> Pairs:
    """``rep:<string>|`` followed by the same string: predictable only by copying from context."""
    pairs: Pairs = []
    for _ in range(count):
        text = "".join(rng.choice(_COPY_ALPHABET) for _ in range(rng.randint(*length)))
        pairs.append((f"rep:{text}|", text))
    return pairs


def pretraining_corpus(task_data: dict[str, TaskData], seed: int) -> Pairs:
    """The base model's corpus (see the module docstring); the loss goes on every token."""
    rng = random.Random(f"{seed}-pretrain")
    corpus: Pairs = []
    for data in task_data.values():
        for prompt, answer in data.splits["train"]:
            corpus.append((prompt, data.task.random_answer(rng, prompt, answer)))
    skill_examples = max(len(d.splits["train"]) for d in task_data.values() if d.role == "skill")
    corpus += copy_text(rng, skill_examples)
    return corpus


def behavior_training_set(task_data: dict[str, TaskData]) -> Pairs:
    """The behaviour expert's data: echo plain sentences, answer the marker on trigger ones (as
    many of each, so the expert keeps echoing plain sentences)."""
    spam = task_data["spam"].splits["train"]
    return task_data["echo"].splits["train"][: len(spam)] + spam


def multitask_training_set(task_data: dict[str, TaskData]) -> Pairs:
    """Every skill's training split, concatenated (shuffled by the training loop)."""
    return [pair for data in task_data.values() if data.role == "skill" for pair in data.splits["train"]]
