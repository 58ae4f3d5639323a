"""Small rules of planning, torch-free: layer indices in tensor names, per-tensor seeds, parameter
precedence and size strings."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from mergeforge.engine.recipe import Parameters, resolve_value
from mergeforge.errors import RecipeError

LAYER_PATTERN = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor name belongs to (``model.layers.3.mlp...`` -> 3), else None."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(3)) if match else None


def with_layer_index(name: str, index: int) -> str:
    match = LAYER_PATTERN.search(name)
    assert match is not None
    return f"{name[: match.start(3)]}{index}{name[match.end(3):]}"


def count_layers(names: Sequence[str]) -> int:
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def job_seed(seed: int, name: str) -> int:
    """The seed of one tensor's random draws: the same for a tensor whatever else is merged."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def first_value(name: str, levels: Sequence[Parameters | None], tensor_name: str, t: float) -> Any:
    """Parameter ``name`` for one tensor: the first level (most specific first, e.g. a model's own,
    then the slice's, then the top level) whose value applies to the tensor, else None."""
    for parameters in levels:
        if parameters and name in parameters:
            value = resolve_value(parameters[name], tensor_name, t)
            if value is not None:
                return value
    return None


def parse_size(text: str | int) -> int:
    """``2GB``, ``500M``, ``1.5GiB`` or a plain byte count."""
    if isinstance(text, int):
        size = text
    else:
        value = str(text).strip().upper().replace(" ", "")
        units = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
                 "T": 1000**4, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
        number = value.rstrip("KMGTIB")
        try:
            size = int(float(number) * units[value[len(number):]])
        except (ValueError, KeyError):
            raise RecipeError(f"size '{text}': use a byte count or a number with a unit (e.g. 2GB, 500MB, 1GiB)") from None
    if size <= 0:
        raise RecipeError(f"size '{text}' must be positive")
    return size
