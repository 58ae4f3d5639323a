"""``MergeStrategy``: Flower's ``FedAvg`` with any mergeforge method as the aggregator.

Flower 1.42's message API (``flwr.serverapp.strategy``): a strategy configures a round's messages
from the global ``ArrayRecord`` and aggregates the replies. FedAvg's sampling, configuration and
metric aggregation are kept; only the aggregation of the arrays changes, to
:func:`mergeforge.federated.aggregate.merge_updates` over the replies that pass
:func:`~mergeforge.federated.aggregate.update_problem`. A bad reply is logged with its reason and
left out, so the round completes with the rest (FedAvg's own consistency check would abort it).
Sparsified uploads (:mod:`mergeforge.federated.sparse`) are rebuilt on the global model first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mergeforge.federated.aggregate import (
    Rejection,
    check_method,
    log,
    merge_updates,
    update_problem,
)
from mergeforge.federated.sparse import decode_update, is_sparse


def state_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A torch state dict from an ``ArrayRecord`` (a copy: the record stays usable)."""
    return dict(record.to_torch_state_dict(keep_input=True))


def client_name(message: Message) -> str:
    return f"node {message.metadata.src_node_id}"


class MergeStrategy(FedAvg):
    """Federated training whose aggregation is a model merge.

    Arguments:
        method: the catalogue method that merges the client models (``linear``: FedAvg;
            ``task_arithmetic``, ``ties``, ``dare_ties``, ``median``, ``trimmed_mean``, ...).
        parameters: the method's global parameters, e.g. ``{"density": 0.2}`` for ``ties``.
        seed: the seed of random methods; round ``r`` uses ``seed + r``.
        **fedavg: FedAvg's arguments (``fraction_train``, ``min_train_nodes``,
            ``weighted_by_key`` = the metric holding each client's example count, ...).

    After each round, :attr:`rejections` maps the round to the updates left out.

    Example:
        >>> strategy = MergeStrategy("ties", {"density": 0.5}, fraction_train=0.5)
        >>> result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=10)
    """

    def __init__(self, method: str = "linear", parameters: Mapping[str, Any] | None = None, *, seed: int = 0,
                 **fedavg: Any) -> None:
        check_method(method, parameters)
        super().__init__(**fedavg)
        self.method = method
        self.parameters = dict(parameters or {})
        self.seed = seed
        self.rejections: dict[int, list[Rejection]] = {}
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        log.info("MergeStrategy: aggregator %s %s", self.method, self.parameters or "")
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        # The replies carry only client models; the base of their task vectors is this round's global model.
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the valid client models into the next global model; None when none is valid."""
        if self._global is None:
            raise RuntimeError("MergeStrategy.aggregate_train called before configure_train")
        received, _errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        # Flower samples nodes in random order; merging in node order makes random methods (DARE,
        # whose i-th model takes the i-th draw) give the same bytes for the same seed and clients.
        received.sort(key=lambda message: message.metadata.src_node_id)
        global_state = state_of(self._global)
        accepted, states, counts = [], [], []
        rejected: list[Rejection] = []
        for message in received:
            reason, state, count = self._read_reply(message, global_state)
            if reason is not None:
                rejected.append(Rejection(client_name(message), reason))
                log.warning("round %d: update from %s rejected: %s", server_round, client_name(message), reason)
                continue
            accepted.append(message)
            states.append(state)
            counts.append(count)
        self.rejections[server_round] = rejected
        if not states:
            log.warning("round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        merged = merge_updates(self.method, global_state, states, counts, self.parameters, seed=self.seed + server_round)
        metrics = self.train_metrics_aggr_fn([message.content for message in accepted], self.weighted_by_key)
        return ArrayRecord(merged), metrics

    def _read_reply(self, message: Message, global_state: dict[str, torch.Tensor]) -> tuple[str | None, dict[str, torch.Tensor], float]:
        """(why the reply is unusable or None, its model, its example count)."""
        content = message.content
        if len(content.array_records) != 1:
            return f"expected one ArrayRecord, got {len(content.array_records)}", {}, 0.0
        if len(content.metric_records) != 1:
            return f"expected one MetricRecord, got {len(content.metric_records)}", {}, 0.0
        metrics = next(iter(content.metric_records.values()))
        count = metrics.get(self.weighted_by_key)
        if not isinstance(count, (int, float)) or not count > 0:  # a client with no examples has nothing to add
            return f"metric '{self.weighted_by_key}' is {count!r}, not a positive number of examples", {}, 0.0
        state = state_of(next(iter(content.array_records.values())))
        if is_sparse(state):  # a top-k or DARE upload: only part of the update was sent
            decoded, problem = decode_update(global_state, state)
            if decoded is None:
                return problem, {}, 0.0
            state = decoded
        return update_problem(state, global_state), state, float(count)
