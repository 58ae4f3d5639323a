"""Spherical averaging of several models: ``nuslerp``, ``multislerp`` and ``karcher``.

All three treat a tensor (or each row of it) as a point on a hypersphere times a length, average
the directions along the sphere instead of through it, and restore a mean length. They follow
mergekit's methods of the same names (arcee-ai/mergekit, ``merge_methods/nuslerp.py``,
``multislerp.py``, ``karcher.py``):

- ``nuslerp``: SLERP (Shoemake 1985, "Animating rotation with quaternion curves") between two
  models with t = w₂/(w₁+w₂), over the whole tensor or per row/column; with a base model it
  interpolates the two task vectors.
- ``multislerp``: C. Goddard, "Multi-SLERP" (goddard.blog, 2025): barycentric interpolation on the
  hypersphere through the tangent space at the normalised weighted mean.
- ``karcher``: the Riemannian (Karcher) mean on the unit sphere (H. Karcher 1977, "Riemannian
  center of mass and mollifier smoothing"; Buss & Fillmore 2001 for the fixed-point iteration).
"""

from __future__ import annotations

import torch

from mergeforge.errors import MethodError
from mergeforge.methods.averaging import WEIGHT
from mergeforge.methods.registry import BaseUse, Param, register_method


def slerp_last_dim(t: float, start: torch.Tensor, end: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SLERP between matching vectors along the last dimension (one angle per vector).

    Vectors are compared by direction only (the angle uses each one normalised, norms floored at
    1e-7) but interpolated with their lengths, as mergekit's ``nuslerp`` does. Where the angle's
    sine is below ``eps`` (parallel or antiparallel vectors) the result is the linear
    interpolation. Only per-vector scalars are formed, so memory stays at the output plus inputs.
    """
    start_norm = torch.linalg.vector_norm(start, dim=-1, keepdim=True).clamp_(min=1e-7)
    end_norm = torch.linalg.vector_norm(end, dim=-1, keepdim=True).clamp_(min=1e-7)
    dot = torch.linalg.vecdot(start, end, dim=-1).unsqueeze(-1)
    theta = torch.acos((dot / (start_norm * end_norm)).clamp_(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    colinear = sin_theta.abs() < eps
    # Divide by 1 where colinear so the discarded branch holds no inf/NaN.
    safe_sin = torch.where(colinear, torch.ones_like(sin_theta), sin_theta)
    start_factor = torch.where(colinear, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / safe_sin)
    end_factor = torch.where(colinear, torch.full_like(theta, t), torch.sin(t * theta) / safe_sin)
    return (start * start_factor).add_(end * end_factor)


def nuslerp_tensors(t: float, start: torch.Tensor, end: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """mergekit's ``nuslerp`` kernel: whole-tensor SLERP when ``flatten``; otherwise one SLERP per
    vector along the last dimension, or along dimension 0 when ``row_wise`` (mergekit's flag
    selects ``dim=0``, i.e. the columns of an ``[out, in]`` weight)."""
    shape = start.shape
    if flatten or start.dim() < 2:
        return slerp_last_dim(t, start.reshape(1, -1), end.reshape(1, -1)).reshape(shape)
    if row_wise:
        moved = slerp_last_dim(t, start.transpose(0, -1), end.transpose(0, -1))
        return moved.transpose(0, -1).contiguous()
    return slerp_last_dim(t, start, end)


@register_method(
    "nuslerp",
    params=[
        WEIGHT,
        Param("nuslerp_flatten", True, kind="bool", help="SLERP the whole tensor as one vector (false: per row/column)"),
        Param("nuslerp_row_wise", False, kind="bool", help="without flatten: SLERP vectors along dim 0 instead of the last dim"),
    ],
    base=BaseUse.OPTIONAL,
    min_models=2,
    max_models=2,
    math="SLERP(θ₁, θ₂; t = w₂/(w₁+w₂)); with a base: θ_base + SLERP(δ₁, δ₂; t)",
    citation="Shoemake 1985 (SLERP); mergekit 'nuslerp'",
    notes=(
        "Exactly two models. Weights summing to ~0 give t = 0.5. Norms, biases and other 1-D "
        "tensors are always interpolated as one vector. To reproduce 'slerp', give weights 1−t and t."
    ),
)
def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    nuslerp_flatten: bool,
    nuslerp_row_wise: bool,
) -> torch.Tensor:
    weight_sum = weight[0] + weight[1]
    t = 0.5 if abs(weight_sum) < 1e-6 else weight[1] / weight_sum
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], flatten=nuslerp_flatten, row_wise=nuslerp_row_wise)
    merged_delta = nuslerp_tensors(
        t, tensors[0] - base, tensors[1] - base, flatten=nuslerp_flatten, row_wise=nuslerp_row_wise
    )
    return merged_delta.add_(base)


@register_method(
    "multislerp",
    params=[
        WEIGHT,
        Param("normalize_weights", True, kind="bool", help="divide the weights by their sum"),
        Param("eps", 1e-8, low=0.0, low_open=True, help="numerical floor for norms"),
    ],
    base=BaseUse.OPTIONAL,
    min_models=1,
    math="û = Σ wᵢ θᵢ/‖θᵢ‖ normalised; exp map of Σ wᵢ·log_û(θᵢ/‖θᵢ‖) at û, times Σ wᵢ‖θᵢ‖ (θ → δ with a base)",
    citation="Goddard 2025, Multi-SLERP (goddard.blog); mergekit 'multislerp'",
    notes=(
        "Any number of models; whole tensors are treated as one vector each. With a base it "
        "averages task vectors. Where the weighted directions cancel (e.g. all task vectors zero) "
        "it falls back to the weighted sum Σ wᵢθᵢ (mergekit does so for two models and errors for more). "
        "mergekit 0.1.5's steps, order and dtypes (bf16 weights under a bf16 --math-dtype recipe, the "
        "tangent step kept), so a 16-bit merge rounds as mergekit does."
    ),
)
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: list[float],
    normalize_weights: bool,
    eps: float,
) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    # mergekit 0.1.5's steps in its order and dtypes: the weights are a tensor of the inputs'
    # dtype, every product is rounded to it, and each sum over the models is accumulated wider and
    # rounded once (what torch's sum over a stacked dim does), so a 16-bit --math-dtype recipe
    # rounds as mergekit does. The tangent step is kept although it is zero in exact arithmetic
    # (the weighted tangents at the normalised Σ wᵢuᵢ sum to 0): in 16 bits it is not.
    dtype = tensors[0].dtype
    wide = torch.promote_types(dtype, torch.float32)
    weights = torch.tensor(weight, dtype=dtype, device=tensors[0].device)
    if normalize_weights:
        weight_sum = weights.sum()
        if float(weight_sum.abs()) < 1e-12:
            raise MethodError("multislerp: the model weights sum to zero, so they cannot be normalized; set normalize_weights: false")
        weights = weights / weight_sum

    points = [tensor - base for tensor in tensors] if base is not None else tensors
    norms = torch.stack([torch.linalg.vector_norm(point) for point in points])

    def unit(index: int) -> torch.Tensor:
        # uᵢ = pᵢ/(‖pᵢ‖+eps), recomputed where needed instead of holding N unit tensors.
        return points[index] / (norms[index] + eps)

    accumulator = torch.zeros(points[0].shape, dtype=wide, device=points[0].device)
    for index in range(len(points)):
        accumulator.add_(unit(index) * weights[index])
    mean = accumulator.to(dtype)
    mean_norm = torch.linalg.vector_norm(mean)

    if float(mean_norm) < eps:
        # The weighted directions cancel: the weighted sum Σ wᵢpᵢ (mergekit's fallback for two
        # models; it raises for more).
        merged = points[0] * weights[0]
        for point, model_weight in zip(points[1:], weights[1:], strict=True):
            merged = merged + point * model_weight
    else:
        mean = mean / mean_norm
        # The tangent-space step: uᵢ − (uᵢ·m)m, weighted and summed, mapped back with the
        # exponential map at m (with eps added to the tangent's norm, as mergekit does).
        accumulator.zero_()
        for index in range(len(points)):
            direction = unit(index)
            # Summed wide and rounded once, as torch sums a row of mergekit's stacked units (a
            # 1-D 16-bit sum in torch rounds differently).
            dot = (direction * mean).sum(dtype=wide).to(dtype)
            accumulator.add_((direction - dot * mean) * weights[index])
        tangent = accumulator.to(dtype)
        tangent_norm = torch.linalg.vector_norm(tangent) + eps
        merged = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        merged = merged * (norms * weights).sum()
    if base is not None:
        merged = merged + base
    return merged


def karcher_mean(tensors: list[torch.Tensor], weights: list[float], *, max_iter: int, tol: float) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions, scaled by the weighted mean norm.

    Inputs with norm ≤ ``tol`` take no part in the direction (their weight is dropped and the
    rest renormalised) but still count, as zero, in the norm, as in mergekit.

    The dtypes are mergekit 0.1.5's: norms (of the tensors, the mean and the tangent) in float32
    (float64 for float64 inputs), everything else (unit vectors, dots, angles, the tangent, the
    iterate) in the inputs' dtype, with mergekit's order of operations, so 16-bit math rounds as
    mergekit does (the operand order matters: torch rounds a float32 0-dim tensor to bf16 when it
    is the left operand of a bf16 tensor, as in ``cos(‖v‖)·mean``, not when it is the right one, as
    in ``tensor / norm``). In 16 bits the tangent rarely gets below ``tol``: all ``max_iter`` steps run.
    """
    dtype = tensors[0].dtype
    norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def norm_of(tensor: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(tensor.to(norm_dtype))

    norms = [norm_of(tensor) for tensor in tensors]
    valid = [index for index, tensor_norm in enumerate(norms) if float(tensor_norm) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    valid_weight_sum = sum(weights[index] for index in valid)
    alphas = [weights[index] / valid_weight_sum for index in valid]
    units = [(tensors[index] / norms[index]).to(dtype) for index in valid]

    # Start from the normalised weighted arithmetic mean of the unit directions.
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units, strict=True):
        mean += alpha * unit
    mean_norm = norm_of(mean)
    mean = units[0].clone() if float(mean_norm) < tol else (mean / mean_norm).to(dtype)

    for _ in range(max_iter):
        # Riemannian gradient step: the weighted mean of the log maps log_mean(uᵢ).
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units, strict=True):
            cos_theta = torch.dot(mean.reshape(-1), unit.reshape(-1)).clamp(-1.0, 1.0)
            theta = torch.arccos(cos_theta)
            if float(theta) < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - cos_theta * mean)
        tangent_norm = norm_of(tangent)
        if float(tangent_norm) < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(dtype)
        renorm = norm_of(mean)
        if float(renorm) > tol:
            mean = (mean / renorm).to(dtype)

    scale = sum((model_weight * tensor_norm for model_weight, tensor_norm in zip(weights, norms, strict=True)), torch.zeros((), dtype=norm_dtype))
    return (scale * mean).to(dtype)


@register_method(
    "karcher",
    params=[
        Param("max_iter", 10, kind="int", low=0, help="maximum Riemannian fixed-point iterations"),
        Param("tol", 1e-5, low=0.0, low_open=True, help="stop when the tangent step is shorter than this"),
    ],
    base=BaseUse.NONE,
    math="argmin_u Σ (1/N)·arccos(u·θᵢ/‖θᵢ‖)² on the unit sphere, times (1/N)·Σ‖θᵢ‖",
    citation="Karcher 1977, Riemannian center of mass; mergekit 'karcher'",
    notes=(
        "Equal weights for every input, as in mergekit; the base model is an input only when it "
        "is listed among the models. Whole tensors (matrices, norms, biases) are one point each. "
        "Computed in the math dtype with float32 norms, in mergekit 0.1.5's order, so a bf16 "
        "--math-dtype recipe merge rounds as mergekit does."
    ),
)
def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, *, max_iter: int, tol: float) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter=max_iter, tol=tol)
