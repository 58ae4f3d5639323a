"""The two references a federated curve is read against, on the same zoo federation:

- **centralised**: one model trained on the union of the clients' data, with as many AdamW steps
  per round as the sampled clients take together (the same compute, no communication);
- **one-shot**: every client trained alone from the base for all R·E steps, then merged once by
  each aggregator (merging without rounds, as a model merge of fine-tunes is).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mergeforge.federated.aggregate import merge_updates
from mergeforge.federated.scenario import Scenario
from mergeforge.federated.simulation import Federation, ZooClient, local_seed, score


def sampled_per_round(scenario: Scenario) -> int:
    """How many clients FedAvg samples per round (``min_train_nodes`` is 1 in the simulation)."""
    return max(int(scenario.clients * scenario.fraction_train), 1)


def centralised(federation: Federation, scenario: Scenario, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Accuracy per round of one model trained on every client's data (honest copies)."""
    from mergeforge.zoo.train import concat_data

    started = time.perf_counter()
    first = next(iter(federation.clients.values()))
    pooled = concat_data([client.data for client in federation.training], federation.tokenizer.pad_token_id)
    learner = ZooClient(0, sorted({s for c in federation.clients.values() for s in c.skills}), pooled, scenario,
                        first.work_model)
    state = dict(federation.base_state)
    rounds = [{"round": 0, **score(federation, state, scenario.eval_examples)}]
    for server_round in range(1, scenario.rounds + 1):
        state, _ = learner.train_from(state, scenario.local_steps * sampled_per_round(scenario),
                                      local_seed(scenario, server_round, 0))
        rounds.append({"round": server_round, **score(federation, state, scenario.eval_examples)})
        if progress is not None:
            progress(f"centralised: round {server_round}/{scenario.rounds} accuracy {rounds[-1]['accuracy']:.3f}")
    return {"rounds": rounds, "wall_seconds": time.perf_counter() - started}


def one_shot(federation: Federation, scenario: Scenario, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Each aggregator's single merge of the clients trained alone for R·E steps."""
    started = time.perf_counter()
    steps = scenario.rounds * scenario.local_steps
    trained = [client.train_from(federation.base_state, steps, local_seed(scenario, 1, client.node))[0]
               for client in federation.training]
    counts = [client.size for client in federation.training]
    accuracy, loss = {}, {}
    for aggregator in scenario.aggregators:
        merged = merge_updates(aggregator.method, federation.base_state, trained, counts, aggregator.parameters,
                               seed=scenario.seed)
        scores = score(federation, merged, scenario.eval_examples)
        accuracy[aggregator.label], loss[aggregator.label] = scores["accuracy"], scores["loss"]
        if progress is not None:
            progress(f"one-shot {aggregator.label}: accuracy {accuracy[aggregator.label]:.3f}")
    return {"accuracy": accuracy, "loss": loss, "wall_seconds": time.perf_counter() - started}
