"""The zoo's character-level tokenizer, built with the ``tokenizers`` library.

One token per printable ASCII character plus four special tokens. It is wrapped as a
``PreTrainedTokenizerFast`` and saved beside every zoo model, so ``AutoTokenizer.from_pretrained``
loads it offline. Every model of a zoo shares it (merging needs one vocabulary).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Fixed order, independent of the seed: the id of a character never changes between zoos.
CHARACTERS = " " + string.digits + string.ascii_lowercase + string.ascii_uppercase + "()[]{}<>:=+-*/?,;.!_'\"#$%&@|~^`\\"


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` that splits text into single characters.

    ``tokenizer("ab")`` gives ``[<bos>, a, b]``; decoding joins characters without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; WordLevel then maps it to its id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save beside a model. The class is written as ``PreTrainedTokenizerFast`` (which
    transformers 4.x and 5.x both resolve) rather than 5.x's internal backend name."""
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = 4096
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
