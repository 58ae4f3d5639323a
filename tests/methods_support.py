"""Helpers shared by the method tests: fill a method's parameters from its registered schema,
validate them the way the engine does (``Param.check``), and call the method.

Nothing here computes an expected value: reference values are written out in each test.
"""

from __future__ import annotations

from typing import Any

import torch

from mergeforge.methods import MethodSpec, Param, get_method


def placeholder_value(param: Param) -> Any:
    """A valid value for a required parameter of any method, including ones added later."""
    if param.name == "weight":
        return 1.0
    if param.kind == "bool":
        return False
    low, high = param.low, param.high
    if low is not None and high is not None:
        value = (low + high) / 2
    elif low is not None:
        value = low + 1
    elif high is not None:
        value = high - 1
    else:
        value = 0.5
    return int(value) if param.kind == "int" else value


def resolve_params(method: MethodSpec, n_models: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then overrides; per-model values broadcast to lists; every value checked."""
    unknown = set(overrides) - {param.name for param in method.params}
    if unknown:
        raise KeyError(f"{method.name} has no parameters {sorted(unknown)}")
    resolved: dict[str, Any] = {}
    for param in method.params:
        if param.name in overrides:
            value = overrides[param.name]
        else:
            value = placeholder_value(param) if param.required else param.default
        where = f"test {method.name}"
        if param.per_model:
            values = value if isinstance(value, list) else [value] * n_models
            resolved[param.name] = [param.check(item, where) for item in values]
        else:
            resolved[param.name] = param.check(value, where)
    return resolved


def run_method(
    name: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int = 0,
    **overrides: Any,
) -> torch.Tensor:
    """Call method ``name`` as the engine would (copies of the inputs, a seeded generator for
    random methods) and return its merged tensor."""
    method = get_method(name)
    params = resolve_params(method, len(tensors), overrides)
    generator = torch.Generator().manual_seed(seed) if method.random else None
    output = method.run(
        [tensor.clone() for tensor in tensors], None if base is None else base.clone(), params, generator
    )
    return output[0] if isinstance(output, tuple) else output


def seeded(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """A float32 tensor of standard normal draws from its own generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * scale
