"""mergeforge: merge large language models.

The public API. Every name below loads on first use, so ``import mergeforge`` (and
``mergeforge --help``) stays fast and imports no torch.

Example:
    >>> import mergeforge
    >>> mergeforge.merge("ties.yml", "merged/", seed=3)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from mergeforge._lazy import lazy_exports

try:
    __version__ = version("mergeforge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_EXPORTS = {
    "merge": "mergeforge.engine.api",
    "plan_merge": "mergeforge.engine.api",
    "merge_state_dicts": "mergeforge.engine.api",
    "merge_tensors": "mergeforge.engine.api",
    "materialize_task": "mergeforge.engine.materialize",
    "load_recipe": "mergeforge.engine.recipe",
    "Recipe": "mergeforge.engine.recipe",
    "MergeOptions": "mergeforge.engine.options",
    "MergeResult": "mergeforge.engine.output",
    "MergePlan": "mergeforge.engine.plan",
    "get_method": "mergeforge.methods.registry",
    "all_methods": "mergeforge.methods.registry",
    "register_method": "mergeforge.methods.registry",
    "MethodSpec": "mergeforge.methods.registry",
    "Param": "mergeforge.methods.registry",
    "BaseUse": "mergeforge.methods.registry",
    "MergeforgeError": "mergeforge.errors",
    "RecipeError": "mergeforge.errors",
    "CheckpointError": "mergeforge.errors",
    "OutputError": "mergeforge.errors",
    "MethodError": "mergeforge.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # the same names, for type checkers (tests/test_api.py checks the two agree)
    from mergeforge.engine.api import merge as merge
    from mergeforge.engine.api import merge_state_dicts as merge_state_dicts
    from mergeforge.engine.api import merge_tensors as merge_tensors
    from mergeforge.engine.api import plan_merge as plan_merge
    from mergeforge.engine.materialize import materialize_task as materialize_task
    from mergeforge.engine.options import MergeOptions as MergeOptions
    from mergeforge.engine.output import MergeResult as MergeResult
    from mergeforge.engine.plan import MergePlan as MergePlan
    from mergeforge.engine.recipe import Recipe as Recipe
    from mergeforge.engine.recipe import load_recipe as load_recipe
    from mergeforge.errors import CheckpointError as CheckpointError
    from mergeforge.errors import MergeforgeError as MergeforgeError
    from mergeforge.errors import MethodError as MethodError
    from mergeforge.errors import OutputError as OutputError
    from mergeforge.errors import RecipeError as RecipeError
    from mergeforge.methods.registry import BaseUse as BaseUse
    from mergeforge.methods.registry import MethodSpec as MethodSpec
    from mergeforge.methods.registry import Param as Param
    from mergeforge.methods.registry import all_methods as all_methods
    from mergeforge.methods.registry import get_method as get_method
    from mergeforge.methods.registry import register_method as register_method

__getattr__ = lazy_exports(globals(), _EXPORTS)
