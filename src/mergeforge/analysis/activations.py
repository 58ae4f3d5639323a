"""Activation matching: permute B's units to those of A's they fire most like on calibration data.

Git Re-Basin's activation matching (Ainsworth et al., arXiv:2209.04836, section 3.1) runs both
models on the same inputs and assigns each unit of B to the unit of A its activation correlates
with most (Pearson, over tokens), one Hungarian assignment per permuted dimension. Activations
are features of the data, not of either model's basis, so every assignment is computed directly;
only the within-head parts wait for the KV-head assignment they live in. What is correlated:

- **residual stream**: the hidden state at every layer boundary (``output_hidden_states``),
  the tokens of every boundary pooled into one correlation (one permutation serves them all);
- **MLP units**: the input of ``down_proj`` (``act(gate) * up``);
- **KV heads**: the ``k_proj`` outputs, dimension by dimension (RoPE pins Q/K dimensions, so
  dimension ``t`` of one head compares with dimension ``t`` of the other), plus the best
  assignment of the group's query heads (``q_proj`` outputs, dimension by dimension) and of the
  value dimensions (``v_proj`` outputs);
- **query heads within a group** and **value dimensions within a head**: the same statistics,
  assigned inside the matched KV head.

Memory: the cross-moment matrices, ``hidden²`` per boundary and ``intermediate²`` per layer in
float64 (about 0.6 GB for a 135M-parameter model with a 1536-unit MLP; 52 GB for a 7B model with a
14336-unit MLP: use weight matching there).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergeforge.analysis.matching import Similarity, assignment, signed_assignment
from mergeforge.analysis.symmetry import DecoderShape, LayerPermutation, ModelPermutation
from mergeforge.calibration.data import Batch

EPSILON = 1e-12


@dataclass
class CrossMoments:
    """Running sums for the Pearson correlation between A's units and B's, over tokens.
    ``per_dim`` keeps only same-dimension pairs of heads (``[heads_a, heads_b, dims]``)."""

    per_dim: bool = False
    count: int = 0
    sum_a: torch.Tensor | None = None
    sum_b: torch.Tensor | None = None
    square_a: torch.Tensor | None = None
    square_b: torch.Tensor | None = None
    cross: torch.Tensor | None = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add ``[tokens, units]`` (or, ``per_dim``, ``[tokens, heads, dims]``) activations."""
        a, b = a.double(), b.double()
        cross = torch.einsum("nat,nbt->abt", a, b) if self.per_dim else a.T @ b
        terms = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), cross)
        if self.cross is None:
            self.sum_a, self.sum_b, self.square_a, self.square_b, self.cross = terms
        else:
            assert self.sum_a is not None and self.sum_b is not None and self.square_a is not None and self.square_b is not None
            self.sum_a += terms[0]
            self.sum_b += terms[1]
            self.square_a += terms[2]
            self.square_b += terms[3]
            self.cross += terms[4]
        self.count += a.shape[0]

    def correlation(self) -> torch.Tensor:
        """``[units_a, units_b]`` (or ``[heads_a, heads_b, dims]``); 0 where a unit never varies."""
        assert self.cross is not None and self.sum_a is not None and self.sum_b is not None
        assert self.square_a is not None and self.square_b is not None
        n = self.count
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        std_a = (self.square_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.square_b / n - mean_b**2).clamp_min(0).sqrt()
        if self.per_dim:
            covariance = self.cross / n - mean_a[:, None, :] * mean_b[None, :, :]
            return covariance / (std_a[:, None, :] * std_b[None, :, :]).clamp_min(EPSILON)
        covariance = self.cross / n - mean_a[:, None] * mean_b[None, :]
        return covariance / (std_a[:, None] * std_b[None, :]).clamp_min(EPSILON)


@dataclass
class ActivationStatistics:
    residual: CrossMoments = field(default_factory=CrossMoments)
    mlp: list[CrossMoments] = field(default_factory=list)
    query: list[CrossMoments] = field(default_factory=list)
    key: list[CrossMoments] = field(default_factory=list)
    value: list[CrossMoments] = field(default_factory=list)


