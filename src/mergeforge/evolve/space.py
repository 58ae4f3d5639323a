"""The parameter-space genome: which method parameter of which model in which group of layers
each gene sets, and the recipe a genome stands for.

The optimiser sees the unit cube [0, 1]^d (one scale for every gene, so one ``sigma0`` fits all);
:meth:`SearchSpace.values` maps it onto the bounds of the search file. Tensors are grouped by
layer: with ``layer_groups: 1`` every tensor shares one group (a gene per model and parameter, as
in Sakana's parameter-space search); with N groups the layers are cut into N contiguous chunks and
the tensors outside the layers (embeddings, final norm, head) form one more group. A group is the
unit of partial re-merging: a candidate recomputes only the groups whose genes changed.

The whole-model recipe of a genome expresses a group's values as mergekit filter lists keyed by
each layer's tensor-name prefix (``model.layers.3.``), so ``mergeforge merge`` and mergekit read it
unchanged. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergeforge.engine.rules import LAYER_PATTERN, count_layers, layer_index
from mergeforge.errors import RecipeError
from mergeforge.evolve.config import SearchConfig
from mergeforge.methods.registry import MethodSpec


@dataclass(frozen=True)
class Gene:
    """One searched number: ``param`` of model ``model`` (None for a global parameter) in ``group``."""

    param: str
    group: int
    model: int | None
    low: float
    high: float
    integer: bool = False  # an int parameter: the value is rounded, so nearby genomes share merges

    @property
    def label(self) -> str:
        owner = "all models" if self.model is None else f"model {self.model}"
        return f"{self.param} [{owner}, group {self.group}]"


@dataclass(frozen=True)
class GroupParameters:
    """The scalar parameters one group of tensors is merged with."""

    top: dict[str, Any]
    per_model: list[dict[str, Any]]


class SearchSpace:
    """Genes, tensor groups and the genome -> parameters -> recipe mappings of one search."""

    def __init__(self, config: SearchConfig, method: MethodSpec, tensor_names: Sequence[str]):
        assert config.models is not None and config.search is not None  # a parameter-space search
        self.config, self.method = config, method
        self.models, self.search = config.models, config.search
        self.model_count = len(config.models)
        self.layers = count_layers(tensor_names)
        self.group_of, self.labels, self.layer_prefixes = _groups(tensor_names, config.layer_groups, self.layers)
        per_model = {param.name: param.per_model for param in method.params}
        integer = {param.name: param.kind == "int" for param in method.params}
        self.genes = [
            Gene(name, group, model, bounds.low, bounds.high, integer[name])
            for group in range(len(self.labels))
            for name, bounds in self.search.items()
            for model in (range(self.model_count) if per_model[name] else [None])
        ]
        self._starts = [self.search[gene.param].start for gene in self.genes]

    @property
    def dimensions(self) -> int:
        return len(self.genes)

    def start(self) -> list[float]:
        """The unit-cube point the search starts from: each gene's ``start``, else the middle."""
        return [0.5 if start is None else (start - gene.low) / (gene.high - gene.low)
                for start, gene in zip(self._starts, self.genes, strict=True)]

    def values(self, unit: Sequence[float]) -> list[float]:
        """Gene values on their bounds (the unit point clipped to the cube first; int genes rounded)."""
        if len(unit) != self.dimensions:
            raise RecipeError(f"a genome of {len(unit)} numbers for a search of {self.dimensions} genes")
        values = []
        for x, gene in zip(unit, self.genes, strict=True):
            value = gene.low + min(1.0, max(0.0, float(x))) * (gene.high - gene.low)
            values.append(round(value) if gene.integer else value)
        return values

    def group_genes(self, values: Sequence[float], group: int) -> tuple[float, ...]:
        """The values of one group's genes: the key of that group's merge cache."""
        return tuple(v for v, gene in zip(values, self.genes, strict=True) if gene.group == group)

    def group_parameters(self, values: Sequence[float], group: int) -> GroupParameters:
        """The fixed parameters of the search file with one group's searched values on top."""
        top = dict(self.config.parameters)
        per_model = [dict(model.parameters) for model in self.models]
        for value, gene in zip(values, self.genes, strict=True):
            if gene.group != group:
                continue
            if gene.model is None:
                top[gene.param] = value
            else:
                per_model[gene.model][gene.param] = value
        return GroupParameters(top, per_model)

    def described(self, values: Sequence[float]) -> dict[str, float]:
        """Gene label -> value, for the journal and the report."""
        return {gene.label: value for gene, value in zip(self.genes, values, strict=True)}

    def recipe(self, values: Sequence[float], model_refs: Sequence[str], base_ref: str | None) -> dict[str, Any]:
        """The whole-model recipe (mergekit's schema) that merges to the same weights as the
        genome's group-by-group merge."""
        groups = [self.group_parameters(values, group) for group in range(len(self.labels))]
        top = {name: self._spread([g.top[name] for g in groups]) for name in groups[0].top}
        models = []
        for index, ref in enumerate(model_refs):
            params = {name: self._spread([g.per_model[index][name] for g in groups]) for name in groups[0].per_model[index]}
            models.append({"model": ref, **({"parameters": params} if params else {})})
        # dtype float32: what was evaluated (the sources are read into float32 and merged there); a
        # bf16 output would round the evaluated weights, and the re-merge would score another model.
        recipe: dict[str, Any] = {"merge_method": self.method.name, "models": models, "dtype": "float32"}
        if base_ref is not None and self.method.base.value != "none":
            recipe["base_model"] = base_ref
        if top:
            recipe["parameters"] = top
        return recipe

    def _spread(self, per_group: list[Any]) -> Any:
        """One value per group as a recipe value: a scalar when they agree, else a filter list with
        one entry per layer prefix and a last entry for the tensors outside the layers."""
        if all(value == per_group[0] for value in per_group):
            return per_group[0]
        entries: list[dict[str, Any]] = [
            {"filter": prefix, "value": per_group[self.group_of_layer(layer)]}
            for layer, prefixes in sorted(self.layer_prefixes.items())
            for prefix in prefixes
        ]
        return [*entries, {"value": per_group[-1]}]

    def group_of_layer(self, layer: int) -> int:
        return layer * (len(self.labels) - 1) // self.layers if len(self.labels) > 1 else 0


