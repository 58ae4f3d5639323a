"""Recipes: mergekit-compatible YAML (or dicts), validated, and parameter values resolved per tensor.

A recipe names a ``merge_method`` and its inputs, either as ``models:`` (every layer of each model)
or as ``slices:`` (layer ranges, possibly from different models, stacked in order). Parameter values
may be scalars, gradients (lists interpolated over the layer index within a slice) or filter lists
(``- filter: self_attn`` / ``value: ...``; first match wins; an entry without a filter is the
fallback), with mergekit's precedence: source > slice > top level.

Unknown fields are errors, never silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mergeforge.calibration.config import CalibrationConfig
from mergeforge.errors import RecipeError, closest
from mergeforge.tokenizer.chat_templates import check_chat_template
from mergeforge.tokenizer.config import (
    BASE,
    UNION,
    ModelToken,
    TokenizerSpec,
    TokenOverride,
    TokenSource,
    ZeroRow,
)

Scalar = Union[bool, int, float]


class FilterEntry(BaseModel):
    """One entry of a filter list: applies ``value`` to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


# ---------------------------------------------------------------------------------------------
# Parameter values, read by hand: pydantic would try each shape of the union in turn and report
# the last branch's complaint ("parameters.t.bool: Input should be a valid boolean"), which names
# neither the key at fault nor the shape that was meant.

Path_ = tuple[Union[str, int], ...]  # a place inside a parameter value: list indices and keys
FILTER_KEYS = ("filter", "value")
# What people write for 'filter' that no edit distance would suggest (mergekit's own
# examples/gradient-slerp.yml once wrote 'pattern').
FILTER_SYNONYMS = frozenset({"pattern", "regex", "match", "name", "tensor", "select", "where", "filters"})
VALUE_SHAPES = "a number, a list of numbers (a gradient over the layers) or a list of {filter, value} entries"


class ParameterValueError(Exception):
    """A malformed parameter value: ``message`` about the part at ``where`` (relative to the
    parameter); ``key`` is the unknown key, for the line number."""

    def __init__(self, where: Path_, message: str, key: str | None = None):
        super().__init__(message)
        self.where, self.message, self.key = where, message, key


def _scalar(raw: Any, where: Path_, expected: str) -> Scalar:
    """A number (or true/false); numeric text is read as a number, as pydantic's lax mode did."""
    if isinstance(raw, (bool, int, float)):
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("true", "false"):
            return text == "true"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    got = "nothing" if raw is None else ("a list" if isinstance(raw, list) else
                                          "a mapping" if isinstance(raw, Mapping) else repr(raw))
    raise ParameterValueError(where, f"expected {expected}, got {got}")


def _scalar_or_gradient(raw: Any, where: Path_, expected: str) -> Scalar | list[Scalar]:
    if isinstance(raw, list):
        if not raw:
            raise ParameterValueError(where, f"an empty list; give {expected}")
        return [_scalar(item, (*where, i), "a number") for i, item in enumerate(raw)]
    return _scalar(raw, where, expected)


def _filter_entry(raw: Mapping[Any, Any] | FilterEntry, where: Path_) -> FilterEntry:
    if isinstance(raw, FilterEntry):
        return raw
    for key in raw:
        if key not in FILTER_KEYS:
            match = "filter" if str(key).lower() in FILTER_SYNONYMS else closest(str(key), FILTER_KEYS)
            hint = f"; did you mean '{match}'?" if match else ""
            # mergekit drops unknown keys here: an entry left without a filter matches every tensor.
            silent = "; mergekit would ignore it and apply this entry to every tensor" if "filter" not in raw and "value" in raw else ""
            raise ParameterValueError(
                where, f"unknown key '{key}' in a filter entry{hint} (an entry has 'filter', a substring of tensor "
                       f"names, and 'value'){silent}", key=str(key))
    if "value" not in raw:
        raise ParameterValueError(where, "a filter entry needs a 'value' (and optionally a 'filter')")
    filter_text = raw.get("filter")
    if filter_text is not None and not isinstance(filter_text, str):
        raise ParameterValueError((*where, "filter"), f"a filter is a substring of tensor names (text), got {filter_text!r}")
    value = _scalar_or_gradient(raw["value"], (*where, "value"), "a number or a list of numbers (a gradient)")
    return FilterEntry(filter=filter_text, value=value)


def parse_parameter_value(raw: Any) -> ParamValue:
    """A parameter value checked and typed: a scalar, a gradient, or a filter list (a single
    ``{filter, value}`` mapping, as mergekit also accepts, becomes a list of one).

    Raises:
        ParameterValueError: naming the part at fault, e.g. ``[0]``: unknown key 'pattern'.
    """
    if isinstance(raw, (Mapping, FilterEntry)):
        return [_filter_entry(raw, ())]
    if isinstance(raw, list) and any(isinstance(item, (Mapping, FilterEntry)) for item in raw):
        entries = []
        for i, item in enumerate(raw):
            if not isinstance(item, (Mapping, FilterEntry)):
                raise ParameterValueError((i,), f"a filter list holds only {{filter, value}} entries, got {item!r}")
            entries.append(_filter_entry(item, (i,)))
        return entries
    return _scalar_or_gradient(raw, (), VALUE_SHAPES)


