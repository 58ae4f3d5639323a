"""mergeforge: merge large language models.

The public API, re-exported explicitly. Heavy modules load on first use, so ``mergeforge --help``
stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeforge._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "MergeforgeError",
    "merge",
    "merge_state_dicts",
    "merge_tensors",
    "load_recipe",
    "plan_merge",
    "get_method",
    "all_methods",
    "register_method",
    "Param",
    "BaseUse",
]

_LAZY = {
    "MergeforgeError": "mergeforge.errors",
    "merge": "mergeforge.api",
    "merge_state_dicts": "mergeforge.api",
    "merge_tensors": "mergeforge.api",
    "load_recipe": "mergeforge.recipe",
    "plan_merge": "mergeforge.api",
    "get_method": "mergeforge.methods.registry",
    "all_methods": "mergeforge.methods.registry",
    "register_method": "mergeforge.methods.registry",
    "Param": "mergeforge.methods.registry",
    "BaseUse": "mergeforge.methods.registry",
}

if TYPE_CHECKING:
    from mergeforge.api import merge, merge_state_dicts, merge_tensors, plan_merge
    from mergeforge.errors import MergeforgeError
    from mergeforge.methods.registry import BaseUse, Param, all_methods, get_method, register_method
    from mergeforge.recipe import load_recipe


__getattr__ = lazy_exports(globals(), _LAZY)
