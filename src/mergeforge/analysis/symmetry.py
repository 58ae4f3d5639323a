"""The permutation symmetries of a Llama-family decoder, read from its ``config.json``.

Git Re-Basin (Ainsworth et al., arXiv:2209.04836) aligns two networks by permuting hidden units,
which changes the weights but not the function. This module says which permutations of a
Llama, Mistral, Qwen2 or Qwen3 checkpoint are legal, builds them, and applies them to tensors by
name. Every tensor axis carries a *role* (:data:`LAYER_AXES`, :data:`GLOBAL_AXES`); a permutation
is an index array per role, so the same table drives applying, matching and validating.

The legal permutations (and only these):

- **MLP units** (role ``mlp``): the rows of ``gate_proj`` and ``up_proj`` and the columns of
  ``down_proj`` together; SwiGLU is elementwise across units.
- **Key-value heads** (``kv_heads``): the rows of a KV head in ``k_proj``/``v_proj``, moved
  together with its whole group of query heads (``q_proj`` rows, ``o_proj`` columns). HF's
  grouped-query attention serves query head ``h`` from KV head ``h // group``, so a group travels
  with its KV head.
- **Query heads within their group** (``query_heads``): ``q_proj`` rows and ``o_proj`` columns
  of one head, only among the heads that share one KV head.
- **Value dimensions within a head** (``value_dims``): V carries no rotary embedding, so the
  dimensions of a KV head's ``v_proj`` rows may be permuted, with the matching ``o_proj`` columns
  of every query head of its group.
- **No query/key dimensions within a head.** RoPE rotates dimension pair ``(i, i + d/2)`` by its
  own frequency θ_i, so moving a pair to another pair's slot changes its frequency, and swapping
  the two members of a pair (a reflection) reverses the rotation's sense (``R(a)S = S R(-a)``):
  the attention score then depends on ``n - m`` with the opposite sign. With distinct
  frequencies the only permutation that commutes with every rotation is the identity, so Q/K
  dimensions stay where they are.
- **The residual stream** (``residual``): one permutation of the hidden dimension, applied to the
  embedding's and ``lm_head``'s columns, every reading projection's columns (q, k, v, gate, up),
  every writing projection's rows and biases (o, down), and every RMSNorm weight. RMSNorm is
  ``γ ⊙ x / rms(x)`` and ``rms`` ignores the order of ``x``, so permuting ``γ`` with ``x`` is
  exact: no folding of the norms into the projections is needed (folding is what *rotations* of
  the residual need, as in SliceGPT), and the output keeps the model's layout, dtype and exact
  values.

- **Signs** (optional): negating a residual dimension (norm weights unchanged, since
  ``γ ⊙ Sx / rms(x) = S(γ ⊙ x / rms(x))``), an MLP unit through ``up_proj`` and ``down_proj``
  (not ``gate_proj``: SiLU is not odd), or a value dimension with its ``o_proj`` columns is exact
  too (:func:`carries_sign`), so a permutation carries a sign per unit.

Conventions: ``perm[i] = j`` means that position ``i`` of the permuted model holds unit ``j`` of
the original, so ``tensor.index_select(axis, perm)`` applies it. Within-head parts are indexed by
the original model's KV head (they travel with it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from mergeforge.errors import CheckpointError

if TYPE_CHECKING:
    import torch

Role = Literal["residual", "mlp", "query", "key", "value", "attn_out"]
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_ROLES: tuple[Role, ...] = ("query", "key", "value", "attn_out")

# The roles of each axis of every tensor of a decoder layer (name after ``model.layers.N.``);
# None is an axis no permutation touches (Qwen3's per-head-dimension q/k norms).
LAYER_AXES: dict[str, tuple[Role | None, ...]] = {
    "self_attn.q_proj.weight": ("query", "residual"),
    "self_attn.q_proj.bias": ("query",),
    "self_attn.k_proj.weight": ("key", "residual"),
    "self_attn.k_proj.bias": ("key",),
    "self_attn.v_proj.weight": ("value", "residual"),
    "self_attn.v_proj.bias": ("value",),
    "self_attn.o_proj.weight": ("residual", "attn_out"),
    "self_attn.o_proj.bias": ("residual",),
    "self_attn.q_norm.weight": (None,),
    "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("mlp", "residual"),
    "mlp.gate_proj.bias": ("mlp",),
    "mlp.up_proj.weight": ("mlp", "residual"),
    "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("residual", "mlp"),
    "mlp.down_proj.bias": ("residual",),
    "input_layernorm.weight": ("residual",),
    "post_attention_layernorm.weight": ("residual",),
}
# The token axis of the embeddings and the head is the vocabulary, which both models share.
GLOBAL_AXES: dict[str, tuple[Role | None, ...]] = {
    "model.embed_tokens.weight": (None, "residual"),
    "model.norm.weight": ("residual",),
    "lm_head.weight": (None, "residual"),
}
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")
POSITION_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # old checkpoints; the same in every model


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that define a decoder's symmetry group."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def sizes(self) -> dict[str, int]:
        """Per layer, the size of each permuted dimension (for the report)."""
        return {"residual": self.hidden, "mlp": self.intermediate, "kv_heads": self.kv_heads,
                "query_heads_per_group": self.group, "value_dims_per_head": self.head_dim}


def decoder_shape(config: Mapping[str, Any] | None, where: str) -> DecoderShape:
    """The shape of a supported decoder from its config.json, or one clear error naming the field."""
    if config is None:
        raise CheckpointError(f"model '{where}': no config.json; align reads the architecture from it")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        architecture = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise CheckpointError(
            f"model '{where}': config.json model_type '{model_type}' ({architecture}) is not supported by align; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)")

    def positive(key: str, default: Any = None) -> int:
        value = config.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"model '{where}': config.json field '{key}' must be a positive integer, got {value!r}")
        return value

    heads = positive("num_attention_heads")
    hidden = positive("hidden_size")
    kv_heads = positive("num_key_value_heads", heads) if config.get("num_key_value_heads") is not None else heads
    if heads % kv_heads:
        raise CheckpointError(f"model '{where}': config.json num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
    head_dim = positive("head_dim") if config.get("head_dim") is not None else hidden // heads
    return DecoderShape(model_type, positive("num_hidden_layers"), hidden, positive("intermediate_size"), heads, kv_heads, head_dim)


def tensor_roles(name: str, where: str) -> tuple[int | None, tuple[Role | None, ...]]:
    """The layer index (None outside the layers) and the role of each axis of tensor ``name``."""
    match = LAYER_TENSOR.fullmatch(name)
    if match and match.group(2) in LAYER_AXES:
        return int(match.group(1)), LAYER_AXES[match.group(2)]
    if name in GLOBAL_AXES:
        return None, GLOBAL_AXES[name]
    if POSITION_BUFFER.search(name):
        return None, (None,)
    raise CheckpointError(f"model '{where}': tensor '{name}' is not part of the Llama-family layout align knows, "
                          "so how it permutes is unknown; align supports plain llama/mistral/qwen2/qwen3 decoders")


def role_length(role: Role, shape: DecoderShape) -> int:
    """The length of an axis with this role."""
    return {"residual": shape.hidden, "mlp": shape.intermediate, "query": shape.heads * shape.head_dim,
            "attn_out": shape.heads * shape.head_dim, "key": shape.kv_heads * shape.head_dim,
            "value": shape.kv_heads * shape.head_dim}[role]


def check_tensor_shape(name: str, tensor_shape: tuple[int, ...], shape: DecoderShape, where: str) -> None:
    """Refuse a tensor whose permuted axes disagree with config.json (a permutation would then be
    applied to the wrong axis)."""
    layer, roles = tensor_roles(name, where)
    expected = [role_length(role, shape) if role is not None else size for role, size in zip(roles, tensor_shape)]
    if len(roles) != len(tensor_shape) or list(tensor_shape) != expected or (layer is not None and layer >= shape.layers):
        raise CheckpointError(f"model '{where}': tensor '{name}' has shape {list(tensor_shape)}, but config.json "
                              f"({shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, "
                              f"{shape.heads} heads, {shape.kv_heads} KV heads of {shape.head_dim}) implies {expected}")


# ---------------------------------------------------------------------------------------------
# Permutations


INDEX_PARTS = ("mlp", "kv_heads", "query_heads", "value_dims")
SIGN_PARTS = ("mlp_signs", "value_signs")


@dataclass(frozen=True)
class LayerPermutation:
    """The signed permutations of one decoder layer (see the module docstring for the conventions)."""

    mlp: np.ndarray  # [intermediate]
    kv_heads: np.ndarray  # [kv_heads]: position k holds the original KV head kv_heads[k], with its group
    query_heads: np.ndarray  # [kv_heads, group]: the order of the query heads within each original group
    value_dims: np.ndarray  # [kv_heads, head_dim]: the order of the value dimensions of each original KV head
    mlp_signs: np.ndarray  # [intermediate] of ±1: position i holds mlp_signs[i] · unit mlp[i] (up and down only)
    value_signs: np.ndarray  # [kv_heads, head_dim] of ±1, indexed like value_dims

    def without(self, *parts: str) -> LayerPermutation:
        """This permutation with ``parts`` (field names) set to the identity (signs to +1):
        matching one part compares the models with every other part applied."""
        return replace(self, **{part: np.ones_like(getattr(self, part)) if part in SIGN_PARTS else
                                np.broadcast_to(np.arange(getattr(self, part).shape[-1]), getattr(self, part).shape).copy()
                                for part in parts})

    def equals(self, other: LayerPermutation) -> bool:
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in INDEX_PARTS + SIGN_PARTS)

    def query_head_order(self) -> np.ndarray:
        """[heads]: position (k, j) holds the original query head kv_heads[k]·group + query_heads[kv_heads[k], j]."""
        group = self.query_heads.shape[1]
        return (self.kv_heads[:, None] * group + self.query_heads[self.kv_heads]).reshape(-1)

    def index(self, role: Role, head_dim: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The index array of one role's axis, and the signs of its positions (None: no signs)."""
        dims = np.arange(head_dim)
        group = self.query_heads.shape[1]
        if role == "mlp":
            return self.mlp, self.mlp_signs
        if role == "query":
            return (self.query_head_order()[:, None] * head_dim + dims).reshape(-1), None
        if role == "key":
            return (self.kv_heads[:, None] * head_dim + dims).reshape(-1), None
        if role == "value":
            return ((self.kv_heads[:, None] * head_dim + self.value_dims[self.kv_heads]).reshape(-1),
                    self.value_signs[self.kv_heads].reshape(-1))
        if role == "attn_out":
            value_dims = np.repeat(self.value_dims[self.kv_heads], group, axis=0)
            return ((self.query_head_order()[:, None] * head_dim + value_dims).reshape(-1),
                    np.repeat(self.value_signs[self.kv_heads], group, axis=0).reshape(-1))
        raise ValueError(role)

    def as_json(self) -> dict[str, list[Any]]:
        return {part: getattr(self, part).tolist() for part in INDEX_PARTS + SIGN_PARTS}