def _checked(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """pydantic's hook around a hand-written parser: its error carries the place and the message
    to :func:`_format_validation_error` untouched."""

    def validate(raw: Any) -> Any:
        try:
            return parse(raw)
        except ParameterValueError as bad:
            raise PydanticCustomError("parameter_value", "{message}",
                                      {"message": bad.message, "where": bad.where, "key": bad.key}) from None

    return validate


def _dump_parameter_value(value: ParamValue) -> Any:
    """The YAML/JSON form of a checked value (a filter entry without a filter omits it)."""
    if isinstance(value, list):
        return [item.model_dump(exclude_none=True) if isinstance(item, FilterEntry) else item for item in value]
    return value


ParamValue = Union[Scalar, list[Scalar], list[FilterEntry]]
Parameters = dict[str, Annotated[ParamValue, PlainValidator(_checked(parse_parameter_value)), PlainSerializer(_dump_parameter_value)]]


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


# ---------------------------------------------------------------------------------------------
# The tokenizer block, mergekit's mergekit/tokenizer/config.py. A token's source is read by hand
# for the reason parameter values are: a union's branch errors name nothing useful.

TOKEN_SOURCE_KEYS = {"model_token": ("kind", "model", "token", "token_id"), "zero": ("kind",)}


def parse_token_source(raw: Any) -> TokenSource:
    """A ``tokens:`` entry's ``source``: a model reference, ``{kind: model_token, model, token |
    token_id}`` or ``{kind: zero}``.

    Raises:
        ParameterValueError: naming the part at fault, e.g. unknown kind 'zeros'.
    """
    if raw is None or isinstance(raw, (str, ModelToken, ZeroRow)):
        return raw
    if not isinstance(raw, Mapping):
        raise ParameterValueError((), f"expected a model reference or a mapping with 'kind' (model_token or zero), got {raw!r}")
    kind = raw.get("kind")
    if kind not in TOKEN_SOURCE_KEYS:
        match = closest(str(kind), TOKEN_SOURCE_KEYS) if kind is not None else None
        hint = f"; did you mean '{match}'?" if match else ""
        raise ParameterValueError(("kind",), f"unknown kind {kind!r}{hint} (use model_token or zero)" if kind is not None
                                  else "a token source mapping needs 'kind': model_token or zero")
    allowed = TOKEN_SOURCE_KEYS[kind]
    for key in raw:
        if key not in allowed:
            match = closest(str(key), allowed)
            hint = f"; did you mean '{match}'?" if match else ""
            raise ParameterValueError((), f"unknown key '{key}' in a {kind} source{hint} (it has {', '.join(allowed)})", key=str(key))
    if kind == "zero":
        return ZeroRow()
    model, token, token_id = raw.get("model"), raw.get("token"), raw.get("token_id")
    if not isinstance(model, str) or not model:
        raise ParameterValueError(("model",), "a model_token source needs 'model', the model whose row is taken")
    if (token is None) == (token_id is None):
        raise ParameterValueError((), "a model_token source needs exactly one of 'token' (text) and 'token_id' (a row)")
    if token is not None and not isinstance(token, str):
        raise ParameterValueError(("token",), f"'token' is the token's text, got {token!r}")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise ParameterValueError(("token_id",), f"'token_id' is a row number (0 or more), got {token_id!r}")
    return ModelToken(model=model, token=token, token_id=token_id)


def _dump_token_source(source: TokenSource) -> Any:
    if isinstance(source, ZeroRow):
        return {"kind": "zero"}
    if isinstance(source, ModelToken):
        key, value = ("token", source.token) if source.token is not None else ("token_id", source.token_id)
        return {"kind": "model_token", "model": source.model, key: value}
    return source


class TokenSetting(_Strict):
    """An entry of ``tokenizer.tokens``: where the token's row comes from, and whether every model
    takes it (``force``) or only the models that lack the token."""

    source: Annotated[Any, PlainValidator(_checked(parse_token_source)), PlainSerializer(_dump_token_source)] = None
    force: bool = False


class TokenizerConfig(_Strict):
    """The ``tokenizer:`` block: the vocabulary's ``source`` (``union``, ``base`` or a model),
    per-token ``tokens`` overrides, and ``pad_to_multiple_of`` for the vocabulary's rows."""

    source: str = UNION
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


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
        """Every model the recipe reads, base first, each once, in recipe order; a model named
        only as the tokenizer's source comes last."""
        source = self.tokenizer_model()
        return list(dict.fromkeys([*self.merged_models(), *([source] if source is not None else [])]))

    def merged_models(self) -> list[str]:
        """The models whose weights the merge reads, base first, each once, in recipe order."""
        names: list[str] = []
        if self.base_model:
            names.append(self.base_model)
        for model in self.models or []:
            names.append(model.model)
        for output_slice in self.slices or []:
            if output_slice.base_model:
                names.append(output_slice.base_model)
            names.extend(source.model for source in output_slice.sources)
        return list(dict.fromkeys(names))

    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The output vocabulary asked for (``tokenizer_source`` or the ``tokenizer:`` block), or
        ``None``: the reference model's tokenizer files are copied and no tensor is remapped."""
        if self.tokenizer is not None:
            tokens = {token: TokenOverride(setting.source, setting.force) for token, setting in (self.tokenizer.tokens or {}).items()}
            return TokenizerSpec(self.tokenizer.source, tokens, self.tokenizer.pad_to_multiple_of)
        return TokenizerSpec(self.tokenizer_source) if self.tokenizer_source is not None else None

    def tokenizer_model(self) -> str | None:
        """The model named as the vocabulary's source (not ``union`` or ``base``), if any."""
        spec = self.tokenizer_spec()
        return spec.source if spec is not None and spec.source not in (UNION, BASE) else None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True, by_alias=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def format_location(parts: Sequence[str | int]) -> str:
    """``("slices", 0, "parameters", "t", 1)`` -> ``slices[0].parameters.t[1]``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def yaml_line(node: yaml.Node | None, parts: Sequence[str | int]) -> int | None:
    """The 1-based line of the key or item at ``parts`` in a composed YAML document (the deepest
    one that exists), or ``None`` without a document."""
    line = None if node is None else node.start_mark.line + 1
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _document_node(text: str | None, document: int) -> yaml.Node | None:
    """Document ``document`` of ``text``, composed (positions only; read again only for an error)."""
    if text is None:
        return None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    return nodes[document] if document < len(nodes) else None


def _format_validation_error(error: ValidationError, source: str, node: yaml.Node | None = None) -> str:
    """One line naming the file (and line), the field and what is wrong: never pydantic's text
    about the branches of a union."""
    first = error.errors()[0]
    parts: list[str | int] = [part for part in first["loc"] if not str(part).startswith("function-after")]
    message = first["msg"].removeprefix("Value error, ")
    line_parts = parts
    if first["type"] == "parameter_value":
        context = first.get("ctx") or {}
        parts = [*parts, *context["where"]]
        line_parts = [*parts, context["key"]] if context.get("key") else parts
        message = context["message"]
    line = yaml_line(node, line_parts)
    where = f"{source}, line {line}" if line is not None else source
    location = format_location(parts)
    if first["type"] == "extra_forbidden":
        field = str(parts[-1])
        known = {
            "": list(Recipe.model_fields),
            "models": list(InputModel.model_fields),
            "slices": list(OutputSlice.model_fields),
            "sources": list(SliceSource.model_fields),
            "calibration": list(CalibrationConfig.model_fields),
            "tokenizer": list(TokenizerConfig.model_fields),
            "tokens": list(TokenSetting.model_fields),
        }
        match = closest(field, [name for names in known.values() for name in names])
        hint = f"; did you mean '{match}'?" if match else ""
        return f"{where}: unknown field '{location}'{hint}"
    return f"{where}: field '{location}': {message}" if location else f"{where}: {message}"


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, or a :class:`RecipeError` naming ``source`` and the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None


def parse_yaml_documents(text: str, source: str) -> list[Any]:
    """Every document of a ``---``-separated YAML stream (one for an ordinary recipe)."""
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None


def _yaml_error(exc: yaml.YAMLError, source: str) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return RecipeError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}")


def read_recipe_text(recipe: str | os.PathLike[str]) -> tuple[str, str]:
    """(text, source) of a recipe given as a YAML file path or YAML text; ``source`` names the
    file for messages (``recipe`` for text)."""
    text = str(recipe)
    path = Path(text)
    looks_like_path = "\n" not in text and (text.endswith((".yml", ".yaml")) or path.exists())
    if not looks_like_path:
        return text, "recipe"
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    return path.read_text(encoding="utf-8"), str(path)


def load_recipe(recipe: Recipe | Mapping[str, Any] | str | os.PathLike[str]) -> Recipe:
    """Validate a recipe given as a :class:`Recipe`, a dict, a YAML file path or a YAML string.

    Example:
        >>> load_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]})
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        text, source = read_recipe_text(recipe)
        return validate_recipe(parse_yaml(text, source), source, text)
    return validate_recipe(recipe, "recipe")


def validate_recipe(data: Any, source: str, text: str | None = None, document: int = 0) -> Recipe:
    """A parsed YAML document (or dict) as a :class:`Recipe`, or a :class:`RecipeError` naming
    ``source``, the field and, when ``text`` is given, the line in document ``document`` of it."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe must be a mapping with at least 'merge_method' and 'models' or 'slices'")
    try:
        parsed = Recipe.model_validate(dict(data))
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(exc, source, _document_node(text, document))) from None
    if parsed.modules:
        raise RecipeError(f"{source}: 'modules' (multi-module recipes) is not supported yet; use 'models' or 'slices'")
    if parsed.chat_template is not None:
        try:
            check_chat_template(parsed.chat_template)
        except RecipeError as exc:
            line = yaml_line(_document_node(text, document), ["chat_template"])
            raise RecipeError(f"{source}{f', line {line}' if line else ''}: {exc}") from None
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

