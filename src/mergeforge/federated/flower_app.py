"""The zoo federation of ``mergeforge federated`` as a Flower app, for Flower's own runtimes.

``client_app`` is a node of the federation: the SuperNode with ``partition-id`` k is client k of
the scenario (node ``101 + k`` of the in-process run), with the same shard, the same local
training (:class:`~mergeforge.federated.simulation.ZooClient`) and the same batch seeds.
``server_app`` runs every aggregator of the scenario with :class:`MergeStrategy` on the runtime's
grid and scores the global model after every round, as the in-process run does
(:func:`~mergeforge.federated.simulation.run_aggregators`). Both read the run config:

- ``scenario``: the scenario file (required; a path the nodes and the server can read);
- ``zoo``: a built zoo folder that replaces the scenario's ``zoo`` ("" keeps it);
- ``out-dir``: where the server writes ``results.json`` and ``accuracy.png`` ("" writes nothing).

``examples/zoo_flower_app`` points ``flwr run`` at these two objects (docs/federated.md);
:func:`run_on_simulation` is ``mergeforge federated --runtime simulation``: the same apps on
Flower's simulation runtime (virtual SuperNodes on Ray) in this process.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from mergeforge.errors import RecipeError
from mergeforge.federated.scenario import Scenario, load_scenario
from mergeforge.federated.simulation import (
    ZooClient,
    ZooData,
    build_federation,
    load_zoo_data,
    run_aggregators,
    summary,
    write_report,
    zoo_client,
)

# A ClientApp process (a Ray actor, or a SuperNode's) serves several rounds, and on the
# simulation runtime several partitions: load the zoo once per scenario, share one work model.
_zoo_data: dict[str, tuple[ZooData, torch.nn.Module]] = {}
_clients: dict[tuple[str, int], ZooClient] = {}


def check_runtime_scenario(scenario: Scenario, source: str) -> None:
    """What a scenario asks that only the in-process run can do: the references train on every
    client's data, which a server on a runtime does not hold."""
    if scenario.references:
        raise RecipeError(f"{source}: field 'references': the references need every client's data in one process; "
                          "run them with --runtime local")


def scenario_from(run_config: dict[str, Any]) -> tuple[Scenario, str]:
    """The validated scenario a run config names, and its path (for errors)."""
    path = run_config.get("scenario", "")
    if not isinstance(path, str) or not path:
        raise RecipeError("Flower run config: 'scenario' must be the path of a scenario file "
                          "(flwr run APP --run-config \"scenario='/path/scenario.yml'\")")
    scenario = load_scenario(path)
    zoo = run_config.get("zoo", "")
    if zoo:
        scenario = scenario.model_copy(update={"zoo": str(zoo)})
    check_runtime_scenario(scenario, path)
    return scenario, path


def node_client(scenario: Scenario, source: str, node_config: dict[str, Any]) -> ZooClient:
    """The zoo client a node is: the scenario's client number ``partition-id``."""
    partition = node_config.get("partition-id")
    if not isinstance(partition, int) or not 0 <= partition < scenario.clients:
        raise RecipeError(f"node config 'partition-id' is {partition!r}; {source} has clients 0 to {scenario.clients - 1} "
                          "(flower-supernode --node-config \"partition-id=0\")")
    partitions = node_config.get("num-partitions")  # the simulation runtime sets it
    if partitions is not None and partitions != scenario.clients:
        raise RecipeError(f"the runtime has {partitions} nodes but {source} has {scenario.clients} clients")
    key = scenario.model_dump_json()
    if (key, partition) not in _clients:
        if key not in _zoo_data:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # one bar per node process and round otherwise
            transformers_logging.set_verbosity_error()
            data = load_zoo_data(scenario, source)
            _zoo_data[key] = (data, copy.deepcopy(data.model))
        data, work_model = _zoo_data[key]
        _clients[key, partition] = zoo_client(scenario, data, partition, work_model)
    return _clients[key, partition]


def train_on_node(scenario: Scenario, source: str, message: Message, context: Context) -> Message:
    """One round of local training on this node, by the in-process run's client code."""
    return node_client(scenario, source, dict(context.node_config))(message)


def serve(grid: Grid, scenario: Scenario, source: str, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The server's side: every aggregator of the scenario on ``grid``; the report of
    ``mergeforge federated`` without the references."""
    torch.manual_seed(scenario.seed)
    federation = build_federation(scenario, source, clients=())  # the base model and test tasks; no client data
    return run_aggregators(federation, scenario, progress, grid)


def curves(result: dict[str, Any]) -> str:
    """One line per aggregator: the accuracy and answer loss per round, as JSON (the runtime
    tests and docs/federated.md read them from the server's log)."""
    return "\n".join(f"mergeforge federated: {label} per round "
                     + json.dumps({r["round"]: {"accuracy": r["accuracy"], "loss": r["loss"]} for r in run["rounds"]})
                     for label, run in result["aggregators"].items())


client_app = ClientApp()


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    scenario, source = scenario_from(dict(context.run_config))
    return train_on_node(scenario, source, message, context)


server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    scenario, source = scenario_from(dict(context.run_config))
    result = serve(grid, scenario, source, progress=print)
    out_dir = context.run_config.get("out-dir", "")
    if out_dir:
        write_report(result, Path(str(out_dir)))
    print(summary(result))
    print(curves(result))


def run_on_simulation(scenario: Scenario, source: str, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The scenario on Flower's simulation runtime: one virtual SuperNode per client, their
    ClientApps on Ray actors (one CPU each), the ServerApp in this process; the report."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ModuleNotFoundError("the simulation runtime needs Ray", name="ray")
    check_runtime_scenario(scenario, source)
    from flwr.simulation import run_simulation

    result: dict[str, Any] = {}
    simulated_server = ServerApp()

    @simulated_server.main()
    def _main(grid: Grid, context: Context) -> None:
        result.update(serve(grid, scenario, source, progress))

    simulated_client = ClientApp()

    @simulated_client.train()
    def _client(message: Message, context: Context) -> Message:
        return train_on_node(scenario, source, message, context)

    run_simulation(simulated_server, simulated_client, num_supernodes=scenario.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if not result:
        raise RuntimeError("Flower's simulation runtime ended without the server's report (see its log above)")
    return result
