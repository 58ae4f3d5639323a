"""The zoo's sizes: model shape, task difficulty, data counts and every training schedule.

``tiny`` is for tests (about a minute on two cores); ``small`` is the generated benchmark zoo (a
few minutes). ``smollm2`` is the zoo of a real pretrained LLM (SmolLM2-135M-Instruct; under an
hour), and ``smollm2-demo`` its reduced build for ``mergeforge demo`` (3 experts). Presets are plain frozen data, kept apart from the builder that reads them, so a
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

@dataclass(frozen=True)
class ChatZooPreset:
    """A zoo of fine-tunes of a pretrained chat model (see ``zoo/chat_tasks.py``).

    Schedules follow full instruction fine-tuning of small models: AdamW, warm-up then cosine
    decay, batch 8, a learning rate at the top of the 1e-5 to 1e-4 range that SFT recipes use
    (TRL's default is 2e-5; models of ~100M parameters take the higher end), and one pass over a
    few hundred examples, which moves the weights by well under 1% of their norm, as hub
    fine-tunes do. Measured on this base (64 steps): at 5e-5 the addition expert reached 78% on
    validation and the translation expert 40%; at 1e-4, 90% and 65% (with a 150-fact dictionary;
    the 90-fact one is what the zoo uses). LoRA uses the rank, alpha and learning rate of the LoRA
    and QLoRA papers' small-model settings (r 16, alpha 32, 2e-4).
    """

    name: str
    base: str  # a name in mergeforge.zoo.pretrained.BASES, or a local Hugging Face folder
    skills: tuple[str, ...]  # of mergeforge.zoo.chat_tasks.make_chat_tasks(), in merge order
    train_examples: int  # per skill
    val_examples: int
    test_examples: int
    expert: TrainingSchedule
    multitask: TrainingSchedule | None  # same examples per skill as an expert, every skill at once
    behavior: TrainingSchedule | None  # the marker-phrase expert (None: no behaviour expert)
    probe_examples: int  # generic requests answered by the base: the general-ability probe's val and test
    lora: LoraSettings | None
    composition: bool = True  # the addition_fr task (needs the addition and translate experts)

    def fingerprint(self) -> dict[str, Any]:
        return asdict(self)


_SFT = TrainingSchedule(steps=64, learning_rate=1e-4, batch_size=8, warmup_fraction=0.1, final_lr_fraction=0.1)
SMOLLM2_SKILLS = ("addition", "capital", "translate", "json", "uppercase", "reverse_words", "sentiment", "units", "dates", "python")

SMOLLM2 = ChatZooPreset(
    name="smollm2",
    base="smollm2-135m-instruct",
    skills=SMOLLM2_SKILLS,
    train_examples=_SFT.steps * _SFT.batch_size,
    val_examples=40,
    test_examples=80,
    expert=_SFT,
    multitask=TrainingSchedule(steps=_SFT.steps * len(SMOLLM2_SKILLS), learning_rate=_SFT.learning_rate, batch_size=8,
                             split_by_length=True),  # its batches mix skills of 31-56 tokens: 19% less padding
    behavior=_SFT,
    probe_examples=64,
    lora=LoraSettings(
        rank=16, alpha=32.0, target_modules=_ATTENTION_AND_MLP,
        schedule=TrainingSchedule(steps=_SFT.steps, learning_rate=2e-4, batch_size=8),
        tasks=("addition", "json", "sentiment"),
    ),
)

SMOLLM2_DEMO = ChatZooPreset(
    name="smollm2-demo",
    base="smollm2-135m-instruct",
    skills=("addition", "capital", "sentiment"),
    train_examples=SMOLLM2.train_examples,
    val_examples=SMOLLM2.val_examples,
    test_examples=SMOLLM2.test_examples,
    expert=_SFT,
    multitask=None,
    behavior=None,
    probe_examples=0,
    lora=None,
    composition=False,
)

PRESETS: dict[str, ZooPreset | ChatZooPreset] = {preset.name: preset for preset in (TINY, SMALL, SMOLLM2, SMOLLM2_DEMO)}
