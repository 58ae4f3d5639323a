"""Weight averaging and spherical interpolation, and passthrough.

- ``linear``: model soups / weight averaging (Wortsman et al., 2022, arXiv:2203.05482).
- ``slerp``: spherical linear interpolation of two models (Shoemake, 1985; mergekit ``slerp``).
- ``passthrough``: copy one input, optionally scaled, for layer-stacking frankenmerges.
"""

from __future__ import annotations

import torch

from mergeforge.errors import MethodError
from mergeforge.methods.registry import REQUIRED, BaseUse, Param, register_method

WEIGHT = Param("weight", REQUIRED, per_model=True, help="the model's weight in the sum")


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wᵢ·tᵢ without stacking (one output buffer, no copy of the inputs)."""
    total = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)
    return total


@register_method(
    "linear",
    params=[WEIGHT, Param("normalize", True, kind="bool", help="divide by the sum of weights")],
    math="Σ wᵢ·θᵢ / Σ wᵢ (without normalize: Σ wᵢ·θᵢ)",
    reference="Model soups, Wortsman et al. 2022 (arXiv:2203.05482); mergekit 'linear'",
    elementwise=True,
    notes="The base model, if given, is an input only when it is listed among the models.",
)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float], normalize: bool) -> torch.Tensor:
    if normalize and abs(sum(weight)) < 1e-8:
        raise MethodError("linear: the model weights sum to zero, so they cannot be normalized; set normalize: false")
    if _kernel_eligible(tensors):
        # The NumPy kernel: the one CPU implementation, shared with the torch-free fast path.
        from mergeforge.fastpath import kernels

        sources = [kernels.Source(t.reshape(-1).numpy(), "F32") for t in tensors]
        out = kernels.collect(kernels.linear(sources, weight, normalize), tensors[0].numel())
        return torch.from_numpy(out).view(tensors[0].shape)
    total = weighted_sum(tensors, weight)
    if normalize:
        total.div_(sum(weight))
    return total


def _kernel_eligible(tensors: list[torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


def slerp_tensors(t: float, start: torch.Tensor, end: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between two flattened tensors; plain lerp when nearly colinear."""
    start_norm = start.norm()
    end_norm = end.norm()
    start_dir = start / start_norm if start_norm > eps else start
    end_dir = end / end_norm if end_norm > eps else end
    dot = float((start_dir * end_dir).sum())
    if abs(dot) > dot_threshold:
        return torch.lerp(start, end, t) if start.dtype == end.dtype else (1 - t) * start + t * end
    theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    sin_theta = torch.sin(theta)
    start_scale = float(torch.sin(theta * (1 - t)) / sin_theta)
    end_scale = float(torch.sin(theta * t) / sin_theta)
    return start * start_scale + end * end_scale


@register_method(
    "slerp",
    params=[Param("t", REQUIRED, help="interpolation factor: 0 gives the base, 1 the other model")],
    base=BaseUse.REQUIRED,
    math="sin((1−t)Ω)/sin Ω·θ_base + sin(tΩ)/sin Ω·θ₁, Ω the angle between the flattened tensors",
    reference="Shoemake 1985; mergekit 'slerp'",
    min_models=1,
    max_models=1,
    notes="Falls back to linear interpolation when the tensors are nearly colinear (|cos Ω| > 0.9995).",
)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, t: float) -> torch.Tensor:
    assert base is not None
    if _kernel_eligible([base, tensors[0]]):
        from mergeforge.fastpath import kernels

        start, end = (kernels.Source(x.reshape(-1).numpy(), "F32") for x in (base, tensors[0]))
        out = kernels.collect(kernels.slerp(t, start, end), base.numel())
        return torch.from_numpy(out).view(base.shape)
    return slerp_tensors(t, base, tensors[0])


@register_method(
    "passthrough",
    params=[Param("scale", 1.0, per_model=True, help="multiply the copied tensor by this")],
    math="θ₁·scale (copies its single input)",
    reference="mergekit 'passthrough' (frankenmerges, e.g. SOLAR's depth up-scaling, arXiv:2312.15166)",
    max_models=1,
    elementwise=True,
    notes="Use with slices to stack layer ranges from several models into a deeper one.",
)
def passthrough(tensors: list[torch.Tensor], base: torch.Tensor | None, *, scale: list[float]) -> torch.Tensor:
    return tensors[0] * scale[0] if scale[0] != 1.0 else tensors[0]
