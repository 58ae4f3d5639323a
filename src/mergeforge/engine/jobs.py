"""The units of a plan: one :class:`TensorJob` per output tensor, reading :class:`SourceTensor`
inputs from :class:`~mergeforge.checkpoint.reader.TensorSource` models. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mergeforge.checkpoint.writer import OutputTensor
from mergeforge.dtypes import TORCH_NAMES
from mergeforge.errors import MethodError
from mergeforge.methods.registry import MethodSpec


@dataclass(frozen=True)
class SourceTensor:
    """One input tensor: tensor ``name`` of model ``model`` (a recipe model reference)."""

    model: str
    name: str


@dataclass
class TensorJob:
    """Everything needed to produce one output tensor."""

    output: OutputTensor
    inputs: list[SourceTensor | None]  # None: the model lacks it; it counts as unchanged from the base
    base: SourceTensor | None
    method: MethodSpec | None  # None: copy (integer and boolean tensors)
    params: dict[str, Any]
    seed: int
    input_dtypes: list[str] = field(default_factory=list)  # of the inputs that are present, in order

    @property
    def numel(self) -> int:
        return self.output.numel

    def copies_differ(self, first: SourceTensor, other: SourceTensor) -> MethodError:
        """The error of a copy job (no base) whose inputs disagree, the same from either executor."""
        return MethodError(
            f"tensor '{self.output.name}' (torch.{TORCH_NAMES[self.output.dtype]}, not mergeable) differs between models "
            f"'{first.model}' and '{other.model}'; give a base_model to copy it from"
        )
