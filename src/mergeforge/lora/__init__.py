"""LoRA adapters: extraction from fine-tunes (``mergeforge lora extract``) and exact merging of
adapters in delta space (``mergeforge lora merge``), both in PEFT's format. See docs/lora.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeforge._lazy import lazy_exports

_EXPORTS = {
    "extract_lora": "mergeforge.lora.extract",
    "ExtractOptions": "mergeforge.lora.extract",
    "merge_adapters": "mergeforge.lora.merge",
    "read_lora": "mergeforge.lora.adapter",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)

if TYPE_CHECKING:
    from mergeforge.lora.adapter import read_lora as read_lora
    from mergeforge.lora.extract import ExtractOptions as ExtractOptions
    from mergeforge.lora.extract import extract_lora as extract_lora
    from mergeforge.lora.merge import merge_adapters as merge_adapters
