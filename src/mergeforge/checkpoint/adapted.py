"""``model+adapter`` references (mergekit's syntax): a model read with a PEFT LoRA applied on the
fly, tensor by tensor, with no merged copy written anywhere.

mergekit merges the adapter into a full copy of the model (``--lora-merge-cache``) before the merge
starts. Here the model stays where it is: :class:`AdaptedCheckpoint` wraps the model's own
:class:`~mergeforge.checkpoint.reader.TensorSource` and, for each adapted tensor, returns the base
tensor (or the rows asked for) plus ΔW = scale·B·A of the same rows, computed from the factors; the
adapter's ``modules_to_save`` tensors replace the model's. The adapter's factors are all it holds,
so memory stays what reading the model alone takes, plus the adapter.

The adapter is read by :func:`~mergeforge.checkpoint.lora_adapter.read_lora` (rank and alpha
patterns, rsLoRA, embedding LoRAs, ``modules_to_save``; DoRA refused), and every module it updates
is checked against the model's tensor names and shapes when the reference is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeforge.checkpoint.reader import TensorIndex, TensorInfo, TensorSource
from mergeforge.checkpoint.safetensors_format import resolve_model_path
from mergeforge.dtypes import to_torch
from mergeforge.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from mergeforge.checkpoint.lora_adapter import Adapter, ModuleUpdate


def adapter_folder(ref: str, adapter_ref: str, relative_to: Path | None) -> Path:
    """The adapter's folder: a path (relative to the recipe's folder first) or a hub id in the
    local cache, as a model's is."""
    try:
        return resolve_model_path(adapter_ref, relative_to)
    except CheckpointError:
        raise CheckpointError(f"model '{ref}': adapter folder '{adapter_ref}' not found (nor in the local Hugging Face "
                              "cache); give the path of a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors)") from None


def input_locations(source: TensorSource) -> list[Path]:
    """What an output must not replace or be written into: the model's file or folder, and the
    adapter's folder of a ``model+adapter`` reference."""
    return [source.location, source.adapter.folder] if isinstance(source, AdaptedCheckpoint) else [source.location]


def _mismatch(ref: str, what: str, name: str, shape: tuple[int, ...], model_shape: tuple[int, ...]) -> CheckpointError:
    return CheckpointError(f"model '{ref}': the adapter's {what} '{name}' has shape {list(shape)}, the model's tensor has "
                           f"{list(model_shape)}; is the adapter one of this model?")


class AdaptedCheckpoint(TensorIndex):
    """A :class:`~mergeforge.checkpoint.reader.TensorSource` that reads ``inner`` with ``adapter``
    applied: the same tensor names, shapes and dtypes; adapted tensors are computed per read.

    Example:
        >>> with open_checkpoint("base+adapters/math") as model:     # doctest: +SKIP
        ...     q = model.read("model.layers.0.self_attn.q_proj.weight")  # W + (alpha/r)·B·A
    """

    def __init__(self, inner: TensorSource, adapter: Adapter, ref: str):
        # peft (like every module that holds tensors) imports torch; this module does not until an
        # adapter is read, so the engine can ask isinstance(source, AdaptedCheckpoint) torch-free.
        from mergeforge.checkpoint.peft import ADAPTER_WEIGHTS

        self.inner = inner
        self.adapter = adapter
        self.ref = ref
        self.updates: dict[str, ModuleUpdate] = {}
        self.tensors: dict[str, TensorInfo] = {name: inner.info(name) for name in inner.names()}
        weights = adapter.folder / ADAPTER_WEIGHTS
        for update in adapter.updates.values():
            name = f"{update.name}.weight"
            base = self._model_tensor(name, "update of")
            if tuple(base.shape) != update.shape:
                raise _mismatch(ref, "update of", name, update.shape, base.shape)
            self.updates[name] = update
            self.tensors[name] = TensorInfo(name, base.shape, base.dtype, weights, -1)
        for name, tensor in adapter.saved.items():
            base = self._model_tensor(name, "saved tensor")
            if tuple(tensor.shape) != base.shape:
                raise _mismatch(ref, "saved tensor (modules_to_save)", name, tuple(tensor.shape), base.shape)
            self.tensors[name] = TensorInfo(name, base.shape, base.dtype, weights, -1)

    @classmethod
    def open(cls, ref: str, inner: TensorSource, adapter_ref: str, relative_to: Path | None = None) -> AdaptedCheckpoint:
        """Read the adapter of ``ref`` and wrap ``inner`` (closed again if the adapter is refused);
        every error names the whole reference."""
        from mergeforge.checkpoint.lora_adapter import read_lora

        try:
            try:
                adapter = read_lora(adapter_folder(ref, adapter_ref, relative_to))
            except CheckpointError as exc:
                message = str(exc)
                raise CheckpointError(message if message.startswith(f"model '{ref}'") else f"model '{ref}': {message}") from None
            return cls(inner, adapter, ref)
        except BaseException:
            inner.close()
            raise

    def _model_tensor(self, name: str, what: str) -> TensorInfo:
        if not self.inner.has(name):
            hint = ""
            if name == "lm_head.weight":
                hint = " (its embeddings are tied: the output layer is the embedding, so adapt model.embed_tokens instead)"
            raise CheckpointError(f"model '{self.ref}': the adapter has an {what} '{name}', which the model does not have{hint}; "
                                  "is the adapter one of this model?")
        return self.inner.info(name)

    # -- the TensorSource interface ------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.inner.folder

    @property
    def location(self) -> Path:
        return self.inner.location

    @property
    def config(self) -> dict[str, Any] | None:
        return self.inner.config

    def adapted_names(self) -> list[str]:
        """The tensors the adapter changes (updated or replaced)."""
        return sorted(set(self.updates) | set(self.adapter.saved))

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        """The tensor (or rows ``[row_start, row_stop)``) with the adapter applied, in the model's
        dtype: the sum is taken in float32 and rounded once."""
        saved = self.adapter.saved.get(name)
        update = self.updates.get(name)
        if saved is None and update is None:
            tensor: torch.Tensor = self.inner.read(name, row_start, row_stop)
            return tensor
        dtype = to_torch(self.info(name).dtype)
        base = saved[row_start:row_stop] if saved is not None else self.inner.read(name, row_start, row_stop)
        if update is None:
            return base.to(dtype, copy=True)
        return (base.float() + update.delta_rows(row_start, row_stop)).to(dtype)

    def close(self) -> None:
        self.inner.close()
