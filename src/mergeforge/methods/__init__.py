"""Built-in merge methods. Every module in this package registers its methods when imported.

Users import from :mod:`mergeforge`; this package exposes the registry API for method authors.
"""

from __future__ import annotations

import importlib
import pkgutil

from mergeforge.methods.registry import (
    REQUIRED,
    BaseUse,
    MergeMethod,
    Param,
    all_methods,
    get_method,
    register_method,
)

__all__ = ["REQUIRED", "BaseUse", "MergeMethod", "Param", "all_methods", "get_method", "register_method"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
