"""A model's tensors as the merge sees them under a merged vocabulary: its embedding and output
head rows permuted into the merged vocabulary's order and the missing ones filled
(:mod:`mergeforge.tokenizer.rows`), every other tensor passed through.

The transformation happens as rows are read, block by block, so it streams like any other input:
both executors read a :class:`VocabularyView` where they would read the model (the torch executor
by rows, the NumPy executor by flat element ranges), and nothing proportional to the model is
held. Rows are copied in their stored dtype; a filled row that is a mean is computed in float32
and rounded to the tensor's dtype, so both executors see the same bytes.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mergeforge.checkpoint.reader import TensorInfo, TensorSource
from mergeforge.dtypes import NUMPY_STORAGE, from_f32, to_f32, to_torch
from mergeforge.tokenizer.rows import TensorRows

PAD_MEAN_BLOCK_ROWS = 4096  # rows read at a time while a padding row (a mean over the vocabulary) is computed


def stored_rows(source: TensorSource, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a tensor, as the NumPy array its stored bytes are held in."""
    info = source.info(name)
    row_size = math.prod(info.shape[1:])
    read_array = getattr(source, "read_array", None)
    if read_array is not None and info.in_safetensors:
        return np.asarray(read_array(name, start * row_size, stop * row_size)).reshape(stop - start, *info.shape[1:])
    import torch

    tensor = source.read(name, start, stop).to(to_torch(info.dtype)).contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _widened(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float64 (exact for every floating dtype)."""
    return stored.astype(np.float64) if dtype == "F64" else to_f32(stored, dtype).astype(np.float64)


def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to a tensor's stored dtype (through float32, as torch rounds, below 64 bits)."""
    return values if dtype == "F64" else from_f32(values.astype(np.float32), dtype)


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """``(position, first source row, length)`` of each run of consecutive source rows (>= 0)."""
    present = np.flatnonzero(rows >= 0)
    if present.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(present) != 1) | (np.diff(rows[present]) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [present.size]))
    return [(int(present[a]), int(rows[present[a]]), int(b - a)) for a, b in zip(starts, stops)]


class VocabularyView:
    """Model ``model`` read through the merged vocabulary (a :class:`TensorSource`).

    Arguments:
        model: the model's reference.
        sources: every model of the merge, unwrapped (fills read other models' rows).
        layouts: tensor name -> layout, for the model's vocabulary tensors.
    """

    def __init__(self, model: str, sources: Mapping[str, TensorSource], layouts: Mapping[str, TensorRows]):
        self.model = model
        self.inner = sources[model]
        self.sources = sources
        self.layouts = dict(layouts)
        self._pad_rows: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    # -- TensorSource -------------------------------------------------------------------------

    @property
    def ref(self) -> str:
        return self.inner.ref

    @property
    def folder(self) -> Path:
        return self.inner.folder

    @property
    def location(self) -> Path:
        return self.inner.location

    @property
    def config(self) -> dict[str, Any] | None:
        return self.inner.config

    def names(self) -> list[str]:
        return self.inner.names()

    def has(self, name: str) -> bool:
        return self.inner.has(name)

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        layout = self.layouts.get(name)
        return info if layout is None else dataclasses.replace(info, shape=(layout.rows, *info.shape[1:]))

    def read(self, name: str, row_start: int = 0, row_stop: int | None = None) -> Any:
        """As :meth:`Checkpoint.read`: a torch tensor of the rows, in the stored dtype."""
        if name not in self.layouts:
            return self.inner.read(name, row_start, row_stop)
        import torch

        info = self.info(name)
        rows = self.rows(name, row_start, info.shape[0] if row_stop is None else row_stop)
        if info.dtype == "BF16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(rows)

    def read_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """As :meth:`Checkpoint.read_array`: elements ``[start, stop)`` of the flattened tensor."""
        if name not in self.layouts:
            return np.asarray(self.inner.read_array(name, start, stop))  # type: ignore[attr-defined]
        info = self.info(name)
        row_size = max(1, math.prod(info.shape[1:]))
        first, last = start // row_size, -(-stop // row_size)
        return self.rows(name, first, last).reshape(-1)[start - first * row_size: stop - first * row_size]

    def close(self) -> None:
        """Nothing: the plan that made the view closes the models it wraps."""

    # -- rows ---------------------------------------------------------------------------------

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the tensor in the merged vocabulary, in its stored dtype."""
        layout = self.layouts[name]
        info = self.inner.info(name)
        out = np.empty((stop - start, *info.shape[1:]), dtype=NUMPY_STORAGE[info.dtype])
        token_stop = min(stop, layout.tokens)
        if start < token_stop:
            own = layout.own[self.model][start:token_stop]
            for position, first, length in _runs(own):
                out[position: position + length] = stored_rows(self.inner, name, first, first + length)
            for offset in np.flatnonzero(own < 0).tolist():
                out[offset] = _stored(self._fill(name, layout, start + offset), info.dtype)
        if stop > layout.tokens:
            out[max(start, layout.tokens) - start:] = self._pad_row(name)
        return out

    def _fill(self, name: str, layout: TensorRows, index: int) -> np.ndarray:
        """The row (float64) that output row ``index`` takes in every model lacking its own."""
        refs = layout.fills[index]
        total = np.zeros(self.inner.info(name).shape[1:], dtype=np.float64)
        for ref in refs:
            source = self.sources[ref.model]
            total += _widened(stored_rows(source, name, ref.row, ref.row + 1)[0], source.info(name).dtype)
        return total / max(1, len(refs))

    def _pad_row(self, name: str) -> np.ndarray:
        """This model's mean row over the merged vocabulary (what padding rows hold), computed once."""
        with self._lock:
            if name not in self._pad_rows:
                layout = self.layouts[name]
                info = self.inner.info(name)
                total = np.zeros(info.shape[1:], dtype=np.float64)
                for start in range(0, layout.tokens, PAD_MEAN_BLOCK_ROWS):
                    block = self.rows(name, start, min(layout.tokens, start + PAD_MEAN_BLOCK_ROWS))
                    total += _widened(block, info.dtype).sum(axis=0)
                self._pad_rows[name] = _stored(total / max(1, layout.tokens), info.dtype)
            return self._pad_rows[name]
