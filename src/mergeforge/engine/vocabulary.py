"""A recipe's tokenizer settings planned against its models: the merged vocabulary, and for each
model whose vocabulary tensors change, the :class:`~mergeforge.tokenizer.VocabularyView` the
planner and the executors read it through (an input-side transform; the engine is the same).

Found here, before anything is read: a source model that is not merged, a token an override
names that its model lacks, an override without a source for a token some model lacks, a model
without a tokenizer. Vocabulary tensors are the embeddings and output heads whose rows are the
model's vocabulary (:data:`VOCABULARY_TENSOR`); other tensors are never touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mergeforge.checkpoint.reader import TensorSource
from mergeforge.engine.layouts import models_of_tensor
from mergeforge.engine.recipe import Recipe
from mergeforge.errors import RecipeError
from mergeforge.methods.registry import MethodSpec
from mergeforge.tokenizer import (
    BASE,
    UNION,
    MergedVocabulary,
    ModelVocabulary,
    TensorRows,
    TokenizerSpec,
    VocabularyView,
    assign_rows,
    merged_vocabulary,
    model_vocabulary,
    read_tokenizer,
)
from mergeforge.tokenizer.rows import override_row
from mergeforge.tokenizer.vocabulary import union_additions

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

# Tensors whose first axis is the vocabulary (mergekit's ``vocabulary_axis: 0`` weights), input
# embeddings first: the first one found gives the model's row count.
VOCABULARY_TENSOR = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|shared|embed_out|lm_head)\.(weight|bias)$")
INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|shared)\.weight$")


@dataclass
class PlannedVocabulary:
    """The merged vocabulary and the views of the models it changes."""

    merged: MergedVocabulary
    views: dict[str, VocabularyView]
    warnings: list[str] = field(default_factory=list)


def vocabulary_tensors(checkpoint: TensorSource) -> tuple[int, list[str]]:
    """A model's vocabulary rows (its input embedding's) and the tensors that have them; ``(0, [])``
    when it has no embedding."""
    candidates = [n for n in checkpoint.names() if VOCABULARY_TENSOR.search(n) and checkpoint.info(n).shape]
    embedding = next((n for n in candidates if INPUT_EMBEDDING.search(n)), candidates[0] if candidates else None)
    if embedding is None:
        return 0, []
    rows = checkpoint.info(embedding).shape[0]
    return rows, [n for n in candidates if checkpoint.info(n).shape[0] == rows]


def tokenizer_field(recipe: Recipe) -> str:
    """The recipe field that chose the vocabulary's source, for messages."""
    return "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"


def _vocabularies(recipe: Recipe, checkpoints: Mapping[str, TensorSource], rows: Mapping[str, int]
                  ) -> tuple[dict[str, ModelVocabulary], dict[str, Tokenizer | None], list[str]]:
    """Each model's vocabulary (a model without a tokenizer has the reference's, as in mergekit)
    and its tokenizer; warnings for the models that lack one."""
    reference = recipe.reference_model()
    tokenizers = {ref: read_tokenizer(checkpoints[ref].folder) for ref in recipe.referenced_models()}
    fallback = tokenizers[reference]
    if fallback is None:
        raise RecipeError(f"{tokenizer_field(recipe)}: model '{reference}' ({checkpoints[reference].folder}) has no tokenizer "
                          "(tokenizer.json); the merged vocabulary starts from it")
    warnings = []
    vocabularies = {}
    for ref, tokenizer in tokenizers.items():
        if tokenizer is None:
            warnings.append(f"tokenizer: model '{ref}' has no tokenizer; its vocabulary is taken to be '{reference}''s")
        vocabularies[ref] = model_vocabulary(tokenizer or fallback, rows[ref])
    return vocabularies, tokenizers, warnings


def _output_vocabulary(recipe: Recipe, spec: TokenizerSpec, checkpoints: Mapping[str, TensorSource],
                       vocabularies: Mapping[str, ModelVocabulary], tokenizers: Mapping[str, Tokenizer | None]
                       ) -> tuple[MergedVocabulary, list[str]]:
    reference = recipe.reference_model()
    source = reference if spec.source in (UNION, BASE) else spec.source
    tokenizer = tokenizers[source]
    if tokenizer is None:
        raise RecipeError(f"{tokenizer_field(recipe)}: model '{source}' ({checkpoints[source].folder}) has no tokenizer (tokenizer.json)")
    additions: list[AddedToken] = []
    warnings: list[str] = []
    if spec.source == UNION:
        others = [(ref, vocabularies[ref]) for ref in recipe.merged_models() if ref != reference]
        additions, warnings = union_additions(vocabularies[reference], others)
    merged = merged_vocabulary(tokenizer, checkpoints[source].folder, additions, list(spec.tokens), spec.pad_to_multiple_of)
    return merged, warnings


def plan_vocabulary(recipe: Recipe, method: MethodSpec, checkpoints: Mapping[str, TensorSource]) -> PlannedVocabulary | None:
    """The recipe's merged vocabulary and model views, or ``None`` when it asks for none."""
    spec = recipe.tokenizer_spec()
    if spec is None:
        return None
    tensors = {ref: vocabulary_tensors(checkpoints[ref]) for ref in recipe.referenced_models()}
    for ref in recipe.merged_models():
        if not tensors[ref][1]:
            raise RecipeError(f"{tokenizer_field(recipe)}: model '{ref}' has no embedding tensor (embed_tokens, wte, word_embeddings, ...) "
                              "to lay out in the merged vocabulary")
    rows = {ref: found[0] for ref, found in tensors.items()}
    vocabularies, tokenizers, warnings = _vocabularies(recipe, checkpoints, rows)
    merged, union_warnings = _output_vocabulary(recipe, spec, checkpoints, vocabularies, tokenizers)
    warnings += union_warnings
    token_rows = {ref: vocabulary.tokens for ref, vocabulary in vocabularies.items()}
    for token, override in spec.tokens.items():
        if override.source is not None:
            override_row(token, override, recipe.merged_models(), token_rows, rows)
    layouts: dict[str, dict[str, TensorRows]] = {}
    for name in dict.fromkeys(n for ref in recipe.merged_models() for n in tensors[ref][1]):
        models, base = models_of_tensor(recipe, method, name)
        models = [m for m in models if name in tensors[m][1]]
        if not models:
            continue
        layout, tensor_warnings = assign_rows(merged.vocabulary, models, base if base in models else None, token_rows, rows,
                                              spec.tokens, spec.pad_to_multiple_of)
        warnings += tensor_warnings
        for model in models:
            if not layout.is_identity(model, rows[model]):
                layouts.setdefault(model, {})[name] = layout
    if layouts and method.calibrate is not None:
        raise RecipeError(f"{tokenizer_field(recipe)}: merge_method '{method.name}' is data-aware, and its calibration runs each model in "
                          "its own vocabulary; give models that share the output's vocabulary, or no tokenizer settings")
    views = {model: VocabularyView(model, checkpoints, model_layouts) for model, model_layouts in layouts.items()}
    return PlannedVocabulary(merged, views, list(dict.fromkeys(warnings)))
