"""Which row of which model each token of the merged vocabulary takes, for one vocabulary tensor
(an embedding or an output head), before the merge method sees it.

mergekit's rules (``mergekit/tokenizer/embed.py``), restated:

- A model that has the token gives its own row (unless ``tokens:`` forces the token's source).
- A model that lacks it takes a row shared by every such model: the ``tokens:`` override's
  source when there is one; otherwise the row of the only model that has the token; else the
  base's row, when the base is among the tensor's models and has the token; else the mean of the
  rows of the models that have it; a token no model has gets zeros (with a warning).
- Rows past the tokens, added by ``pad_to_multiple_of``, are each model's mean row (the mean of
  its own rows of the merged vocabulary).

So every model's tensor has the merged vocabulary's rows, and a token every model has is merged
from each model's own row exactly as any other tensor is. Pure data: no tensor is read here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mergeforge.errors import RecipeError, closest
from mergeforge.tokenizer.config import ModelToken, TokenOverride, ZeroRow


@dataclass(frozen=True)
class RowRef:
    """Row ``row`` of model ``model``'s tensor of the same name."""

    model: str
    row: int


Fill = tuple[RowRef, ...]  # the mean of these rows; () is a row of zeros


@dataclass(frozen=True)
class TensorRows:
    """The merged-vocabulary layout of one tensor of every model that feeds it.

    ``own[model][i]`` is the model's own row for output row ``i``, or -1 where it takes
    ``fills[i]``; rows ``tokens`` to ``rows`` are padding (each model's mean row).
    """

    own: Mapping[str, np.ndarray]
    fills: Mapping[int, Fill]
    tokens: int
    rows: int

    def is_identity(self, model: str, stored_rows: int) -> bool:
        """True when the model's tensor is unchanged: same rows, in the same order, none filled."""
        own = self.own[model]
        return stored_rows == self.rows == self.tokens and bool(np.array_equal(own, np.arange(self.tokens)))


def padded_rows(tokens: int, multiple: int | None) -> int:
    """``tokens`` rounded up to a multiple of ``pad_to_multiple_of`` (mergekit's padding)."""
    if not multiple or tokens % multiple == 0:
        return tokens
    return (tokens // multiple + 1) * multiple


def override_row(token: str, override: TokenOverride, models: Sequence[str], vocabularies: Mapping[str, Mapping[str, int]],
                 stored_rows: Mapping[str, int]) -> Fill:
    """The row an override's ``source`` names; a :class:`RecipeError` naming the entry when it
    names a model this tensor does not read or a token that model lacks."""
    where = f"tokenizer.tokens[{token!r}].source"
    source = override.source
    if isinstance(source, ZeroRow):
        return ()
    if source is None:
        missing = [m for m in models if token not in vocabularies[m]]
        raise RecipeError(f"{where}: the token is missing from model(s) {', '.join(repr(m) for m in missing)}; give a source for "
                          "its row: a model, {kind: model_token, model, token}, or {kind: zero}")
    model = source.model if isinstance(source, ModelToken) else source
    if model not in models:
        match = closest(model, models)
        hint = f"; did you mean '{match}'?" if match else ""
        raise RecipeError(f"{where}: model '{model}' is not one of the models merged here ({', '.join(models)}){hint}")
    vocabulary = vocabularies[model]
    if isinstance(source, ModelToken) and source.token_id is not None:
        if not 0 <= source.token_id < stored_rows[model]:
            raise RecipeError(f"{where}: token_id {source.token_id} is out of range for model '{model}' "
                              f"(rows 0 to {stored_rows[model] - 1})")
        return (RowRef(model, source.token_id),)
    wanted = source.token if isinstance(source, ModelToken) and source.token is not None else token
    if wanted not in vocabulary:
        match = closest(wanted, _suggestions(vocabulary))
        hint = f"; did you mean {match!r}?" if match else ""
        raise RecipeError(f"{where}: token {wanted!r} is not in model '{model}''s vocabulary{hint}")
    return (RowRef(model, vocabulary[wanted]),)


def _suggestions(vocabulary: Mapping[str, int]) -> list[str]:
    """The tokens a misspelt one is compared with: all of a small vocabulary, else the ones that
    look like special tokens (difflib over 150k tokens takes seconds)."""
    if len(vocabulary) <= 5000:
        return list(vocabulary)
    return [t for t in vocabulary if t[:1] in "<[" or t[-1:] in ">]"]


def automatic_fill(token: str, models: Sequence[str], base: str | None, vocabularies: Mapping[str, Mapping[str, int]]) -> Fill:
    """mergekit's default for a token some models lack: the sole owner's row, else the base's,
    else the mean of the owners' rows (zeros when no model has it)."""
    owners = [m for m in models if token in vocabularies[m]]
    if len(owners) == 1:
        return (RowRef(owners[0], vocabularies[owners[0]][token]),)
    if base is not None and base in owners:
        return (RowRef(base, vocabularies[base][token]),)
    return tuple(RowRef(m, vocabularies[m][token]) for m in owners)


def assign_rows(
    vocabulary: Mapping[str, int],
    models: Sequence[str],
    base: str | None,
    vocabularies: Mapping[str, Mapping[str, int]],
    stored_rows: Mapping[str, int],
    overrides: Mapping[str, TokenOverride],
    pad_to_multiple_of: int | None = None,
) -> tuple[TensorRows, list[str]]:
    """The layout of one tensor read from ``models`` (``base`` among them, or ``None``).

    Arguments:
        vocabulary: the merged vocabulary, token -> output row.
        vocabularies: each model's token -> row (only tokens that have a row in its tensors).
        stored_rows: each model's row count.
        overrides: ``tokenizer.tokens``.

    Returns:
        The layout and the warnings (tokens no model has).
    """
    tokens = max(vocabulary.values(), default=-1) + 1
    own = {m: np.full(tokens, -1, dtype=np.int64) for m in models}
    for model in models:
        model_vocabulary = vocabularies[model]
        for token, index in vocabulary.items():
            row = model_vocabulary.get(token)
            if row is not None:
                own[model][index] = row
    fills: dict[int, Fill] = {}
    warnings: list[str] = []
    for token, override in overrides.items():
        index = vocabulary[token]
        if override.force or any(own[m][index] < 0 for m in models):
            fills[index] = override_row(token, override, models, vocabularies, stored_rows)
        if override.force:
            for model in models:
                own[model][index] = -1
    missing = np.zeros(tokens, dtype=bool)
    for model in models:
        missing |= own[model] < 0
    by_index = {index: token for token, index in vocabulary.items()}
    for index in np.flatnonzero(missing).tolist():
        if index in fills:
            continue
        # An id no token has (a gap in the tokenizer's ids) gets zeros, quietly.
        lacking = by_index.get(index)
        fills[index] = automatic_fill(lacking, models, base, vocabularies) if lacking is not None else ()
        if lacking is not None and not fills[index]:
            warnings.append(f"tokenizer: token {lacking!r} is in no model's vocabulary; its rows are zeros")
    return TensorRows(own, fills, tokens, padded_rows(tokens, pad_to_multiple_of)), warnings
