"""The calibration stage of a merge: runs a data-aware method's ``calibrate`` hook on the plan's
models before the streaming merge and returns each tensor's statistics, from which the merge
builds its plan again (:meth:`~mergeforge.engine.plan.MergePlan.with_statistics`).

Unlike the streaming merge, calibration holds whole models in memory (in float32); see
:mod:`mergeforge.calibration` for the statistic collectors and the data format.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mergeforge.calibration.context import CalibrationContext, ModelLoader
from mergeforge.calibration.data import CalibrationError, load_examples
from mergeforge.checkpoint.adapted import AdaptedCheckpoint
from mergeforge.checkpoint.gguf_reader import GGUFCheckpoint
from mergeforge.dtypes import is_floating
from mergeforge.engine.plan import MergePlan
from mergeforge.methods.registry import STATISTICS, BaseUse

log = logging.getLogger("mergeforge")


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

        checkpoint = plan.checkpoints[ref]
        folder = checkpoint.folder
        stored = checkpoint.inner if isinstance(checkpoint, AdaptedCheckpoint) else checkpoint
        # transformers reads a GGUF file itself (dequantized, Q/K un-permuted), as the merge does.
        gguf_file = stored.path if isinstance(stored, GGUFCheckpoint) else None
        # Our own progress bar covers calibration; transformers' per-model loading bar is noise.
        bar_was_enabled = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            if gguf_file is not None:
                model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise CalibrationError(
                f"model '{ref}' ({folder}): data-aware methods run the model, and transformers cannot load it as a causal "
                f"language model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        finally:
            if bar_was_enabled:
                transformers_logging.enable_progress_bar()
        if isinstance(checkpoint, AdaptedCheckpoint):
            # model+adapter: the model runs with the adapted weights the merge reads
            with torch.no_grad():
                for name in checkpoint.adapted_names():
                    model.get_parameter(name).copy_(checkpoint.read(name))
        return model

    return load


def folder_tokenizer(plan: MergePlan) -> Any:
    """The tokenizer of the recipe's tokenizer source (default: the base, else the first model)."""
    from transformers import AutoTokenizer

    ref = plan.recipe.tokenizer_model() or plan.reference
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
    return sum(info.numel * 4 for info in (reference.info(n) for n in reference.names()) if is_floating(info.dtype))


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
) -> dict[str, Any]:
    """Run the plan's method's ``calibrate`` hook: ``{tensor name: statistics}``.

    ``loader`` and ``tokenizer`` default to loading from the recipe's model folders.
    """
    method = plan.method
    assert method.calibrate is not None
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
    return statistics
