"""Weight averaging and spherical interpolation, and passthrough.

- ``linear``: model soups / weight averaging (Wortsman et al., 2022, arXiv:2203.05482).
- ``slerp``: spherical linear interpolation of two models (Shoemake, 1985; mergekit ``slerp``).
- ``passthrough``: copy one input, optionally scaled, for layer-stacking frankenmerges.

``linear`` and ``slerp`` have NumPy kernels (the CPU float32 implementation, used by both
executors); the torch functions compute on the GPU and in float64. This module imports torch only
inside its torch functions, so planning these methods needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mergeforge.errors import MethodError
from mergeforge.methods.kernels import Blocks, Kernel, Source, held_blocks, ranges
from mergeforge.methods.registry import REQUIRED, BaseUse, Param, register_method

if TYPE_CHECKING:
    import torch

WEIGHT = Param("weight", REQUIRED, per_model=True, help="the model's weight in the sum")


# -- linear -----------------------------------------------------------------------------------


def _check_weights(weight: Sequence[float], normalize: bool) -> None:
    if normalize and abs(sum(weight)) < 1e-8:
        raise MethodError("linear: the model weights sum to zero, so they cannot be normalized; set normalize: false")


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wᵢ·tᵢ without stacking (one output buffer, no copy of the inputs)."""
    total = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)
    return total


def linear_kernel(tensors: Sequence[Source], base: Source | None, *, weight: Sequence[float], normalize: bool) -> Blocks:
    """Σ wᵢ·tᵢ, divided by Σ wᵢ when ``normalize``."""
    _check_weights(weight, normalize)
    weight_sum = float(sum(weight))
    for start, stop in ranges(tensors[0].size):
        total = tensors[0].block(start, stop)
        total *= np.float32(weight[0])
        for tensor, model_weight in zip(tensors[1:], weight[1:]):
            term = tensor.block(start, stop)
            term *= np.float32(model_weight)
            total += term
        if normalize:
            total /= np.float32(weight_sum)
        yield start, total


@register_method(
    "linear",
    float32_math=True,  # mergekit computes it in float32 too
    params=[WEIGHT, Param("normalize", True, kind="bool", help="divide by the sum of weights")],
    math="Σ wᵢ·θᵢ / Σ wᵢ (without normalize: Σ wᵢ·θᵢ)",
    citation="Model soups, Wortsman et al. 2022 (arXiv:2203.05482); mergekit 'linear'",
    elementwise=True,
    notes="The base model, if given, is an input only when it is listed among the models.",
    # The sum and one scaled term, beside a block of each input.
    kernel=Kernel(linear_kernel, lambda numel, inputs: held_blocks(numel, 2 + inputs)),
)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float], normalize: bool) -> torch.Tensor:
    _check_weights(weight, normalize)
    total = weighted_sum(tensors, weight)
    if normalize:
        total.div_(sum(weight))
    return total


# -- slerp ------------------------------------------------------------------------------------

DOT_THRESHOLD = 0.9995  # |cos Ω| above this: the tensors are nearly colinear, so interpolate linearly
NORM_EPS = 1e-8


def slerp_tensors(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two flattened tensors; plain lerp when nearly colinear."""
    import torch

    start_norm = start.norm()
    end_norm = end.norm()
    start_dir = start / start_norm if start_norm > NORM_EPS else start
    end_dir = end / end_norm if end_norm > NORM_EPS else end
    dot = float((start_dir * end_dir).sum())
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(start, end, t) if start.dtype == end.dtype else (1 - t) * start + t * end
    theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    sin_theta = torch.sin(theta)
    start_scale = float(torch.sin(theta * (1 - t)) / sin_theta)
    end_scale = float(torch.sin(theta * t) / sin_theta)
    return start * start_scale + end * end_scale


def slerp_scales(t: float, start: Source, end: Source) -> tuple[float, float]:
    """The two coefficients of slerp (or of lerp when the tensors are nearly colinear)."""
    start_sq = end_sq = dot = 0.0
    for lo, hi in ranges(start.size):
        a, b = start.block(lo, hi), end.block(lo, hi)
        start_sq += float(np.dot(a, a))
        end_sq += float(np.dot(b, b))
        dot += float(np.dot(a, b))
    start_norm, end_norm = math.sqrt(start_sq), math.sqrt(end_sq)
    cosine = dot / ((start_norm if start_norm > NORM_EPS else 1.0) * (end_norm if end_norm > NORM_EPS else 1.0))
    if abs(cosine) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cosine)))
    sin_theta = math.sin(theta)
    return math.sin(theta * (1 - t)) / sin_theta, math.sin(theta * t) / sin_theta


def slerp_kernel(tensors: Sequence[Source], base: Source | None, *, t: float) -> Blocks:
    """Spherical interpolation from the base to the one other model, over the flattened tensors."""
    assert base is not None
    end = tensors[0]
    start_scale, end_scale = slerp_scales(t, base, end)
    for lo, hi in ranges(base.size):
        a = base.block(lo, hi)
        a *= np.float32(start_scale)
        b = end.block(lo, hi)
        b *= np.float32(end_scale)
        a += b
        yield lo, a


@register_method(
    "slerp",
    float32_math=True,  # mergekit computes it in float32 too
    params=[Param("t", REQUIRED, help="interpolation factor: 0 gives the base, 1 the other model")],
    base=BaseUse.REQUIRED,
    math="sin((1−t)Ω)/sin Ω·θ_base + sin(tΩ)/sin Ω·θ₁, Ω the angle between the flattened tensors",
    citation="Shoemake 1985; mergekit 'slerp'",
    min_models=1,
    max_models=1,
    notes="Falls back to linear interpolation when the tensors are nearly colinear (|cos Ω| > 0.9995).",
    # Both scaled blocks and their sum, beside a block of each input.
    kernel=Kernel(slerp_kernel, lambda numel, inputs: held_blocks(numel, 3 + inputs)),
)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, t: float) -> torch.Tensor:
    assert base is not None
    return slerp_tensors(t, base, tensors[0])


# -- passthrough ------------------------------------------------------------------------------


@register_method(
    "passthrough",
    params=[Param("scale", 1.0, per_model=True, help="multiply the copied tensor by this")],
    math="θ₁·scale (copies its single input)",
    citation="mergekit 'passthrough' (frankenmerges, e.g. SOLAR's depth up-scaling, arXiv:2312.15166)",
    max_models=1,
    elementwise=True,
    notes="Use with slices to stack layer ranges from several models into a deeper one.",
)
def passthrough(tensors: list[torch.Tensor], base: torch.Tensor | None, *, scale: list[float]) -> torch.Tensor:
    return tensors[0] * scale[0] if scale[0] != 1.0 else tensors[0]
