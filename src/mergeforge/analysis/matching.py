"""Weight matching: the legal permutation of model B that brings its weights closest to model A's.

Git Re-Basin's weight matching (Ainsworth et al., arXiv:2209.04836, section 3.2) maximises
``Σ_w <W_A, P(W_B)>`` over the permutations ``P`` of the symmetry group
(:mod:`mergeforge.analysis.symmetry`), which is minimising the L2 distance between the two
weight vectors. For one permutation with every other one fixed this is a linear assignment
problem, solved exactly by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``);
the paper alternates over the permutations (coordinate descent) until none changes, and so do we:

- **Within a layer**, given the residual stream's permutation, the MLP permutation is independent
  of everything else (one assignment). The attention parts interact: for every pair of KV heads,
  the query heads within the group and the value dimensions within the head are matched by
  coordinate descent; the KV heads are then one assignment over the pairs' objectives
  (:func:`match_layer`).
- **The residual stream** touches every layer. It starts from the assignment of the
  token-indexed tensors (embeddings, ``lm_head``, final norm), which depend on no other
  permutation; then each sweep re-matches every layer given the residual permutation, and the
  residual permutation given every layer and the token-indexed tensors, until it stops changing
  (then the layers are a fixed point too). Starting from the identity instead (as the paper
  does) got stuck short of a known permutation on a tiny Qwen2 in the tests; on the zoo's scratch
  pair it ends at a larger weight distance (docs/foundations.md).
- **Without the residual stream**, layers are independent given the fixed residual basis, and one
  pass is exact coordinate descent's fixed point.

Each sweep reads both models one layer at a time, so memory is one layer of each model plus the
``hidden × hidden`` residual objective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from mergeforge.analysis.symmetry import (
    ATTENTION_ROLES,
    GLOBAL_AXES,
    LAYER_AXES,
    LAYER_TENSOR,
    DecoderShape,
    LayerPermutation,
    ModelPermutation,
    Role,
    carries_sign,
    identity,
    permute_axes,
)

if TYPE_CHECKING:
    import torch

TensorReader = Callable[[str], "torch.Tensor"]  # a tensor by name, as float32
Features = Callable[["torch.Tensor", Role], "torch.Tensor"]  # the role's axis first -> [units, features]
MAX_LAYER_ROUNDS = 20
MAX_SWEEPS = 30


def assignment(similarity: torch.Tensor) -> np.ndarray:
    """The permutation ``p`` maximising ``Σ_i similarity[i, p[i]]`` (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    rows, columns = linear_sum_assignment(similarity.double().cpu().numpy(), maximize=True)
    return np.asarray(columns[np.argsort(rows)], dtype=np.int64)


class Similarity(NamedTuple):
    """An assignment objective, split into the part a sign flip of a unit leaves alone (``fixed``)
    and the part it negates (``flippable``)."""

    fixed: torch.Tensor
    flippable: torch.Tensor

    def __add__(self, other: object) -> Similarity:
        assert isinstance(other, Similarity)
        return Similarity(self.fixed + other.fixed, self.flippable + other.flippable)

    def total(self) -> torch.Tensor:
        return self.fixed + self.flippable


def signed_assignment(objective: Similarity, signs: bool) -> tuple[np.ndarray, np.ndarray]:
    """The best permutation and, with ``signs``, the best sign of each unit: a flipped unit scores
    ``fixed - flippable``, so each pair takes ``fixed + |flippable|`` and the sign of ``flippable``."""
    if not signs:
        chosen = assignment(objective.total())
        return chosen, np.ones(chosen.size, dtype=np.int64)
    chosen = assignment(objective.fixed + objective.flippable.abs())
    picked = objective.flippable[np.arange(chosen.size), chosen].cpu().numpy()
    return chosen, np.where(picked < 0, -1, 1).astype(np.int64)


@dataclass(frozen=True)
class Layout:
    """A model's tensor names: per layer, suffix (``mlp.up_proj.weight``) -> full name; and the rest."""

    layers: tuple[dict[str, str], ...]
    global_names: tuple[str, ...]


def layout_of(names: Iterable[str], shape: DecoderShape) -> Layout:
    layers: list[dict[str, str]] = [{} for _ in range(shape.layers)]
    global_names = []
    for name in names:
        match = LAYER_TENSOR.fullmatch(name)
        if match and match.group(2) in LAYER_AXES:
            layers[int(match.group(1))][match.group(2)] = name
        else:
            global_names.append(name)
    return Layout(tuple(layers), tuple(global_names))


def similarity(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], roles_of: Mapping[str, tuple[Role | None, ...]],
               roles: tuple[Role, ...], features_a: Features, features_b: Features | None = None) -> Similarity:
    """``Σ`` over every axis with one of ``roles`` of ``features(A) @ features(B).T``: the
    assignment objective of the units the features pick out, split by :func:`carries_sign`."""
    import torch

    features_b = features_b or features_a
    parts: dict[bool, torch.Tensor] = {}
    for key, tensor_a in a.items():
        for axis, role in enumerate(roles_of.get(key, ())):
            if role in roles:
                term = features_a(tensor_a.movedim(axis, 0), role) @ features_b(b[key].movedim(axis, 0), role).T
                flippable = carries_sign(key, role)
                parts[flippable] = parts[flippable] + term if flippable in parts else term
    if not parts:
        raise ValueError(f"no tensor has an axis of roles {roles}")
    like = next(iter(parts.values()))
    return Similarity(parts.get(False, torch.zeros_like(like)), parts.get(True, torch.zeros_like(like)))


