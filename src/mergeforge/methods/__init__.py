"""Built-in merge methods. Every module in this package registers its methods when imported;
the registry imports them all on first use (:func:`load_builtin_methods`).

Importing this package is light (no torch), so command modules that live here, such as
``emr_cli``, keep ``mergeforge --help`` fast. Users import from :mod:`mergeforge`; this package
also exposes the registry API for method authors.
"""

from __future__ import annotations

import importlib
import pkgutil

from mergeforge._lazy import lazy_exports

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


__getattr__ = lazy_exports(globals(), {name: "mergeforge.methods.registry" for name in __all__ if name != "load_builtin_methods"})
