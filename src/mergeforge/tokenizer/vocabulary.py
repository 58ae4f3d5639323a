"""The merged tokenizer: each model's vocabulary read from its tokenizer files, the output
vocabulary built from them (mergekit's ``tokenizer_source``: ``union``, ``base`` or a model), and
the output's tokenizer files.

Tokenizers are read with the ``tokenizers`` library from ``tokenizer.json`` (torch-free); a
folder with only a slow tokenizer (``tokenizer.model``, ``vocab.json``) is converted by
transformers, as mergekit does. A token counts as a model's only when it has a row in the
model's embedding (some tokenizers hold more tokens than the embedding has rows; those have no
row to merge).

The union follows ``mergekit/tokenizer/build.py``: the output is the base's tokenizer (the
reference model's) with every other token appended: the other models' ordinary tokens as plain
added tokens, then their added tokens with their own settings (special or not, the first model's
settings when two disagree). The base's ids never move. Appended ids follow the models in recipe
order and each model's ids in order (mergekit iterates a hash map), so a union is reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeforge.errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

# Files of a slow tokenizer: a merged vocabulary lives in tokenizer.json alone, so these would
# describe the wrong vocabulary and are not written next to it.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "spiece.model",
                        "sentencepiece.bpe.model")


def read_tokenizer(folder: Path) -> Tokenizer | None:
    """A model folder's tokenizer, or ``None`` when it has none that loads."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust parser's errors have no common Python type
            raise CheckpointError(f"{path}: not a readable tokenizer ({exc})") from None
    if not any((folder / name).is_file() for name in SLOW_TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        converted = AutoTokenizer.from_pretrained(folder, use_fast=True)
    except Exception:  # transformers' loaders raise anything from OSError to ValueError
        return None
    backend = getattr(converted, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


@dataclass(frozen=True)
class ModelVocabulary:
    """A model's tokens that have rows: token -> row, and which of them are added tokens."""

    tokens: dict[str, int]
    added: dict[str, AddedToken]


def model_vocabulary(tokenizer: Tokenizer, rows: int) -> ModelVocabulary:
    """The tokens of ``tokenizer`` whose ids are below ``rows``, the model's embedding rows."""
    tokens = {token: index for token, index in sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
              if index < rows}
    added = {token.content: token for index, token in sorted(tokenizer.get_added_tokens_decoder().items()) if index < rows}
    return ModelVocabulary(tokens, added)


def _settings(token: AddedToken) -> tuple[bool, ...]:
    return (token.special, token.normalized, token.lstrip, token.rstrip, token.single_word)


def union_additions(base: ModelVocabulary, others: Sequence[tuple[str, ModelVocabulary]]) -> tuple[list[AddedToken], list[str]]:
    """The tokens the union appends to the base's tokenizer, in order, and warnings about added
    tokens two models define differently."""
    from tokenizers import AddedToken

    plain: dict[str, None] = {}
    added: dict[str, AddedToken] = {}
    warnings: list[str] = []
    for _, vocabulary in [("", base), *others]:
        for token in vocabulary.tokens:
            if token not in vocabulary.added:
                plain.setdefault(token)
    for ref, vocabulary in others:
        for token, settings in vocabulary.added.items():
            first = added.get(token, base.added.get(token))
            if first is None:
                added[token] = settings
            elif _settings(first) != _settings(settings):
                warnings.append(f"tokenizer: model '{ref}' adds token {token!r} with other settings than an earlier model; "
                                "the first model's are kept")
    result = [AddedToken(token, normalized=True, special=False) for token in plain
              if token not in base.tokens and token not in added]
    result += [settings for token, settings in added.items() if token not in base.added]
    return result, warnings


def extended(tokenizer: Tokenizer, additions: Sequence[AddedToken]) -> Tokenizer:
    """A copy of ``tokenizer`` with ``additions`` appended in order (special ones as special tokens)."""
    from tokenizers import Tokenizer

    result = Tokenizer.from_str(tokenizer.to_str())
    for token in additions:
        if token.special:
            result.add_special_tokens([token])
        else:
            result.add_tokens([token])
    return result


def _added_token_entry(token: AddedToken) -> dict[str, Any]:
    return {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized, "rstrip": token.rstrip,
            "single_word": token.single_word, "special": token.special}


@dataclass
class MergedVocabulary:
    """The output's vocabulary: its tokenizer, token -> row, and how many rows the vocabulary
    tensors get (``tokens`` rounded up by ``pad_to_multiple_of``)."""

    tokenizer: Tokenizer
    vocabulary: dict[str, int]
    tokens: int
    rows: int
    source_folder: Path  # the folder whose tokenizer files the output starts from
    additions: list[AddedToken] = field(default_factory=list)  # appended to that tokenizer; none: its files are copied

    def summary(self) -> str:
        padding = f", padded to {self.rows} rows" if self.rows > self.tokens else ""
        return f"tokenizer: {self.tokens} tokens ({len(self.additions)} added to {self.source_folder.name}'s){padding}"

    def write(self, out: Path) -> None:
        """Write the tokenizer files into ``out``, over the copies of the source's: unchanged when
        nothing was appended; otherwise ``tokenizer.json``, ``tokenizer_config.json`` with the
        new added tokens, and no slow-tokenizer files (they would hold the old vocabulary)."""
        if not self.additions:
            return
        self.tokenizer.save(str(out / "tokenizer.json"))
        for name in SLOW_TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
        config_path = out / "tokenizer_config.json"
        if not config_path.is_file():
            return
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for token in self.additions:
                decoder[str(self.vocabulary[token.content])] = _added_token_entry(token)
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def merged_vocabulary(source: Tokenizer, source_folder: Path, additions: Sequence[AddedToken], new_tokens: Sequence[str],
                      pad_to_multiple_of: int | None = None) -> MergedVocabulary:
    """``source`` with ``additions`` and then ``new_tokens`` (the ``tokens:`` entries it lacks) appended."""
    from tokenizers import AddedToken

    from mergeforge.tokenizer.rows import padded_rows

    known = set(source.get_vocab(with_added_tokens=True)) | {t.content for t in additions}
    appended = [*additions, *(AddedToken(t, normalized=True, special=False) for t in dict.fromkeys(new_tokens) if t not in known)]
    tokenizer = extended(source, appended) if appended else source
    vocabulary = tokenizer.get_vocab(with_added_tokens=True)
    tokens = max(vocabulary.values(), default=-1) + 1
    return MergedVocabulary(tokenizer, vocabulary, tokens, padded_rows(tokens, pad_to_multiple_of), source_folder, appended)
