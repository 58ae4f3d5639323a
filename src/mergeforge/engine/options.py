"""How a merge runs, as opposed to what it merges (the recipe): one plain object that the CLI, the
Python API and both executors read. Torch-free."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergeforge.checkpoint.writer import DEFAULT_SHARD_BYTES
from mergeforge.engine.rules import parse_size
from mergeforge.errors import MergeforgeError

EXECUTORS = ("auto", "numpy", "torch")
# "float32": the math runs in float32 (float64 for a float64 recipe) whatever the inputs were rounded
# to, the more accurate choice; "recipe": it runs in the recipe's dtype, as mergekit's does, to
# reproduce a published mergekit merge bit for bit (see docs/usage.md for the methods it changes).
MATH_DTYPES = ("float32", "recipe")


def default_threads() -> int:
    """One worker thread per core, at most 4 (more only contend for memory bandwidth)."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class MergeOptions:
    """Options of :func:`mergeforge.merge` (and the flags of ``mergeforge merge``).

    Example:
        >>> merge("ties.yml", "merged/", MergeOptions(seed=3, out_dtype="bfloat16"))
        >>> merge("ties.yml", "merged/", seed=3)   # the same: fields as keyword arguments
    """

    device: str = "cpu"  # where the math runs: cpu, or a torch device such as cuda or cuda:1 (torch executor)
    dtype: str | None = None  # overrides the recipe's dtype: inputs are rounded to it before merging
    math_dtype: str = "float32"  # one of MATH_DTYPES: what the methods compute in
    out_dtype: str | None = None  # overrides the recipe's out_dtype: the dtype of the written tensors
    out_shard_size: int | str = DEFAULT_SHARD_BYTES  # largest output shard: bytes, or text such as "2GB"
    threads: int | None = None  # worker threads; None: default_threads()
    memory_budget: int | str | None = None  # bytes of tensors the torch executor holds at once; None: automatic
    copy_tokenizer: bool = True  # copy the tokenizer files from the tokenizer source
    dry_run: bool = False  # plan only: nothing is read or written; the result lists the plan
    overwrite: bool = False  # replace a non-empty output folder
    seed: int = 0  # seed of the random methods (DARE, DELLA): the same seed gives the same bytes
    quiet: bool = False  # no progress bar
    # "auto": the NumPy executor when it takes the plan (CPU, safetensors inputs, float32 compute,
    # a NumPy kernel for the method, no calibration), else torch; "numpy" or "torch" forces one.
    executor: str = "auto"
    out_format: str = "hf"  # "hf": safetensors shards; "gguf": OUT_DIR/model.gguf
    out_type: str | None = None  # GGUF tensor type (f16, q8_0, q4_k_m, ...); None: the merge's output dtype
    # A multi-document recipe's named stages are written here (DIR/<name>) and kept; None: in a
    # temporary folder beside the output, deleted at the end.
    intermediate_dir: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise MergeforgeError("--threads must be at least 1")
        if self.executor not in EXECUTORS:
            raise MergeforgeError(f"--executor: unknown executor '{self.executor}'; use one of {', '.join(EXECUTORS)}")
        if self.math_dtype not in MATH_DTYPES:
            raise MergeforgeError(f"--math-dtype: unknown choice '{self.math_dtype}'; use one of {', '.join(MATH_DTYPES)}")
        if self.out_format not in ("hf", "gguf"):
            raise MergeforgeError(f"--out-format: unknown format '{self.out_format}'; use hf or gguf")
        if self.out_type is not None and self.out_format != "gguf":
            raise MergeforgeError("--out-type sets the type of a GGUF output; add --out-format gguf (or use --out-dtype)")
        self.shard_bytes  # noqa: B018 - sizes are checked here, not halfway through a merge
        self.budget_bytes  # noqa: B018

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.out_shard_size)

    @property
    def budget_bytes(self) -> int | None:
        return None if self.memory_budget is None else parse_size(self.memory_budget)

    @property
    def worker_threads(self) -> int:
        return self.threads or default_threads()

    @classmethod
    def of(cls, options: MergeOptions | None, fields: Mapping[str, Any]) -> MergeOptions:
        """``options`` (default: all defaults) with ``fields`` replaced; an unknown field is an error."""
        base = options or cls()
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown merge option '{unknown[0]}'; MergeOptions has {', '.join(f.name for f in dataclasses.fields(cls))}")
        return dataclasses.replace(base, **fields) if fields else base