def units(count: int) -> Features:
    """Features of ``count`` equal consecutive blocks of the axis (units, or whole heads)."""
    return lambda rows, role: rows.reshape(count, -1)


def permute_layer(tensors: Mapping[str, torch.Tensor], layer: LayerPermutation | None,
                  residual: tuple[np.ndarray, np.ndarray] | None, head_dim: int) -> dict[str, torch.Tensor]:
    """One layer's tensors (keyed by suffix) with the layer's permutation and/or the residual one
    (index, signs)."""

    def index_of(role: Role) -> tuple[np.ndarray, np.ndarray | None] | None:
        if role == "residual":
            return residual
        return layer.index(role, head_dim) if layer is not None else None

    return {key: permute_axes(tensor, key, LAYER_AXES[key], index_of) for key, tensor in tensors.items()}


def match_layer(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], start: LayerPermutation,
                shape: DecoderShape, signs: bool = True) -> LayerPermutation:
    """The layer permutation of ``b`` (already in A's residual basis) closest to ``a``.

    The MLP is one (signed) assignment. For attention, every pair (A's KV head, B's KV head)
    first gets its best within-head parts (query heads of the group, value dimensions and their
    signs) by coordinate descent, and the pair's objective with them; the KV heads are then the
    assignment of those objectives. Assigning KV heads before the within-head parts are known
    can lock in a wrong pairing (seen on a tiny Qwen2, whose biases outweigh the weights)."""
    kv = shape.kv_heads
    mlp, mlp_signs = signed_assignment(similarity(a, b, LAYER_AXES, ("mlp",), units(shape.intermediate)), signs)
    scores = np.zeros((kv, kv))
    inner: dict[tuple[int, int], LayerPermutation] = {}
    for position in range(kv):
        for original in range(kv):
            inner[position, original], scores[position, original] = _match_head_pair(a, b, start, position, original, shape, signs)
    kv_heads = assignment(_as_tensor(scores))
    query_heads, value_dims, value_signs = start.query_heads.copy(), start.value_dims.copy(), start.value_signs.copy()
    for position, original in enumerate(kv_heads):
        chosen = inner[position, int(original)]
        query_heads[original], value_dims[original] = chosen.query_heads[original], chosen.value_dims[original]
        value_signs[original] = chosen.value_signs[original]
    return replace(start, mlp=mlp, mlp_signs=mlp_signs, kv_heads=kv_heads, query_heads=query_heads, value_dims=value_dims,
                   value_signs=value_signs)


def _as_tensor(values: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(values)


def _match_head_pair(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], start: LayerPermutation, position: int,
                     original: int, shape: DecoderShape, signs: bool) -> tuple[LayerPermutation, float]:
    """B's KV head ``original`` in A's slot ``position``: its best query-head order and value
    dimensions (coordinate descent from ``start``), and the pair's objective with them."""
    kv, group, head_dim = shape.kv_heads, shape.group, shape.head_dim
    permutation = start.without("kv_heads")
    for _ in range(MAX_LAYER_ROUNDS):
        previous = permutation
        if group > 1:
            in_place = permute_layer(b, permutation.without("query_heads"), None, head_dim)
            query_heads = permutation.query_heads.copy()
            query_heads[original] = assignment(similarity(
                a, in_place, LAYER_AXES, ("query", "attn_out"),
                _group_features(kv, group, position), _group_features(kv, group, original)).total())
            permutation = replace(permutation, query_heads=query_heads)
        in_place = permute_layer(b, permutation.without("value_dims", "value_signs"), None, head_dim)
        value_dims, value_signs = permutation.value_dims.copy(), permutation.value_signs.copy()
        value_dims[original], value_signs[original] = signed_assignment(similarity(
            a, in_place, LAYER_AXES, ("value", "attn_out"),
            _value_features(kv, group, head_dim, position), _value_features(kv, group, head_dim, original)), signs)
        permutation = replace(permutation, value_dims=value_dims, value_signs=value_signs)
        if permutation.equals(previous):
            break
    in_place = permute_layer(b, permutation, None, head_dim)
    score = similarity(a, in_place, LAYER_AXES, ATTENTION_ROLES, units(kv)).total()[position, original]
    return permutation, float(score)


