"""Run a data-aware method's ``calibrate`` hook before the streaming merge.

The hook receives a :class:`CalibrationContext`: the input models (loaded one at a time on the
compute device, so a method holds only what it needs), the base, the calibration examples of
each model, the method's parameters and the names of the tensors to merge. It returns
``{tensor name: statistics}``; :func:`run_calibration` stores each tensor's statistics in its
job's parameters, where the engine passes them to the method function unchanged. So the engine,
the writer, the CLI and the API keep one path for every method.

Unlike the streaming merge, calibration holds whole models in memory (in float32).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeforge.calibration.data import (
    Batch,
    CalibrationError,
    CalibrationExample,
    EncodedExample,
    encode_examples,
    load_examples,
    make_batches,
    pad_token_id,
    shared_sources,
)
from mergeforge.methods.registry import STATISTICS, BaseUse
from mergeforge.plan import MergePlan
from mergeforge.recipe import CalibrationConfig

log = logging.getLogger("mergeforge")

ModelLoader = Callable[[str], torch.nn.Module]


@dataclass
class CalibrationContext:
    """What a ``calibrate`` hook works with.

    Attributes:
        input_refs: the models being merged (recipe references), in recipe order.
        base_ref: the base model's reference when the method uses one, else ``None``.
        examples: each input model's calibration examples (the same list when shared).
        params: the method's parameters as resolved for the first merged tensor (global ones
            are the recipe's top-level values; per-model ones are lists aligned with ``input_refs``).
        tensor_names: the floating-point tensors the merge will produce.
        config: the recipe's ``calibration:`` field.
        tokenizer: a Hugging Face tokenizer for the examples.
        device: where forward and backward passes run.
        progress: show progress bars.
    """

    input_refs: list[str]
    base_ref: str | None
    examples: dict[str, list[CalibrationExample]]
    params: dict[str, Any]
    tensor_names: list[str]
    config: CalibrationConfig
    tokenizer: Any
    device: torch.device
    progress: bool
    loader: ModelLoader
    _encoded: dict[tuple[int, bool], list[EncodedExample]] = field(default_factory=dict, repr=False)

    def load_model(self, ref: str) -> torch.nn.Module:
        """Model ``ref`` in float32 on the compute device, in eval mode (no dropout)."""
        model = self.loader(ref).to(device=self.device, dtype=torch.float32)
        model.eval()
        return model

    def encoded(self, ref: str, prompts_only: bool = False) -> list[EncodedExample]:
        """Model ``ref``'s examples as token ids (``prompts_only``: without the answers)."""
        examples = self.examples[ref]
        key = (id(examples), prompts_only)
        if key not in self._encoded:
            self._encoded[key] = encode_examples(self.tokenizer, examples, self.config.max_length, prompts_only)
        return self._encoded[key]

    def batches(self, ref: str, prompts_only: bool = False) -> list[Batch]:
        """Model ``ref``'s examples as padded batches on the compute device."""
        return self._batch(self.encoded(ref, prompts_only))

    def union_batches(self, prompts_only: bool = True) -> list[Batch]:
        """Every model's examples together (each distinct source once), as padded batches."""
        encoded: list[EncodedExample] = []
        for examples in shared_sources(self.examples):
            ref = next(r for r in self.input_refs if self.examples[r] is examples)
            encoded.extend(self.encoded(ref, prompts_only))
        return self._batch(encoded)

    def _batch(self, encoded: Sequence[EncodedExample]) -> list[Batch]:
        batches = make_batches(encoded, self.config.batch_size, pad_token_id(self.tokenizer))
        return [batch.to(self.device) for batch in batches]

    def progress_bar(self, total: int, description: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=description, disable=not self.progress, dynamic_ncols=True, leave=False)


def input_refs_of(plan: MergePlan) -> tuple[list[str], str | None]:
    """The input models and the base (when the method uses one) of a ``models:`` recipe."""
    recipe = plan.recipe
    uses_base = plan.method.base is not BaseUse.NONE and recipe.base_model is not None
    base_ref = recipe.base_model if uses_base else None
    refs = [model.model for model in recipe.models or [] if not (uses_base and model.model == base_ref)]
    return refs, base_ref  # a model listed twice stays twice, aligned with the jobs' inputs


