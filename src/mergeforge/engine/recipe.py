"""Recipes: mergekit-compatible YAML (or dicts), validated, and parameter values resolved per tensor.

A recipe names a ``merge_method`` and its inputs, either as ``models:`` (every layer of each model)
or as ``slices:`` (layer ranges, possibly from different models, stacked in order). Parameter values
may be scalars, gradients (lists interpolated over the layer index within a slice) or filter lists
(``- filter: self_attn`` / ``value: ...``; first match wins; an entry without a filter is the
fallback), with mergekit's precedence: source > slice > top level.

Unknown fields are errors, never silently ignored.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeforge.calibration.config import CalibrationConfig
from mergeforge.errors import RecipeError

Scalar = Union[bool, int, float]


class FilterEntry(BaseModel):
    """One entry of a filter list: applies ``value`` to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


ParamValue = Union[Scalar, list[Scalar], list[FilterEntry]]
Parameters = dict[str, ParamValue]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputModel(_Strict):
    """An entry of ``models:``."""

    model: str
    parameters: Parameters | None = None


class SliceSource(_Strict):
    """One source of an output slice: a layer range ``[start, end)`` of one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(_Strict):
    """An entry of ``slices:``: its sources are merged layer by layer."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = None  # declared by mergekit, never used by it; warned about

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {source.layer_range[1] - source.layer_range[0] for source in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"all sources of a slice must span the same number of layers: {ranges}")
        return self


class TokenizerConfig(_Strict):
    source: str = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(_Strict):
    """A merge recipe, field for field compatible with mergekit's ``MergeConfiguration``,
    plus ``calibration`` for data-aware methods."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, Any] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None  # the merged model's name: the title of its model card
    calibration: CalibrationConfig | None = None

    @model_validator(mode="after")
    def _one_input_kind(self) -> Recipe:
        given = [key for key in ("models", "slices", "modules") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError("give exactly one of 'models', 'slices' or 'modules'" + (f" (got {', '.join(given)})" if given else ""))
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("'tokenizer_source' and 'tokenizer' cannot both be given")
        return self

    def reference_model(self) -> str:
        """The model whose config, files and tensor names the output takes: the base, else the
        first model (or the first source of the first slice)."""
        if self.base_model:
            return self.base_model
        if self.models:
            return self.models[0].model
        assert self.slices
        return self.slices[0].sources[0].model

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, each once, in recipe order."""
        names: list[str] = []
        if self.base_model:
            names.append(self.base_model)
        for model in self.models or []:
            names.append(model.model)
        for output_slice in self.slices or []:
            if output_slice.base_model:
                names.append(output_slice.base_model)
            names.extend(source.model for source in output_slice.sources)
        if self.tokenizer_source not in (None, "base", "union"):
            names.append(self.tokenizer_source)
        return list(dict.fromkeys(names))

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, by_alias=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-after"))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        field = str(first["loc"][-1])
        known = {
            "": list(Recipe.model_fields),
            "models": list(InputModel.model_fields),
            "slices": list(OutputSlice.model_fields),
            "sources": list(SliceSource.model_fields),
            "calibration": list(CalibrationConfig.model_fields),
        }
        candidates = [name for names in known.values() for name in names]
        close = difflib.get_close_matches(field, candidates, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{source}: unknown field '{location}'{hint}"
    return f"{source}: field '{location}': {message}" if location else f"{source}: {message}"


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, or a :class:`RecipeError` naming ``source`` and the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def load_recipe(recipe: Recipe | Mapping[str, Any] | str | os.PathLike[str]) -> Recipe:
    """Validate a recipe given as a :class:`Recipe`, a dict, a YAML file path or a YAML string.

    Example:
        >>> load_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]})
    """
    if isinstance(recipe, Recipe):
        return recipe
    source = "recipe"
    if isinstance(recipe, (str, os.PathLike)):
        text = str(recipe)
        path = Path(text)
        looks_like_path = "\n" not in text and (text.endswith((".yml", ".yaml")) or path.exists())
        if looks_like_path:
            if not path.is_file():
                raise RecipeError(f"{path}: recipe file not found")
            source = str(path)
            text = path.read_text(encoding="utf-8")
        recipe = parse_yaml(text, source)
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"{source}: a recipe must be a mapping with at least 'merge_method' and 'models' or 'slices'")
    try:
        parsed = Recipe.model_validate(dict(recipe))
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(exc, source)) from None
    if parsed.modules:
        raise RecipeError(f"{source}: 'modules' (multi-module recipes) is not supported yet; use 'models' or 'slices'")
    if parsed.tokenizer_source == "union" or (parsed.tokenizer is not None and parsed.tokenizer.source == "union"):
        raise RecipeError(f"{source}: tokenizer_source: 'union' (merging vocabularies) is not supported yet; use 'base' or a model")
    if parsed.tokenizer is not None:
        raise RecipeError(f"{source}: tokenizer: per-token tokenizer configuration is not supported yet; use tokenizer_source")
    return parsed


# ---------------------------------------------------------------------------------------------
# Parameter values


def interpolate_gradient(gradient: list[Scalar], t: float) -> float:
    """Piecewise-linear interpolation of ``gradient`` at ``t`` in [0, 1] (mergekit's gradients:
    the list's points are spread evenly over the layers of a slice)."""
    if len(gradient) == 1:
        return float(gradient[0])
    position = min(max(t, 0.0), 1.0) * (len(gradient) - 1)
    index = min(int(position), len(gradient) - 2)
    fraction = position - index
    return float(gradient[index]) * (1 - fraction) + float(gradient[index + 1]) * fraction


def resolve_value(value: ParamValue, tensor_name: str, t: float) -> Scalar | None:
    """The scalar a parameter value takes for one tensor at relative layer position ``t``.

    Returns ``None`` when a filter list has no entry matching the tensor and no fallback.
    """
    if isinstance(value, list) and value and isinstance(value[0], FilterEntry):
        for entry in value:
            if entry.filter in (None, "", "*") or entry.filter in tensor_name:
                return resolve_value(entry.value, tensor_name, t)
        return None
    if isinstance(value, list):
        if not value:
            return None
        return interpolate_gradient(cast(list[Scalar], value), t)  # not a filter list: checked above
    return value

