"""What a data-aware method's ``calibrate`` hook works with: :class:`CalibrationContext`.

The hook receives the input models (loaded one at a time on the compute device, so a method holds
only what it needs), the base, the calibration examples of each model, the method's parameters and
the names of the tensors to merge. It returns ``{tensor name: statistics}``; the merge
(:mod:`mergeforge.engine.calibrate`) builds its plan again with each tensor's statistics among its job's
parameters, and the executor passes them to the method function unchanged. So the executors, the
writer, the CLI and the API keep one path for every method.

Unlike the streaming merge, calibration holds whole models in memory (in float32).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeforge.calibration.config import CalibrationConfig
from mergeforge.calibration.data import (
    Batch,
    CalibrationError,
    CalibrationExample,
    EncodedExample,
    encode_examples,
    make_batches,
    pad_token_id,
    shared_sources,
)

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
