"""The layouts of a recipe, each planned into jobs: ``models:`` (every tensor of models of one
depth) and ``slices:`` (layer ranges stacked in order). Parameters are resolved here, per tensor
(a source's own value, then the slice's, then the top level, then the default; gradients over the
layer position), and every missing tensor, mismatched shape or out-of-range layer is found here.

Layer indices are read from tensor names (``layers.N.``, ``layer.N.``, ``h.N.``, ``blocks.N.``,
``block.N.``), so no per-architecture table is needed: any checkpoints that share names and shapes
merge. With ``slices``, output layers are numbered in order and tensor names are rewritten to match;
tensors outside the layer stack come from the first slice's sources when they are embeddings and
from the last slice's otherwise (final norm, output head).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mergeforge.checkpoint.reader import TensorSource
from mergeforge.checkpoint.writer import OutputTensor
from mergeforge.dtypes import is_floating, parse_recipe_dtype
from mergeforge.engine.jobs import SourceTensor, TensorJob
from mergeforge.engine.recipe import OutputSlice, Parameters, Recipe, SliceSource
from mergeforge.engine.rules import (
    count_layers,
    first_value,
    job_seed,
    layer_index,
    with_layer_index,
)
from mergeforge.errors import CheckpointError, RecipeError
from mergeforge.methods.registry import BaseUse, MethodSpec

EMBEDDING_PATTERN = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|shared\.weight")


def outside_slice(recipe: Recipe, name: str) -> OutputSlice:
    """The slice whose sources give a tensor outside the layer stack: the first slice's for
    embeddings, the last's for everything else (final norm, output head)."""
    slices = recipe.slices or []
    return slices[0] if EMBEDDING_PATTERN.search(name) else slices[-1]


def models_of_tensor(recipe: Recipe, method: MethodSpec, name: str) -> tuple[list[str], str | None]:
    """The models (and the base among them, or ``None``) that feed output tensor ``name`` outside
    the layer stack, as the planner will read them: what a merged vocabulary's fills draw on."""
    if recipe.slices:
        output_slice = outside_slice(recipe, name)
        sources, base = [s.model for s in output_slice.sources], output_slice.base_model or recipe.base_model
    else:
        sources, base = [m.model for m in recipe.models or []], recipe.base_model
    if method.base == BaseUse.NONE:
        base = None
    return list(dict.fromkeys([*([base] if base else []), *sources])), base


