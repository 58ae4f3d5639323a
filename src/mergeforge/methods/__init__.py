"""Built-in merge methods. Every module in this package registers its methods when imported;
the registry imports them all on first use (:func:`load_builtin_methods`).

Importing this package is light (no torch), so command modules that live here, such as
``emr_cli``, keep ``mergeforge --help`` fast. Users import from :mod:`mergeforge`; this package
also exposes the registry API for method authors.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

__all__ = ["REQUIRED", "BaseUse", "MergeMethod", "Param", "all_methods", "get_method", "register_method", "load_builtin_methods"]


_loaded = False


def load_builtin_methods() -> None:
    """Import every method module of this package (each registers its methods once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in pkgutil.iter_modules(__path__):
        if module.name != "registry" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mergeforge.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