@dataclass(frozen=True)
class ModelPermutation:
    """A legal signed permutation of a whole decoder."""

    residual: np.ndarray  # [hidden]
    residual_signs: np.ndarray  # [hidden] of ±1
    layers: tuple[LayerPermutation, ...]

    def index(self, layer: int | None, role: Role, head_dim: int) -> tuple[np.ndarray, np.ndarray | None]:
        if role == "residual":
            return self.residual, self.residual_signs
        if layer is None:
            raise ValueError(f"role {role} outside a layer")
        return self.layers[layer].index(role, head_dim)

    def as_json(self) -> dict[str, Any]:
        return {"residual": self.residual.tolist(), "residual_signs": self.residual_signs.tolist(),
                "layers": [layer.as_json() for layer in self.layers]}


def _identity_rows(rows: int, size: int) -> np.ndarray:
    return np.broadcast_to(np.arange(size), (rows, size)).copy()


def identity_layer(shape: DecoderShape) -> LayerPermutation:
    return LayerPermutation(np.arange(shape.intermediate), np.arange(shape.kv_heads),
                            _identity_rows(shape.kv_heads, shape.group), _identity_rows(shape.kv_heads, shape.head_dim),
                            np.ones(shape.intermediate, dtype=np.int64), np.ones((shape.kv_heads, shape.head_dim), dtype=np.int64))


