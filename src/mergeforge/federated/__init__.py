"""Federated learning with merge methods as the aggregator (docs/federated.md).

- :class:`MergeStrategy` (``strategy.py``): a Flower ``FedAvg`` whose aggregation is any
  catalogue method over the client updates; needs the ``federated`` extra (``flwr``).
- ``aggregate.py``: the aggregation and the validation of updates, without Flower.
- ``simulation.py`` / ``scenario.py`` / ``cli.py``: ``mergeforge federated SCENARIO.yml OUT_DIR``,
  an in-process run of the same strategy on the tiny zoo's tasks.

Importing this package imports neither flwr nor torch.
"""

from __future__ import annotations

from mergeforge._lazy import lazy_exports

__all__ = ["MergeStrategy", "merge_updates", "update_problem"]

__getattr__ = lazy_exports(globals(), {"MergeStrategy": "mergeforge.federated.strategy",
                                       "merge_updates": "mergeforge.federated.aggregate",
                                       "update_problem": "mergeforge.federated.aggregate"})