@contextmanager
def _recording(model: Any, shape: DecoderShape) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Hooks that store, per layer, the q/k/v projections' outputs and ``down_proj``'s input."""
    records: list[dict[str, torch.Tensor]] = [{} for _ in range(shape.layers)]
    handles = []
    for index, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        for key in ("q_proj", "k_proj", "v_proj"):
            handles.append(getattr(attention, key).register_forward_hook(
                lambda module, inputs, output, index=index, key=key: records[index].__setitem__(key, output)))
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda module, inputs, index=index: records[index].__setitem__("down_in", inputs[0])))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def collect(model_a: Any, model_b: Any, batches: Sequence[Batch], shape: DecoderShape) -> ActivationStatistics:
    """Run both models on ``batches`` and accumulate the cross moments of every permuted unit."""
    statistics = ActivationStatistics(
        mlp=[CrossMoments() for _ in range(shape.layers)], query=[CrossMoments(per_dim=True) for _ in range(shape.layers)],
        key=[CrossMoments(per_dim=True) for _ in range(shape.layers)], value=[CrossMoments() for _ in range(shape.layers)])
    heads, kv, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    with _recording(model_a, shape) as records_a, _recording(model_b, shape) as records_b, torch.no_grad():
        for batch in batches:
            kept = batch.attention_mask.bool()
            outputs_a = model_a(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
            outputs_b = model_b(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
            for hidden_a, hidden_b in zip(outputs_a.hidden_states, outputs_b.hidden_states, strict=True):
                statistics.residual.add(hidden_a[kept], hidden_b[kept])
            for index in range(shape.layers):
                a, b = records_a[index], records_b[index]
                statistics.mlp[index].add(a["down_in"][kept], b["down_in"][kept])
                statistics.query[index].add(a["q_proj"][kept].reshape(-1, heads, head_dim), b["q_proj"][kept].reshape(-1, heads, head_dim))
                statistics.key[index].add(a["k_proj"][kept].reshape(-1, kv, head_dim), b["k_proj"][kept].reshape(-1, kv, head_dim))
                statistics.value[index].add(a["v_proj"][kept], b["v_proj"][kept])
    return statistics


def _flippable(correlation: torch.Tensor) -> Similarity:
    """A correlation as an objective whose units may flip sign (a flipped unit's correlation is negated)."""
    return Similarity(torch.zeros_like(correlation), correlation)


def _best_total(objective: Similarity, signs: bool) -> float:
    """The value of the best (signed) assignment of a square objective."""
    chosen, chosen_signs = signed_assignment(objective, signs)
    rows, columns = torch.arange(chosen.size), torch.from_numpy(chosen)
    return float((objective.fixed[rows, columns] + torch.from_numpy(chosen_signs).double() * objective.flippable[rows, columns]).sum())


def _layer_permutation(statistics: ActivationStatistics, index: int, shape: DecoderShape, signs: bool) -> LayerPermutation:
    kv, group, head_dim = shape.kv_heads, shape.group, shape.head_dim
    query_traces = statistics.query[index].correlation().sum(-1)  # [heads, heads]: same-dimension correlation summed
    key_traces = statistics.key[index].correlation().sum(-1)  # [kv, kv]
    value = statistics.value[index].correlation().reshape(kv, head_dim, kv, head_dim)

    def query_block(position: int, original: int) -> Similarity:
        block = query_traces[position * group:(position + 1) * group, original * group:(original + 1) * group]
        return Similarity(block, torch.zeros_like(block))

    kv_similarity = key_traces.clone()
    for position in range(kv):
        for original in range(kv):
            kv_similarity[position, original] += (_best_total(_flippable(value[position, :, original]), signs)
                                                  + _best_total(query_block(position, original), signs))
    kv_heads = assignment(kv_similarity)
    query_heads = np.zeros((kv, group), dtype=np.int64)
    value_dims = np.zeros((kv, head_dim), dtype=np.int64)
    value_signs = np.ones((kv, head_dim), dtype=np.int64)
    for position, original in enumerate(kv_heads):
        query_heads[original] = assignment(query_block(position, int(original)).fixed)
        value_dims[original], value_signs[original] = signed_assignment(_flippable(value[position, :, original]), signs)
    mlp, mlp_signs = signed_assignment(_flippable(statistics.mlp[index].correlation()), signs)
    return LayerPermutation(mlp, kv_heads, query_heads, value_dims, mlp_signs, value_signs)


def match_activations(model_a: Any, model_b: Any, batches: Sequence[Batch], shape: DecoderShape,
                      residual: bool = True, signs: bool = True) -> ModelPermutation:
    """Activation matching of B to A on ``batches`` (see the module docstring)."""
    statistics = collect(model_a, model_b, batches, shape)
    layers = tuple(_layer_permutation(statistics, index, shape, signs) for index in range(shape.layers))
    if not residual:
        return ModelPermutation(np.arange(shape.hidden), np.ones(shape.hidden, dtype=np.int64), layers)
    residual_index, residual_signs = signed_assignment(_flippable(statistics.residual.correlation()), signs)
    return ModelPermutation(residual_index, residual_signs, layers)
