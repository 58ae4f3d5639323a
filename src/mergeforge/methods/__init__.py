"""Built-in merge methods. Every module in this package registers its methods when imported;
the registry imports them on first use (:func:`load_builtin_methods`).

Importing this package is light (no torch). The modules in :data:`TORCH_FREE_MODULES` hold the
methods with NumPy kernels and import torch only inside their torch functions, so looking up and
running those methods on the NumPy executor never loads torch; every other module imports torch.
Users import from :mod:`mergeforge`; this package also exposes the registry API for method authors.
"""

from __future__ import annotations

import importlib
import pkgutil

from mergeforge._lazy import lazy_exports

__all__ = ["REQUIRED", "BaseUse", "MethodSpec", "Param", "all_methods", "get_method", "register_method", "load_builtin_methods"]

TORCH_FREE_MODULES = ("averaging", "task_vectors")

_loaded: set[str] = set()


def load_builtin_methods(torch_free_only: bool = False) -> None:
    """Import the method modules of this package (each registers its methods once): only those of
    :data:`TORCH_FREE_MODULES` with ``torch_free_only``, else all."""
    if torch_free_only:
        names = list(TORCH_FREE_MODULES)
    else:
        names = [m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("registry", "params", "kernels")
                 and not m.name.startswith("_")]
    for name in names:
        if name not in _loaded:
            _loaded.add(name)
            importlib.import_module(f"{__name__}.{name}")


__getattr__ = lazy_exports(globals(), {name: "mergeforge.methods.registry" for name in __all__ if name != "load_builtin_methods"})
