"""What a recipe's ``tokenizer:`` block asks for (mergekit's ``mergekit/tokenizer/config.py``),
as plain frozen values: the recipe schema parses YAML into them and the vocabulary code reads
them, so neither depends on the other. Torch-free, pydantic-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

UNION, BASE = "union", "base"


@dataclass(frozen=True)
class ModelToken:
    """``{kind: model_token, model: M, token: T}`` (or ``token_id: N``): the row of token ``T``
    (or row ``N``) of model ``M``, whatever token the row is for in the merged vocabulary."""

    model: str
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class ZeroRow:
    """``{kind: zero}``: a row of zeros."""


# Where a token's row comes from: one of the above, a model reference (that model's row of the
# same token), or None (each model's own row; only valid for a token every model has).
TokenSource = Union[ModelToken, ZeroRow, str, None]


@dataclass(frozen=True)
class TokenOverride:
    """One entry of ``tokenizer.tokens``. ``force``: every model takes ``source``'s row, even the
    models that have the token (without it, only the models that lack it do)."""

    source: TokenSource = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The vocabulary the output gets: ``source`` is ``union``, ``base`` or a model reference."""

    source: str
    tokens: Mapping[str, TokenOverride] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
