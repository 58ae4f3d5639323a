"""The model zoo: a generated family of small Llama models for measuring merge methods offline.

A base model pretrained on a generated corpus, full fine-tunes of it on six exact-match skills,
a multi-task model, a behaviour expert for task negation, two same-task models from different
random initialisations and LoRA adapters, all with a character-level tokenizer; see docs/zoo.md.

Only the names below are public; they load lazily, so importing this package stays light.

Example:
    >>> from mergeforge.zoo import build_zoo
    >>> zoo = build_zoo("zoo/", size="tiny")
    >>> [expert.path for expert in zoo.experts]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeforge._lazy import lazy_exports

__all__ = ["build_zoo", "load_zoo", "default_zoo_dir", "zoo_content_hash", "Zoo", "ZooModel", "ZooTaskEntry", "ZooError"]

_LAZY = {
    "build_zoo": "mergeforge.zoo.build",
    "default_zoo_dir": "mergeforge.zoo.build",
    "zoo_content_hash": "mergeforge.zoo.build",
    "load_zoo": "mergeforge.zoo.manifest",
    "Zoo": "mergeforge.zoo.manifest",
    "ZooModel": "mergeforge.zoo.manifest",
    "ZooTaskEntry": "mergeforge.zoo.manifest",
    "ZooError": "mergeforge.zoo.manifest",
}

if TYPE_CHECKING:
    from mergeforge.zoo.build import build_zoo, default_zoo_dir, zoo_content_hash
    from mergeforge.zoo.manifest import Zoo, ZooError, ZooModel, ZooTaskEntry, load_zoo


__getattr__ = lazy_exports(globals(), _LAZY)
