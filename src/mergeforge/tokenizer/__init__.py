"""Tokenizers as mergekit defines them: the output vocabulary (``tokenizer_source: union | base |
MODEL`` and the ``tokenizer:`` block), each model's vocabulary tensors seen in that vocabulary's
order as they stream in (:class:`VocabularyView`), and ``chat_template``.

``vocabulary`` reads tokenizers and builds the merged one, ``rows`` decides which row every
model's tensors give each token, ``view`` applies that while tensors are read, and
``chat_templates`` picks the output's template. Torch-free.
"""

from mergeforge.tokenizer.chat_templates import (
    BUILTIN_CHAT_TEMPLATES,
    apply_chat_template,
    check_chat_template,
)
from mergeforge.tokenizer.config import (
    BASE,
    UNION,
    ModelToken,
    TokenizerSpec,
    TokenOverride,
    ZeroRow,
)
from mergeforge.tokenizer.rows import RowRef, TensorRows, assign_rows, padded_rows
from mergeforge.tokenizer.view import VocabularyView
from mergeforge.tokenizer.vocabulary import (
    MergedVocabulary,
    ModelVocabulary,
    merged_vocabulary,
    model_vocabulary,
    read_tokenizer,
)

__all__ = [
    "BASE", "BUILTIN_CHAT_TEMPLATES", "UNION", "MergedVocabulary", "ModelToken", "ModelVocabulary", "RowRef", "TensorRows",
    "TokenOverride", "TokenizerSpec", "VocabularyView", "ZeroRow", "apply_chat_template", "assign_rows", "check_chat_template",
    "merged_vocabulary", "model_vocabulary", "padded_rows", "read_tokenizer",
]