def _group_features(kv: int, group: int, block: int) -> Features:
    """The query heads of KV group ``block``, one row per head."""
    return lambda rows, role: rows.reshape(kv, group, -1)[block]


def _value_features(kv: int, group: int, head_dim: int, block: int) -> Features:
    """The value dimensions of KV head ``block``, one row per dimension: its ``v_proj`` rows, and
    the ``o_proj`` columns of that dimension in every query head of its group."""

    def features(rows: torch.Tensor, role: Role) -> torch.Tensor:
        if role == "value":
            return rows.reshape(kv, head_dim, -1)[block]
        return rows.reshape(kv, group, head_dim, -1)[block].transpose(0, 1).reshape(head_dim, -1)

    return features


@dataclass(frozen=True)
class MatchResult:
    permutation: ModelPermutation
    sweeps: int
    converged: bool


def read_layer(read: TensorReader, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {key: read(name) for key, name in names.items()}


def match_weights(read_a: TensorReader, read_b: TensorReader, layout: Layout, shape: DecoderShape, residual: bool = True,
                  signs: bool = True, max_sweeps: int = MAX_SWEEPS,
                  progress: Callable[[str], None] = lambda line: None) -> MatchResult:
    """Weight matching of B to A (see the module docstring); ``signs`` also chooses the sign of
    every unit that may flip."""
    permutation = identity(shape)
    if not residual:
        layers, _ = _layer_pass(read_a, read_b, layout, shape, permutation, signs, with_residual=False)
        return MatchResult(replace(permutation, layers=layers), 1, True)
    token_tensors = [name for name in layout.global_names if "residual" in GLOBAL_AXES.get(name, ())]
    token_similarity = similarity({n: read_a(n) for n in token_tensors}, {n: read_b(n) for n in token_tensors}, GLOBAL_AXES,
                                  ("residual",), units(shape.hidden))
    residual_index, residual_signs = signed_assignment(token_similarity, signs)
    permutation = replace(permutation, residual=residual_index, residual_signs=residual_signs)
    for sweep in range(1, max_sweeps + 1):
        layers, layer_similarity = _layer_pass(read_a, read_b, layout, shape, permutation, signs, with_residual=True)
        assert layer_similarity is not None
        permutation = replace(permutation, layers=layers)
        residual_index, residual_signs = signed_assignment(token_similarity + layer_similarity, signs)
        changed = int(((residual_index != permutation.residual) | (residual_signs != permutation.residual_signs)).sum())
        progress(f"weight matching sweep {sweep}: {changed} of {shape.hidden} residual dimensions moved or flipped")
        if not changed:
            return MatchResult(permutation, sweep, True)
        permutation = replace(permutation, residual=residual_index, residual_signs=residual_signs)
    layers, _ = _layer_pass(read_a, read_b, layout, shape, permutation, signs, with_residual=False)
    return MatchResult(replace(permutation, layers=layers), max_sweeps, False)


def _layer_pass(read_a: TensorReader, read_b: TensorReader, layout: Layout, shape: DecoderShape, permutation: ModelPermutation,
                signs: bool, with_residual: bool) -> tuple[tuple[LayerPermutation, ...], Similarity | None]:
    """Every layer matched given the residual permutation, and (``with_residual``) the residual
    objective of the layers given their new permutations."""
    layers = []
    residual_similarity: Similarity | None = None
    residual = (permutation.residual, permutation.residual_signs)
    for index, names in enumerate(layout.layers):
        a, b = read_layer(read_a, names), read_layer(read_b, names)
        layer = match_layer(a, permute_layer(b, None, residual, shape.head_dim), permutation.layers[index], shape, signs)
        layers.append(layer)
        if with_residual:
            term = similarity(a, permute_layer(b, layer, None, shape.head_dim), LAYER_AXES, ("residual",), units(shape.hidden))
            residual_similarity = term if residual_similarity is None else residual_similarity + term
    return tuple(layers), residual_similarity
