"""Sparsified uploads: a client sends only part of its update, the server rebuilds its model.

A client's update τ = θ_client − θ_global is cut to a ``density`` share of its entries, per
tensor, and sent as two arrays per tensor, ``<name>::indices`` (int32, flat positions) and
``<name>::values`` (float32), so the bytes on the wire are the sparse ones:

- ``topk``: the largest-magnitude entries (top-k sparsification, as in Aji & Heafield 2017,
  arXiv:1704.05021);
- ``dare``: a random share, rescaled by 1/density so that the update is unbiased in expectation
  (DARE, Yu et al. 2023, arXiv:2311.03099).

The server adds the decoded update to the global model it sent; a malformed upload (a tensor
missing, indices out of range or repeated, values that are not finite) is a rejection with its
reason, like any bad update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

INDICES, VALUES = "::indices", "::values"
SPARSE_KINDS = ("topk", "dare")


def kept_count(numel: int, density: float) -> int:
    return max(1, math.ceil(density * numel))


def encode_update(global_state: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], kind: str,
                  density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """The sparse upload of ``trained``'s update from ``global_state``."""
    generator = torch.Generator().manual_seed(seed)
    encoded: dict[str, torch.Tensor] = {}
    for name, base in global_state.items():
        update = (trained[name].float() - base.float()).reshape(-1)
        if kind == "topk":
            indices = update.abs().topk(kept_count(update.numel(), density)).indices.sort().values
            values = update[indices]
        elif kind == "dare":
            keep = torch.rand(update.numel(), generator=generator) < density
            indices = keep.nonzero().reshape(-1)
            values = update[indices] / density
        else:
            raise ValueError(f"unknown upload kind '{kind}'; use one of {', '.join(SPARSE_KINDS)}")
        encoded[name + INDICES] = indices.to(torch.int32)
        encoded[name + VALUES] = values.to(torch.float32).contiguous()
    return encoded


def is_sparse(upload: Mapping[str, torch.Tensor]) -> bool:
    return any(name.endswith(INDICES) for name in upload)


def decode_update(global_state: Mapping[str, torch.Tensor], upload: Mapping[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(the client's model rebuilt from a sparse upload, None) or (None, why it cannot be)."""
    expected = {name + suffix for name in global_state for suffix in (INDICES, VALUES)}
    missing = sorted(expected - set(upload))
    if missing:
        return None, f"sparse upload lacks '{missing[0]}'"
    unexpected = sorted(set(upload) - expected)
    if unexpected:
        return None, f"sparse upload has an unexpected array '{unexpected[0]}'"
    model: dict[str, torch.Tensor] = {}
    for name, base in global_state.items():
        indices, values = upload[name + INDICES].reshape(-1), upload[name + VALUES].reshape(-1)
        if indices.is_floating_point() or indices.numel() != values.numel():
            return None, f"sparse upload of '{name}': {indices.numel()} indices ({indices.dtype}) for {values.numel()} values"
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= base.numel()):
            return None, f"sparse upload of '{name}': an index outside [0, {base.numel()})"
        if indices.unique().numel() != indices.numel():
            return None, f"sparse upload of '{name}': repeated indices"
        if not bool(torch.isfinite(values).all()):
            return None, f"sparse upload of '{name}' holds NaN or infinite values"
        flat = base.float().reshape(-1).clone()
        flat[indices] += values.float()
        model[name] = flat.reshape(base.shape).to(base.dtype)
    return model, None
