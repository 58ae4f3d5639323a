"""Evolutionary merge search (Akiba et al., "Evolutionary Optimization of Model Merging Recipes",
arXiv:2403.13187), parameter space: CMA-ES over a merge method's numeric parameters, per model or
per model and group of layers, each candidate merged in memory and scored by the evaluator.

Only the names below are public; they load lazily, so importing this package imports neither
torch nor cma.

Example:
    >>> from mergeforge.evolve import run_search
    >>> run_search("search.yml", "runs/ties", progress=print)["best"]["fitness"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeforge._lazy import lazy_exports

__all__ = ["run_search", "load_search_config", "SearchConfig", "SearchSpace"]

_LAZY = {
    "run_search": "mergeforge.evolve.api",
    "load_search_config": "mergeforge.evolve.config",
    "SearchConfig": "mergeforge.evolve.config",
    "SearchSpace": "mergeforge.evolve.space",
}

if TYPE_CHECKING:
    from mergeforge.evolve.api import run_search
    from mergeforge.evolve.config import SearchConfig, load_search_config
    from mergeforge.evolve.space import SearchSpace


__getattr__ = lazy_exports(globals(), _LAZY)
