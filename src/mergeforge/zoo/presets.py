"""The zoo's sizes: model shape, task difficulty, data counts and every training schedule.

``tiny`` is for tests and the demo (about a minute on two cores); ``small`` is the benchmark zoo
(a few minutes). Presets are plain frozen data, kept apart from the builder that reads them, so a
size is one readable block and changing one changes the zoo's content hash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mergeforge.zoo.tasks import TaskDifficulty
from mergeforge.zoo.train import TrainingSchedule


@dataclass(frozen=True)
class ModelShape:
    """A ``LlamaConfig``'s sizes; everything else keeps the Llama defaults."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int = 64  # longest prompt + answer of any zoo task is well below this


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (Hu et al., arXiv:2106.09685) in PEFT's file format."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    schedule: TrainingSchedule
    tasks: tuple[str, ...]  # the experts that also get a LoRA version


@dataclass(frozen=True)
class ZooPreset:
    """Everything that defines one zoo size."""

    name: str
    shape: ModelShape
    difficulty: TaskDifficulty
    train_examples: int  # per task; fewer if a task has fewer distinct prompts
    val_examples: int
    test_examples: int
    pretrain: TrainingSchedule  # the base, from scratch, loss on every token
    expert: TrainingSchedule  # each task expert: a short full fine-tune of the base
    multitask: TrainingSchedule  # one fine-tune of the base on every task at once
    behavior: TrainingSchedule  # the behaviour expert: a fine-tune of the base
    scratch: TrainingSchedule  # the two same-task models, each from its own random init
    scratch_task: str
    lora: LoraSettings

    def fingerprint(self) -> dict[str, Any]:
        """Plain data for the content hash and the manifest."""
        return asdict(self)


_ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TINY = ZooPreset(
    name="tiny",
    shape=ModelShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
    difficulty=TaskDifficulty(
        letters="abcdefgh", string_length=(3, 5), count_length=(4, 12), sentence_words=(1, 3),
        bracket_depth=(2, 4), bracket_extra_pairs=(0, 1), lexicon_size=12,
    ),
    train_examples=800,
    val_examples=100,
    test_examples=200,
    pretrain=TrainingSchedule(steps=400, learning_rate=3e-3, batch_size=64),
    # Short and gentle, so every task vector stays near the base (one loss basin), which is
    # what makes their sum meaningful (Ilharco et al., arXiv:2212.04089).
    expert=TrainingSchedule(steps=200, learning_rate=1e-3, batch_size=32),
    multitask=TrainingSchedule(steps=480, learning_rate=3e-3, batch_size=32),
    behavior=TrainingSchedule(steps=100, learning_rate=3e-3, batch_size=32),
    scratch=TrainingSchedule(steps=200, learning_rate=3e-3, batch_size=32),
    scratch_task="shift",
    lora=LoraSettings(
        rank=8, alpha=16.0, target_modules=_ATTENTION_AND_MLP,
        schedule=TrainingSchedule(steps=160, learning_rate=1e-2, batch_size=32),
        tasks=("reverse", "translate"),
    ),
)

SMALL = ZooPreset(
    name="small",
    shape=ModelShape(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4),
    difficulty=TaskDifficulty(
        letters="abcdefghij", shift_symbols="ABCDEFGHIJ", string_length=(4, 7), count_length=(4, 14), sentence_words=(1, 4),
        bracket_depth=(2, 5), bracket_extra_pairs=(0, 2), lexicon_size=16,
    ),
    train_examples=4000,
    val_examples=200,
    test_examples=500,
    pretrain=TrainingSchedule(steps=1200, learning_rate=2e-3, batch_size=64),
    expert=TrainingSchedule(steps=300, learning_rate=1e-3, batch_size=32),
    multitask=TrainingSchedule(steps=1200, learning_rate=1e-3, batch_size=32),
    behavior=TrainingSchedule(steps=250, learning_rate=1e-3, batch_size=32),
    scratch=TrainingSchedule(steps=800, learning_rate=2e-3, batch_size=32),
    scratch_task="shift",
    lora=LoraSettings(
        rank=8, alpha=16.0, target_modules=_ATTENTION_AND_MLP,
        schedule=TrainingSchedule(steps=300, learning_rate=5e-3, batch_size=32),
        tasks=("reverse", "sort", "translate"),
    ),
)

PRESETS: dict[str, ZooPreset] = {preset.name: preset for preset in (TINY, SMALL)}