class Planner:
    """Plans the jobs of one recipe: :meth:`plan_models` or :meth:`plan_slices`, then
    :meth:`finish_warnings`."""

    def __init__(self, recipe: Recipe, method: MethodSpec, checkpoints: Mapping[str, TensorSource], seed: int,
                 dtype: str | None, out_dtype: str | None):
        self.recipe = recipe
        self.method = method
        self.checkpoints = checkpoints
        self.seed = seed
        self.cast_dtype = parse_recipe_dtype(dtype or recipe.dtype, "dtype")
        self.out_dtype = parse_recipe_dtype(out_dtype or recipe.out_dtype, "out_dtype") or self.cast_dtype
        self.warnings: list[str] = []
        self.missing_by_model: dict[str, list[str]] = {}
        self.jobs: list[TensorJob] = []
        self.output_names: set[str] = set()

    # -- which models feed a slice ------------------------------------------------------------

    def _split_base(self, sources: list[SliceSource], base: str | None, where: str) -> tuple[list[SliceSource], SliceSource | None]:
        """Separate the base from the merge inputs, as the method's BaseUse says."""
        method = self.method
        if method.base == BaseUse.NONE:
            inputs, base_source = list(sources), None
        else:
            if base is None and method.base == BaseUse.REQUIRED:
                raise RecipeError(f"merge_method '{method.name}' needs a base_model (it measures each model from the base)")
            inputs = [s for s in sources if s.model != base]
            base_source = next((s for s in sources if s.model == base), None)
            if base is not None and base_source is None:
                base_source = SliceSource(model=base, layer_range=sources[0].layer_range)
        method.check_model_count(len(inputs), where)
        return inputs, base_source

    # -- parameters ---------------------------------------------------------------------------

    def _resolve_params(
        self, output_name: str, layer_position: float, inputs: list[SliceSource], output_slice: OutputSlice | None
    ) -> dict[str, Any]:
        slice_params = output_slice.parameters if output_slice else None
        resolved: dict[str, Any] = {}
        for param in self.method.params:
            levels: list[Parameters | None] = [slice_params, self.recipe.parameters]
            if param.per_model:
                resolved[param.name] = [
                    param.resolve(first_value(param.name, [source.parameters, *levels], output_name, layer_position),
                                  f"model '{source.model}', tensor '{output_name}'")
                    for source in inputs
                ]
            else:
                value = first_value(param.name, levels, output_name, layer_position)
                resolved[param.name] = param.resolve(value, f"tensor '{output_name}'")
        return resolved

    # -- tensors ------------------------------------------------------------------------------

    def _add_job(
        self,
        output_name: str,
        source_name: str,
        layer_position: float,
        inputs: list[SliceSource],
        base_source: SliceSource | None,
        output_slice: OutputSlice | None,
        source_names: dict[str, str] | None = None,
    ) -> None:
        """Plan one output tensor; ``source_names`` maps model -> tensor name where it differs."""
        if output_name in self.output_names:
            raise RecipeError(f"slices: output tensor '{output_name}' would be produced twice; check the layer ranges")
        self.output_names.add(output_name)

        def name_in(model: str) -> str:
            return (source_names or {}).get(model, source_name)

        base_tensor = None
        if base_source is not None:
            base_ckpt = self.checkpoints[base_source.model]
            if base_ckpt.has(name_in(base_source.model)):
                base_tensor = SourceTensor(base_source.model, name_in(base_source.model))
            elif self.method.base == BaseUse.REQUIRED:
                raise CheckpointError(f"model '{base_source.model}' (base): tensor '{name_in(base_source.model)}' not found")
        job_inputs: list[SourceTensor | None] = []
        for source in inputs:
            name = name_in(source.model)
            if self.checkpoints[source.model].has(name):
                job_inputs.append(SourceTensor(source.model, name))
            elif base_tensor is not None and self.method.base == BaseUse.REQUIRED:
                job_inputs.append(None)
                self.missing_by_model.setdefault(source.model, []).append(name)
            else:
                raise CheckpointError(f"model '{source.model}': tensor '{name}' not found (needed for output '{output_name}')")

        present = [s for s in job_inputs if s is not None] + ([base_tensor] if base_tensor else [])
        infos = [(s, self.checkpoints[s.model].info(s.name)) for s in present]
        reference_source, reference_info = infos[-1] if base_tensor else infos[0]
        for tensor, info in infos:
            if info.shape != reference_info.shape:
                raise CheckpointError(
                    f"tensor '{tensor.name}': shape {list(info.shape)} in model '{tensor.model}' but "
                    f"{list(reference_info.shape)} in model '{reference_source.model}'"
                )
        is_float = is_floating(reference_info.dtype)
        out_dtype = (self.out_dtype or reference_info.dtype) if is_float else reference_info.dtype
        output = OutputTensor(output_name, reference_info.shape, out_dtype)
        if not is_float:
            # Integer and boolean buffers (position ids, masks) are never averaged.
            copy_inputs: list[SourceTensor | None] = []
            if base_tensor is not None:
                copy_from = base_tensor
            else:
                copy_from, copy_inputs = None, [s for s in job_inputs if s is not None]
            job = TensorJob(output, copy_inputs, copy_from, None, {}, 0)
        else:
            params = self._resolve_params(output_name, layer_position, inputs, output_slice)
            job = TensorJob(output, job_inputs, base_tensor, self.method, params, job_seed(self.seed, output_name))
        self.jobs.append(job)

    def plan_models(self) -> None:
        recipe = self.recipe
        models = recipe.models or []
        references = [m.model for m in models]
        reference = recipe.reference_model()
        names = self.checkpoints[reference].names()
        layers = count_layers(names)
        for model in references:
            model_layers = count_layers(self.checkpoints[model].names())
            if model_layers != layers:
                raise RecipeError(
                    f"models: model '{model}' has {model_layers} layers but '{reference}' has {layers}; "
                    "use slices with layer_range to merge models of different depths"
                )
        sources = [SliceSource(model=m.model, layer_range=(0, max(layers, 1)), parameters=m.parameters) for m in models]
        inputs, base_source = self._split_base(sources, recipe.base_model, "models")
        for name in names:
            index = layer_index(name)
            position = index / (layers - 1) if index is not None and layers > 1 else 0.0
            self._add_job(name, name, position, inputs, base_source, None)
        self._warn_extra_tensors([s.model for s in inputs], set(names))

    def plan_slices(self) -> list[SourceTensor]:
        recipe = self.recipe
        slices = recipe.slices or []
        output_layers: list[SourceTensor] = []
        reference_model = recipe.reference_model()
        reference_names = self.checkpoints[reference_model].names()
        non_layer = [n for n in reference_names if layer_index(n) is None]
        for i, output_slice in enumerate(slices):
            for source in output_slice.sources:
                available = count_layers(self.checkpoints[source.model].names())
                if source.layer_range[1] > available:
                    raise RecipeError(
                        f"slices[{i}]: layer_range {list(source.layer_range)} of model '{source.model}' goes past its {available} layers"
                    )
        plans = []
        for i, output_slice in enumerate(slices):
            base = output_slice.base_model or recipe.base_model
            inputs, base_source = self._split_base(output_slice.sources, base, f"slices[{i}]")
            plans.append((output_slice, inputs, base_source))

        by_slice = {id(output_slice): (inputs, base_source) for output_slice, inputs, base_source in plans}
        for name in non_layer:
            output_slice = outside_slice(recipe, name)
            inputs, base_source = by_slice[id(output_slice)]
            self._add_job(name, name, 0.0, inputs, base_source, output_slice)

        for output_slice, inputs, base_source in plans:
            lead = output_slice.sources[0]
            start, stop = lead.layer_range
            length = stop - start
            lead_names = self.checkpoints[lead.model].names()
            for offset in range(length):
                out_index = len(output_layers)
                output_layers.append(SourceTensor(lead.model, str(start + offset)))
                position = offset / (length - 1) if length > 1 else 0.0
                layer_names = [n for n in lead_names if layer_index(n) == start + offset]
                for name in layer_names:
                    source_names = {
                        s.model: with_layer_index(name, s.layer_range[0] + offset)
                        for s in [*output_slice.sources, *([base_source] if base_source else [])]
                    }
                    output_name = with_layer_index(name, out_index)
                    self._add_job(output_name, name, position, inputs, base_source, output_slice, source_names)
        return output_layers

    def _warn_extra_tensors(self, models: list[str], reference_names: set[str]) -> None:
        for model in models:
            extra = [n for n in self.checkpoints[model].names() if n not in reference_names]
            if extra:
                self.warnings.append(
                    f"model '{model}' has {len(extra)} tensor(s) the reference model lacks (e.g. '{extra[0]}'); they are not in the output"
                )

    def finish_warnings(self) -> None:
        for model, names in self.missing_by_model.items():
            self.warnings.append(
                f"model '{model}' lacks {len(names)} tensor(s) the base has (e.g. '{names[0]}'); they count as unchanged from the base"
            )
        if any(s.residual_weight is not None for s in self.recipe.slices or []):
            self.warnings.append("slices: 'residual_weight' has no effect (mergekit ignores it too)")