def identity(shape: DecoderShape) -> ModelPermutation:
    return ModelPermutation(np.arange(shape.hidden), np.ones(shape.hidden, dtype=np.int64),
                            tuple(identity_layer(shape) for _ in range(shape.layers)))


def random_permutation(shape: DecoderShape, seed: int, residual: bool = True, signs: bool = True) -> ModelPermutation:
    """A random legal permutation of every symmetry (the residual stream only with ``residual``;
    random signs only with ``signs``)."""
    rng = np.random.default_rng(seed)

    def rows(count: int, size: int) -> np.ndarray:
        return np.stack([rng.permutation(size) for _ in range(count)])

    def random_signs(*size: int) -> np.ndarray:
        return rng.choice(np.array([-1, 1]), size=size) if signs else np.ones(size, dtype=np.int64)

    layers = tuple(LayerPermutation(rng.permutation(shape.intermediate), rng.permutation(shape.kv_heads),
                                    rows(shape.kv_heads, shape.group), rows(shape.kv_heads, shape.head_dim),
                                    random_signs(shape.intermediate), random_signs(shape.kv_heads, shape.head_dim))
                   for _ in range(shape.layers))
    if not residual:
        return ModelPermutation(np.arange(shape.hidden), np.ones(shape.hidden, dtype=np.int64), layers)
    return ModelPermutation(rng.permutation(shape.hidden), random_signs(shape.hidden), layers)


