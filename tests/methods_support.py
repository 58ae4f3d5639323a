"""Helpers shared by the method tests: fill a method's parameters from its registered schema,
validate them the way the engine does (``Param.check``), and call the method.

Every test in a ``test_methods_*`` module runs twice (see ``conftest.pytest_generate_tests``):
:func:`run_method` computes in :data:`COMPUTE_DTYPE`, float32 (on the CPU, the NumPy kernels of the
methods that have one) and float64 (their torch code, as on a GPU), and returns float32.

Nothing here computes an expected value: reference values are written out in each test.
"""

from __future__ import annotations

from typing import Any

import torch

from mergeforge.methods import MethodSpec, Param, get_method

# The dtype run_method computes in; the method_dtype fixture sets it for each test.
COMPUTE_DTYPE = torch.float32


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
        value = overrides.get(param.name, placeholder_value(param) if param.required else None)
        where = f"test {method.name}"
        if param.per_model:
            values = value if isinstance(value, list) else [value] * n_models
            resolved[param.name] = [param.resolve(item, where) for item in values]
        else:
            resolved[param.name] = param.resolve(value, where)
    return resolved


def run_method(
    name: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    seed: int = 0,
    compute_dtype: torch.dtype = COMPUTE_DTYPE,
    **overrides: Any,
) -> torch.Tensor:
    """Call method ``name`` as the engine would (copies of the inputs in ``compute_dtype``, by
    default :data:`COMPUTE_DTYPE`; bfloat16 is what ``--math-dtype recipe`` gives a bf16 recipe; a
    seeded generator for random methods) and return its merged tensor in the inputs' dtype."""
    method = get_method(name)
    params = resolve_params(method, len(tensors), overrides)
    generator = torch.Generator().manual_seed(seed) if method.random else None
    dtype = tensors[0].dtype
    output = method.run(
        [tensor.to(compute_dtype, copy=True) for tensor in tensors],
        None if base is None else base.to(compute_dtype, copy=True),
        params,
        generator,
    )
    merged = output[0] if isinstance(output, tuple) else output
    return merged.to(dtype) if merged.is_floating_point() else merged


def seeded(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """A float32 tensor of standard normal draws from its own generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * scale


def dare_reference(base: torch.Tensor, finetunes: list[torch.Tensor], weights: list[float], density: float, seed: int,
                   consensus: bool, lambda_: float = 1.0) -> torch.Tensor:
    """DARE computed directly, in float64: task vector i keeps an entry where its draw is below
    density·2³² (SFC64 seeded by ``seed + i`` and the block index 0, as documented in
    ``_task_vector_kernels.bernoulli_keep``), is rescaled to its own L1 norm and weighted; with
    ``consensus`` (dare_ties) only entries agreeing with the elected sign are summed."""
    from mergeforge.methods._task_vector_kernels import bernoulli_keep

    kept = []
    for index, (finetune, weight) in enumerate(zip(finetunes, weights)):
        delta = (finetune.double() - base.double()).flatten()
        dropped = delta * torch.from_numpy(bernoulli_keep(seed + index, 0, delta.numel(), density))
        dropped = dropped * (delta.abs().sum() / dropped.abs().sum())
        kept.append(dropped * weight)
    stacked = torch.stack(kept)
    if consensus:
        stacked = stacked * (torch.sign(stacked) == torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double())
    return (base.double().flatten() + lambda_ * stacked.sum(0)).reshape(base.shape)
