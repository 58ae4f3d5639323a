"""Planning for the fast path: is this recipe one the fast path runs exactly as the full path
would, and if so, which jobs.

Eligible: a ``models:`` recipe (no slices, no calibration, no per-token tokenizer settings) of a
method in :data:`~mergeforge.fastpath.methods.FAST_METHODS`, over safetensors models that share
every tensor name and shape, computed in float32 (recipe ``dtype`` absent, float32, or equal to
every input's dtype), on CPU. Everything else, and anything the full path would warn about or
reject, returns ``None`` so the full path runs and reports it in its own words. Parameter values
resolve as in :mod:`mergeforge.plan` (a model's own > top-level > default; gradients over the
layer index read from the tensor name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeforge.checkpoint.safetensors_format import (
    FLOATING_NAMES,
    HeaderEntry,
    index_shards,
    parse_header,
    resolve_model_path,
    weights_layout,
)
from mergeforge.errors import MergeforgeError, RecipeError
from mergeforge.fastpath.arrays import RECIPE_DTYPES, STORAGE
from mergeforge.fastpath.methods import FAST_METHODS, REQUIRED, FastMethod
from mergeforge.plan_rules import count_layers, first_value, job_seed, layer_index
from mergeforge.recipe import Recipe


class NotEligible(Exception):
    """The fast path does not handle this merge; the full path will."""


@dataclass(frozen=True)
class FastSource:
    """One input tensor: its file (an open descriptor) and header entry."""

    fd: int
    path: Path
    entry: HeaderEntry
    model: str = ""  # the recipe's reference to the model


@dataclass
class FastJob:
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    inputs: list[FastSource]  # the models merged (for a copy job: the one copied, or all that must agree)
    base: FastSource | None
    params: dict[str, Any]
    seed: int
    copy: bool = False

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * STORAGE[self.out_dtype].itemsize


@dataclass
class FastPlan:
    recipe: Recipe
    method: FastMethod
    folders: dict[str, Path]  # model reference -> folder
    reference: str
    jobs: list[FastJob]
    fds: list[int]

    @property
    def bytes_to_read(self) -> int:
        return sum(s.entry.nbytes for job in self.jobs for s in [*job.inputs, *([job.base] if job.base else [])])

    @property
    def bytes_to_write(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _open_model(folder: Path, fds: list[int], ref: str) -> dict[str, FastSource]:
    kind, path = weights_layout(folder)
    if kind == "safetensors":
        files, weight_map = [path], None
    elif kind == "safetensors-index":
        weight_map = index_shards(path)
        files = [folder / shard for shard in sorted(set(weight_map.values()))]
    else:
        raise NotEligible(f"{folder}: PyTorch .bin weights")
    tensors: dict[str, FastSource] = {}
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        fds.append(fd)
        _, entries = parse_header(fd, file)
        for name, entry in entries.items():
            if weight_map is None or weight_map.get(name) == file.name:
                tensors[name] = FastSource(fd, file, entry, ref)
    if weight_map is not None and any(name not in tensors for name in weight_map):
        raise NotEligible("index lists a tensor its shard lacks")
    return tensors


def _resolve(method: FastMethod, recipe: Recipe, inputs: list[Any], name: str, t: float) -> dict[str, Any]:
    resolved: dict[str, Any] = {}
    for param in method.params:
        if param.per_model:
            values = []
            for model in inputs:
                levels = [model.parameters, recipe.parameters]
                values.append(_value(param, levels, name, t))
            resolved[param.name] = values
        else:
            resolved[param.name] = _value(param, [recipe.parameters], name, t)
    return resolved


def _value(param, levels, name: str, t: float) -> Any:
    value = first_value(param.name, levels, name, t)
    if value is None:
        if param.default is REQUIRED:
            raise NotEligible(f"parameter {param.name} missing")
        return param.default
    try:
        return param.check(value, name)
    except RecipeError:  # the full path reports it in its own words
        raise NotEligible(f"parameter {param.name}") from None


def build_fast_plan(recipe: Recipe, relative_to: Path | None, *, dtype: str | None, out_dtype: str | None,
                    seed: int) -> FastPlan:
    """Plan ``recipe`` for the fast path, or raise :class:`NotEligible`."""
    method = FAST_METHODS.get(recipe.merge_method)
    if method is None:
        raise NotEligible(f"method {recipe.merge_method}")
    if recipe.slices or not recipe.models or recipe.tokenizer is not None or getattr(recipe, "calibration", None):
        raise NotEligible("recipe shape")
    if recipe.tokenizer_source == "union":
        raise NotEligible("tokenizer union")
    known = {p.name for p in method.params}
    for parameters in [recipe.parameters, *(m.parameters for m in recipe.models)]:
        if parameters and any(key not in known for key in parameters):
            raise NotEligible("unknown parameter")
    per_model_names = {p.name for p in method.params if p.per_model}
    for model in recipe.models:
        if model.parameters and any(key not in per_model_names for key in model.parameters):
            raise NotEligible("global parameter at model level")
    cast = (dtype or recipe.dtype)
    cast_name = RECIPE_DTYPES.get(str(cast).lower()) if cast is not None else None
    if cast is not None and cast_name is None:
        raise NotEligible("dtype")
    out = out_dtype or recipe.out_dtype
    out_name = RECIPE_DTYPES.get(str(out).lower()) if out is not None else cast_name
    if out is not None and out_name is None:
        raise NotEligible("out_dtype")
    if "F64" in (cast_name, out_name):
        raise NotEligible("float64")

    base_ref = recipe.base_model
    references = [m.model for m in recipe.models]
    if method.uses_base:
        if base_ref is None:
            raise NotEligible("needs base")
        inputs = [m for m in recipe.models if m.model != base_ref]
    else:
        inputs = list(recipe.models)
    if not inputs or (method.max_models is not None and len(inputs) > method.max_models):
        raise NotEligible("model count")

    fds: list[int] = []
    try:
        folders = {ref: resolve_model_path(ref, relative_to) for ref in recipe.referenced_models()}
        tensors = {ref: _open_model(folder, fds, ref) for ref, folder in folders.items()}
        reference = base_ref or references[0]
        names = list(tensors[reference])
        layers = count_layers(names)
        for ref in [m.model for m in inputs]:
            if count_layers(list(tensors[ref])) != layers or set(tensors[ref]) != set(names):
                raise NotEligible("models differ in tensors")
        base_tensors = tensors[base_ref] if method.uses_base else None
        jobs = []
        for name in names:
            sources = [tensors[m.model][name] for m in inputs]
            base = base_tensors[name] if base_tensors is not None else None
            present = sources + ([base] if base is not None else [])
            if any(s.entry.shape != present[-1].entry.shape for s in present):
                raise NotEligible("shape mismatch")
            dtypes = {s.entry.dtype for s in present}
            reference_dtype = (base or sources[0]).entry.dtype
            if reference_dtype not in FLOATING_NAMES:
                if base is None and len({s.entry.dtype for s in sources}) != 1:
                    raise NotEligible("copy dtypes")
                copy_inputs = [base] if base is not None else sources
                if len(copy_inputs) > 1 and len({_read_bytes(s) for s in copy_inputs}) != 1:
                    raise NotEligible("buffers differ between models")
                jobs.append(FastJob(name, base.entry.shape if base else sources[0].entry.shape, reference_dtype,
                                    copy_inputs, None, {}, 0, copy=True))
                continue
            if not dtypes <= {"BF16", "F16", "F32"} or (cast_name not in (None, "F32") and dtypes != {cast_name}):
                raise NotEligible("input dtypes")
            index = layer_index(name)
            t = index / (layers - 1) if index is not None and layers > 1 else 0.0
            params = _resolve(method, recipe, inputs, name, t)
            if method.name == "linear" and params["normalize"] and abs(sum(params["weight"])) < 1e-8:
                raise NotEligible("weights sum to zero")
            jobs.append(FastJob(name, present[-1].entry.shape, out_name or reference_dtype, sources, base, params,
                                job_seed(seed, name)))
        return FastPlan(recipe, method, folders, reference, jobs, fds)
    except NotEligible:
        for fd in fds:
            os.close(fd)
        raise
    except MergeforgeError as exc:
        for fd in fds:
            os.close(fd)
        raise NotEligible(str(exc)) from None
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise NotEligible(str(exc)) from None


def _read_bytes(source: FastSource) -> bytes:
    return os.pread(source.fd, source.entry.nbytes, source.entry.offset)