def carries_sign(key: str, role: Role) -> bool:
    """Whether a sign flip of this role's units also flips this tensor's axis. A flipped residual
    dimension leaves the norms' weights alone (``γ ⊙ Sx / rms(x) = S(γ ⊙ x / rms(x))``); a
    flipped MLP unit flips ``up_proj`` and ``down_proj`` but not ``gate_proj``, whose activation
    is not odd; query and key dimensions carry no signs (RoPE pairs them)."""
    if role == "residual":
        return not key.endswith("norm.weight")
    if role == "mlp":
        return ".gate_proj." not in key
    return role in ("value", "attn_out")


# ---------------------------------------------------------------------------------------------
# Applying


IndexOf = Callable[[Role], "tuple[np.ndarray, np.ndarray | None] | None"]


def permute_axes(tensor: torch.Tensor, key: str, roles: tuple[Role | None, ...], index_of: IndexOf) -> torch.Tensor:
    """Tensor ``key`` with every axis whose role ``index_of`` gives an index array permuted by
    it (and multiplied by its signs where :func:`carries_sign`). Pure data movement and
    negation: the values (and the dtype) are the input's, up to sign."""
    import torch

    for axis, role in enumerate(roles):
        found = index_of(role) if role is not None else None
        if found is None:
            continue
        index, signs = found
        tensor = tensor.index_select(axis, torch.from_numpy(np.ascontiguousarray(index)).to(tensor.device))
        if signs is not None and role is not None and carries_sign(key, role) and (signs < 0).any():
            shape = [1] * tensor.dim()
            shape[axis] = -1
            tensor = tensor * torch.from_numpy(np.ascontiguousarray(signs)).to(tensor.device, tensor.dtype).reshape(shape)
    return tensor


def permute_tensor(name: str, tensor: torch.Tensor, permutation: ModelPermutation, shape: DecoderShape) -> torch.Tensor:
    """Tensor ``name`` of the original model as it is in the permuted one."""
    layer, axes = tensor_roles(name, name)
    return permute_axes(tensor, name, axes, lambda role: permutation.index(layer, role, shape.head_dim))


def permute_state(state: Mapping[str, torch.Tensor], permutation: ModelPermutation, shape: DecoderShape) -> dict[str, torch.Tensor]:
    """A whole state dict permuted."""
    return {name: permute_tensor(name, tensor, permutation, shape) for name, tensor in state.items()}
