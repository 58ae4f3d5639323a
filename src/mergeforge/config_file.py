"""The YAML files of the feature commands (``moe``, ``evolve``, ``federated``): read, validated
against their pydantic schema, and every problem reported in one line naming the file and field."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mergeforge.errors import RecipeError, closest

Config = TypeVar("Config", bound=BaseModel)


def validation_message(error: ValidationError, source: str, schemas: Sequence[type[BaseModel]]) -> str:
    """pydantic's first error as one line; an unknown field gets the closest field name of ``schemas``."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        close = closest(str(first["loc"][-1]), [name for schema in schemas for name in schema.model_fields])
        return f"{source}: unknown field '{location}'" + (f"; did you mean '{close}'?" if close else "")
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{source}: field '{location}': {message}" if location else f"{source}: {message}"


def load_config_file(config: dict[str, Any] | str | os.PathLike[str], schema: type[Config], *, what: str, source: str,
                     mapping: str, schemas: Sequence[type[BaseModel]] = (),
                     message: Callable[[ValidationError, str], str | None] = lambda error, source: None,
                     ) -> tuple[Config, str, Path]:
    """``config`` (a mapping, or the path of a YAML file holding one) validated as ``schema``.

    Returns the config, the name errors give it (the file's path, else ``source``) and the folder
    its relative paths are read from (the file's, else the working directory). ``what`` names the
    file kind in "not found", ``mapping`` says what the mapping holds, ``schemas`` are where an
    unknown field's closest name is looked for (besides ``schema``), and ``message`` may word an
    error itself (None: the generic line)."""
    folder, data = Path.cwd(), config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise RecipeError(f"{path}: {what} not found")
        from mergeforge.engine.recipe import parse_yaml

        source, folder = str(path), path.resolve().parent
        data = parse_yaml(path.read_text(encoding="utf-8"), source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {mapping}")
    try:
        return schema.model_validate(data), source, folder
    except ValidationError as exc:
        raise RecipeError(message(exc, source) or validation_message(exc, source, [schema, *schemas])) from None