def _groups(names: Sequence[str], count: int, layers: int) -> tuple[dict[str, int], list[str], dict[int, list[str]]]:
    """Tensor -> group, the groups' labels, and each layer's tensor-name prefixes."""
    prefixes: dict[int, list[str]] = {}
    for name in names:
        match = LAYER_PATTERN.search(name)
        if match is not None:
            prefix = name[: match.end(3) + 1]
            prefixes.setdefault(int(match.group(3)), [])
            if prefix not in prefixes[int(match.group(3))]:
                prefixes[int(match.group(3))].append(prefix)
    if count == 1:
        return dict.fromkeys(names, 0), ["all tensors"], prefixes
    if count > layers:
        raise RecipeError(f"field 'layer_groups': {count} groups for a model of {layers} layers; use at most {layers}")

    def group(layer: int) -> int:
        return layer * count // layers

    labels = []
    for g in range(count):
        members = [layer for layer in range(layers) if group(layer) == g]
        labels.append(f"layers {members[0]}-{members[-1]}" if len(members) > 1 else f"layer {members[0]}")
    labels.append("outside the layers")
    group_of = {}
    for name in names:
        index = layer_index(name)
        group_of[name] = count if index is None else group(index)
    return group_of, labels, prefixes


def tensors_by_group(space: SearchSpace, names: Sequence[str]) -> list[list[str]]:
    """The tensor names of each group, in the models' order."""
    result: list[list[str]] = [[] for _ in space.labels]
    for name in names:
        result[space.group_of[name]].append(name)
    return result


def subset(state: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: state[name] for name in names}