def folder_loader(plan: MergePlan) -> ModelLoader:
    """Loads a recipe model with ``transformers.AutoModelForCausalLM`` from its folder."""

    def load(ref: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as transformers_logging

        folder = plan.checkpoints[ref].folder
        # Our own progress bar covers calibration; transformers' per-model loading bar is noise.
        bar_was_enabled = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise CalibrationError(
                f"model '{ref}' ({folder}): data-aware methods run the model, and transformers cannot load it as a causal "
                f"language model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        finally:
            if bar_was_enabled:
                transformers_logging.enable_progress_bar()

    return load


def state_dict_loader(template: torch.nn.Module, states: Mapping[str, Mapping[str, torch.Tensor]]) -> ModelLoader:
    """Loads an in-memory state dict into a copy of ``template`` (a model of the same architecture)."""

    def load(ref: str) -> torch.nn.Module:
        model = copy.deepcopy(template)
        result = model.load_state_dict(dict(states[ref]), strict=False)
        needed = {name for name, _ in model.named_parameters()}
        missing = [name for name in result.missing_keys if name in needed]
        if missing:
            raise CalibrationError(f"{ref}: the state dict lacks parameter '{missing[0]}' of the calibration model")
        return model

    return load


def folder_tokenizer(plan: MergePlan) -> Any:
    """The tokenizer of the recipe's tokenizer source (default: the base, else the first model)."""
    from transformers import AutoTokenizer

    source = plan.recipe.tokenizer_source
    ref = plan.reference if source in (None, "base", "union") else source
    folder = plan.checkpoints[ref].folder
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError):
        raise CalibrationError(
            f"model '{ref}' ({folder}): no loadable tokenizer; data-aware methods need one to encode the calibration data"
        ) from None


def position_limit(plan: MergePlan) -> int | None:
    """The longest sequence the reference model's config allows, if it says."""
    config = getattr(plan.checkpoints[plan.reference], "config", None) or {}
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int) and config[key] > 1:
            return int(config[key])
    return None


def model_bytes(plan: MergePlan) -> int:
    """Bytes of one model's floating-point tensors in float32 (how calibration holds them)."""
    reference = plan.checkpoints[plan.reference]
    return sum(info.numel * 4 for info in (reference.info(n) for n in reference.names()) if info.dtype.is_floating_point)


def calibration_summary(plan: MergePlan, relative_to: Path | None = None) -> list[str]:
    """Lines for ``--dry-run``: what calibration will read and roughly how much memory it holds.

    Reads (and so validates) the calibration data; loads no model."""
    config = plan.recipe.calibration
    assert config is not None
    refs, base_ref = input_refs_of(plan)
    examples = load_examples(config, refs, relative_to)
    counts = ", ".join(f"{ref}: {len(examples[ref])}" for ref in refs)
    # Whole models, not streamed: the collectors hold at most the statistics of every input
    # (one model's worth each) plus about three models' worth of working copies and gradients.
    peak = (len(refs) + 3) * model_bytes(plan)
    return [
        f"calibration: '{plan.method.name}' runs {len(refs) + (1 if base_ref else 0)} whole model(s) on calibration "
        f"examples ({counts}) before merging",
        f"calibration memory: up to about {peak / 1024**2:.1f} MiB (whole models in float32, not streamed)",
    ]


def run_calibration(
    plan: MergePlan,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    relative_to: Path | None = None,
    loader: ModelLoader | None = None,
    tokenizer: Any = None,
) -> None:
    """Run the plan's method's ``calibrate`` hook and attach each tensor's statistics to its job.

    Does nothing for a method without a hook. ``loader`` and ``tokenizer`` default to loading
    from the recipe's model folders.
    """
    method = plan.method
    if method.calibrate is None:
        return
    config = plan.recipe.calibration
    if config is None:
        raise CalibrationError(f"calibration: merge_method '{method.name}' needs a 'calibration:' field with 'data'")
    refs, base_ref = input_refs_of(plan)
    merge_jobs = [job for job in plan.jobs if job.method is not None]
    positions = position_limit(plan)
    if positions is not None and config.max_length > positions:
        # Learned position tables (GPT-2) cannot run past their length: keep each example's end.
        log.warning("calibration.max_length %d exceeds the model's %d positions; using %d", config.max_length, positions, positions)
        config = config.model_copy(update={"max_length": positions})
    context = CalibrationContext(
        input_refs=refs,
        base_ref=base_ref,
        examples=load_examples(config, refs, relative_to),
        params={name: value for name, value in merge_jobs[0].params.items() if name != STATISTICS} if merge_jobs else {},
        tensor_names=[job.output.name for job in merge_jobs],
        config=config,
        tokenizer=tokenizer if tokenizer is not None else folder_tokenizer(plan),
        device=torch.device(device),
        progress=progress,
        loader=loader or folder_loader(plan),
    )
    with torch.enable_grad():
        statistics = method.calibrate(context)
    matched = [job for job in merge_jobs if job.output.name in statistics]
    if merge_jobs and not matched:
        example = next(iter(statistics), "none")
        raise CalibrationError(
            f"calibration of '{method.name}' produced statistics for no tensor of the checkpoints (e.g. model parameter "
            f"'{example}' vs checkpoint tensor '{merge_jobs[0].output.name}'); the checkpoints' tensor names must be the "
            "model's parameter names"
        )
    log.info("calibration: statistics for %d of %d tensors", len(matched), len(merge_jobs))
    for job in merge_jobs:
        job.params[STATISTICS] = statistics.get(job.output.name)
