"""An in-process federation: Flower's own round loop (``Strategy.start``) over clients that are
plain functions, so a laptop without Ray or a SuperLink runs the same :class:`MergeStrategy`.

:class:`LocalGrid` is a Flower ``Grid`` whose nodes are callables ``Message -> Message``; it
counts the bytes of the arrays each round sends down and receives back. :func:`run_scenario`
trains zoo clients on non-IID shards of the zoo's skills (local AdamW with the zoo's own training
loop, loss on answers only) and scores the global model on the clients' skills after every round.

The zoo clients (:class:`ZooClient`, built by :func:`zoo_client` from :func:`load_zoo_data`) and
the server's rounds (:func:`run_aggregators`) are also what ``flower_app.py`` runs on Flower's
simulation and deployment runtimes, whose grids :class:`CountingGrid` wraps to count the bytes.
"""

from __future__ import annotations

import copy
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from mergeforge.federated.scenario import Aggregator, Scenario
from mergeforge.federated.sparse import encode_update
from mergeforge.federated.strategy import MergeStrategy, state_of

ClientFn = Callable[[Message], Message | None]  # None: the node never replies
EXAMPLES_KEY = "num-examples"  # FedAvg's weighted_by_key
FIRST_NODE = 101  # client node ids; 1 is the SuperLink's


def record_bytes(record: RecordDict) -> int:
    """Bytes of the arrays a message carries (what dominates communication)."""
    return sum(len(array.data) for arrays in record.array_records.values() for array in arrays.values())


@dataclass
class LocalGrid(Grid):
    """A Flower ``Grid`` that delivers each message to an in-process client function.

    A client that raises is answered with an error reply, as a node that failed mid-round is, and
    one that returns None sends no reply at all, as a node that vanished before the timeout: the
    strategy sees both dropouts the way a deployment shows them.
    """

    clients: Mapping[int, ClientFn]
    bytes_down: list[int] = field(default_factory=list)  # per send_and_receive call (one per round phase)
    bytes_up: list[int] = field(default_factory=list)
    _run: Any = None

    def __post_init__(self) -> None:
        # Flower stamps every message with the identity of the task that creates it; its runtimes
        # set it when they start a ServerApp, and this grid is the runtime here.
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id = TaskIdentity.run_id = 0
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.clients)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid delivers messages synchronously; use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid delivers messages synchronously; use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent, replies = list(messages), []
        for message in sent:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do on push
            try:
                reply = self.clients[message.metadata.dst_node_id](message)
            except Exception as exc:  # a failing client must not fail the round
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            if reply is not None:  # None: a node that never answers; the round goes on without it, as after a timeout
                replies.append(reply)
        count_exchange(self.bytes_down, self.bytes_up, sent, replies)
        return replies


def count_exchange(bytes_down: list[int], bytes_up: list[int], sent: list[Message], replies: list[Message]) -> None:
    """Append the bytes of the arrays one ``send_and_receive`` sent and got back (error replies
    carry none); an exchange that moved no arrays is not counted."""
    down = sum(record_bytes(message.content) for message in sent)
    up = sum(record_bytes(reply.content) for reply in replies if not reply.has_error())
    if down or up:
        bytes_down.append(down)
        bytes_up.append(up)


class CountingGrid(Grid):
    """Any Flower ``Grid`` (a deployment's, the simulation runtime's), counting the bytes of the
    arrays each ``send_and_receive`` moves, as :class:`LocalGrid` does."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.bytes_down: list[int] = []
        self.bytes_up: list[int] = []

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        replies = list(self.inner.send_and_receive(sent, timeout=timeout))
        count_exchange(self.bytes_down, self.bytes_up, sent, replies)
        return replies


# -- the zoo federation ------------------------------------------------------------------------


def client_skills(skills: list[str], clients: int, per_client: int) -> list[list[str]]:
    """Non-IID shards: client k holds skills k, k+1, ..., k+per_client-1 (cyclically)."""
    per_client = min(per_client, len(skills))
    return [[skills[(k + j) % len(skills)] for j in range(per_client)] for k in range(clients)]


def shard_pairs(pairs: list[tuple[str, str]], holders: list[int], client: int, size: int) -> list[tuple[str, str]]:
    """Client ``client``'s disjoint slice of one skill's training pairs among the clients that hold it."""
    position = holders.index(client)
    width = min(size, len(pairs) // len(holders))
    return pairs[position * width: (position + 1) * width]


def dirichlet_counts(pool_sizes: Mapping[str, int], clients: int, alpha: float, seed: int) -> list[dict[str, int]]:
    """How many examples of each skill each client holds under a Dirichlet(α) split.

    For each skill, the clients' shares are one draw from Dirichlet(α, ..., α); the counts are
    the shares of the skill's pool rounded by largest remainder, so they sum to the pool.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    counts: list[dict[str, int]] = [{} for _ in range(clients)]
    for skill, pool in pool_sizes.items():
        shares = rng.dirichlet([alpha] * clients) * pool
        whole = np.floor(shares).astype(int)
        for client in np.argsort(whole - shares, kind="stable")[: pool - int(whole.sum())]:
            whole[client] += 1  # the largest remainders take what flooring left
        for client in range(clients):
            counts[client][skill] = int(whole[client])
    return counts


def scaled_update(global_state: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                  scale: float) -> dict[str, torch.Tensor]:
    """global + scale·(trained − global): a malicious client's model (scale 1 is an honest one)."""
    return {name: global_state[name] + scale * (tensor - global_state[name]) for name, tensor in trained.items()}


def tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names that alias an earlier entry's storage (an output head tied to the input
    embeddings, as SmolLM2's is). They are left out of every message: loading the first name
    sets the shared parameter, so sending both would only send the matrix twice."""
    seen: set[int] = set()
    aliases: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            aliases.add(name)
        seen.add(pointer)
    return aliases


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s weights without the tied aliases: what a client sends."""
    aliases = tied_names(model)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name not in aliases}


def load_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a :func:`model_state` (tied aliases absent, every other weight required)."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    absent = set(missing) - tied_names(model)
    if absent or unexpected:
        raise ValueError(f"state does not fit the model: missing {sorted(absent)[:3]}, unexpected {sorted(unexpected)[:3]}")


def local_seed(scenario: Scenario, server_round: int, node: int) -> int:
    """The batch order of one client's round: the same for every aggregator."""
    return scenario.seed * 100_003 + server_round * 1009 + node


@dataclass
class ZooClient:
    """One client: its skills' training data; trains a shared work model from the global arrays."""

    node: int
    skills: list[str]
    data: Any  # zoo.train.EncodedData; None for a client the split gave no example
    scenario: Scenario
    work_model: torch.nn.Module
    update_scale: float = 1.0  # not 1: a malicious client (scenario `malicious`)
    examples: dict[str, int] = field(default_factory=dict)  # per skill

    @property
    def size(self) -> int:
        return 0 if self.data is None else len(self.data)

    def train_from(self, global_state: Mapping[str, torch.Tensor], steps: int, seed: int) -> tuple[dict[str, torch.Tensor], float]:
        """(the model after ``steps`` local AdamW steps from ``global_state``, the final loss);
        a malicious client's model is scaled from ``global_state``."""
        from mergeforge.zoo.train import TrainingSchedule, train

        load_model_state(self.work_model, global_state)
        schedule = TrainingSchedule(steps=steps, learning_rate=self.scenario.learning_rate, batch_size=self.scenario.batch_size,
                                    warmup_fraction=0.0, final_lr_fraction=1.0)  # a constant rate: rounds continue one run
        loss = train(self.work_model, self.data, schedule, seed=seed)
        trained = model_state(self.work_model)
        if self.update_scale != 1.0:
            trained = scaled_update(global_state, trained, self.update_scale)
        return trained, loss

    def __call__(self, message: Message) -> Message:
        global_state = state_of(next(iter(message.content.array_records.values())))
        server_round = message.content.config_records["config"]["server-round"]  # FedAvg sets it each round
        if not isinstance(server_round, int):
            raise TypeError(f"config 'server-round' is {server_round!r}, not a round number")
        if self.data is None:  # nothing to train on: say so, and the strategy leaves this reply out
            content = RecordDict({"arrays": ArrayRecord(global_state), "metrics": MetricRecord({EXAMPLES_KEY: 0})})
            return Message(content, reply_to=message)
        seed = local_seed(self.scenario, server_round, self.node)
        trained, loss = self.train_from(global_state, self.scenario.local_steps, seed)
        upload = self.scenario.upload
        if upload.kind != "dense":
            trained = encode_update(global_state, trained, upload.kind, upload.density, seed=seed)
        content = RecordDict({"arrays": ArrayRecord(trained),
                              "metrics": MetricRecord({EXAMPLES_KEY: self.size, "train-loss": loss})})
        return Message(content, reply_to=message)


@dataclass
class ZooData:
    """What every node of a zoo federation derives its part from: the zoo's base model and
    tokenizer, the test tasks of the skills in play, and each client's training pairs per skill."""

    model: torch.nn.Module
    tokenizer: Any
    tasks: list[Any]  # mergeforge.tasks.folders.Task
    pairs: list[dict[str, list[tuple[str, str]]]]  # per client, per skill (disjoint slices)

    def held(self, client: int) -> dict[str, int]:
        """Client ``client``'s examples per skill (skills it holds none of left out)."""
        return {skill: len(held) for skill, held in self.pairs[client].items() if held}


def load_zoo_data(scenario: Scenario, source: str = "scenario") -> ZooData:
    """Load the zoo's base model and share its skills' training data out to the clients
    (``source`` names the scenario in errors)."""
    from mergeforge.errors import RecipeError
    from mergeforge.evaluate.api import load_model_and_tokenizer
    from mergeforge.tasks.folders import load_task
    from mergeforge.zoo import build_zoo, load_zoo

    zoo = load_zoo(scenario.zoo) if scenario.zoo else build_zoo(None, size="tiny", seed=0)
    skills = scenario.skills or zoo.skills
    unknown = [skill for skill in skills if skill not in zoo.skills]
    if unknown:
        raise RecipeError(f"{source}: field 'skills': the zoo has no skill '{unknown[0]}'; skills: {', '.join(zoo.skills)}")
    model, tokenizer = load_model_and_tokenizer(zoo.base.path)
    tasks = {skill: load_task(zoo.task_dir(skill)) for skill in skills}
    train_pairs = {skill: [(e.prompt, e.answer) for e in tasks[skill].examples("train")] for skill in skills}
    return ZooData(model, tokenizer, list(tasks.values()), client_pairs(scenario, train_pairs))


def zoo_client(scenario: Scenario, data: ZooData, client: int, work_model: torch.nn.Module) -> ZooClient:
    """Client ``client`` (0-based; node ``FIRST_NODE + client``) with its encoded training data,
    training ``work_model`` (which clients of one process share)."""
    from mergeforge.zoo.train import encode_training_data

    examples = data.held(client)
    flat = [pair for held in data.pairs[client].values() for pair in held]
    encoded = encode_training_data(data.tokenizer, flat, loss_on_prompt=False) if flat else None
    attacks = scenario.malicious is not None and client < scenario.malicious.clients
    scale = scenario.malicious.scale if scenario.malicious is not None and attacks else 1.0
    return ZooClient(FIRST_NODE + client, list(examples), encoded, scenario, work_model, scale, examples)


@dataclass
class Federation:
    """What every aggregator's run shares: the zoo's base model, tokenizer, clients and test tasks."""

    base_state: dict[str, torch.Tensor]
    eval_model: torch.nn.Module
    tokenizer: Any
    clients: dict[int, ZooClient]  # the clients trained in this process (all of them, in process)
    tasks: list[Any]  # mergeforge.tasks.folders.Task
    held: list[dict[str, int]] = field(default_factory=list)  # every client's examples per skill

    @property
    def shards(self) -> dict[str, list[str]]:
        return {f"node {FIRST_NODE + client}": list(examples) for client, examples in enumerate(self.held)}

    @property
    def examples(self) -> dict[str, dict[str, int]]:
        return {f"node {FIRST_NODE + client}": examples for client, examples in enumerate(self.held)}

    @property
    def training(self) -> list[ZooClient]:
        """The clients that hold at least one example."""
        return [client for client in self.clients.values() if client.data is not None]


def build_federation(scenario: Scenario, source: str = "scenario", clients: Iterable[int] | None = None) -> Federation:
    """The zoo federation of ``scenario`` with the clients ``clients`` (0-based; default: all of
    them) ready to train; a server on Flower's runtimes, whose clients train elsewhere, asks for none."""
    data = load_zoo_data(scenario, source)
    work_model = copy.deepcopy(data.model)
    chosen = range(scenario.clients) if clients is None else clients
    trained = {FIRST_NODE + client: zoo_client(scenario, data, client, work_model) for client in chosen}
    held = [data.held(client) for client in range(scenario.clients)]
    return Federation(model_state(data.model), data.model, data.tokenizer, trained, data.tasks, held)


def client_pairs(scenario: Scenario, train_pairs: Mapping[str, list[tuple[str, str]]]) -> list[dict[str, list[tuple[str, str]]]]:
    """Each client's training pairs, per skill, under the scenario's split (disjoint slices)."""
    skills = list(train_pairs)
    if scenario.split.kind == "skills":
        shards = client_skills(skills, scenario.clients, scenario.skills_per_client)
        return [{skill: shard_pairs(train_pairs[skill], [k for k, other in enumerate(shards) if skill in other], client,
                                    scenario.examples_per_client) for skill in held}
                for client, held in enumerate(shards)]
    assert scenario.split.alpha is not None  # the schema requires it for dirichlet
    total = scenario.examples_per_client * scenario.clients * min(scenario.skills_per_client, len(skills))
    pools = {skill: min(len(pairs), round(total / len(skills))) for skill, pairs in train_pairs.items()}
    counts = dirichlet_counts(pools, scenario.clients, scenario.split.alpha, scenario.seed)
    result: list[dict[str, list[tuple[str, str]]]] = [{} for _ in range(scenario.clients)]
    for skill, pairs in train_pairs.items():
        start = 0
        for client in range(scenario.clients):
            result[client][skill] = pairs[start: start + counts[client][skill]]
            start += counts[client][skill]
    return result


def score(federation: Federation, state: Mapping[str, torch.Tensor], eval_examples: int) -> dict[str, Any]:
    """Exact-match accuracy and mean answer loss of a global model on every skill's test split.

    The loss is reported beside the accuracy because it moves before exact match does: early in
    training a model gets closer to the answers long before it produces one exactly.
    """
    from mergeforge.evaluate.api import evaluate_model

    load_model_state(federation.eval_model, state)
    result = evaluate_model(federation.eval_model, federation.tasks, tokenizer=federation.tokenizer,
                            max_examples=eval_examples, with_loss=True, scoring="forced")
    losses = [r["loss"] for r in result["tasks"].values()]
    return {"accuracy": result["mean_score"], "loss": sum(losses) / len(losses),
            "tasks": {name: r["score"] for name, r in result["tasks"].items()}}


def run_aggregator(federation: Federation, scenario: Scenario, aggregator: Aggregator,
                   progress: Callable[[str], None] | None = None, grid: Grid | None = None) -> dict[str, Any]:
    """R rounds of the federation with one aggregator; per round accuracy, bytes, rejections, time.

    ``grid``: the Flower runtime's grid, whose nodes run :mod:`mergeforge.federated.flower_app`'s
    ClientApp; default: a :class:`LocalGrid` over ``federation.clients``, in this process.
    """
    random.seed(scenario.seed)  # Flower samples clients with `random`: every aggregator sees the same draws
    # Every client must be up before round 1: on a runtime the SuperNodes connect one by one.
    strategy = MergeStrategy(aggregator.method, aggregator.parameters, seed=scenario.seed,
                             fraction_train=scenario.fraction_train, min_train_nodes=1,
                             min_available_nodes=scenario.clients, fraction_evaluate=0.0, weighted_by_key=EXAMPLES_KEY)
    counting: LocalGrid | CountingGrid = LocalGrid(federation.clients) if grid is None else CountingGrid(grid)
    rounds: list[dict[str, Any]] = []
    clock = [time.perf_counter()]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        scores = score(federation, state_of(arrays), scenario.eval_examples)
        now = time.perf_counter()
        entry: dict[str, Any] = {"round": server_round, **scores, "seconds": now - clock[0]}
        if server_round > 0:
            entry.update(bytes_down=counting.bytes_down[-1], bytes_up=counting.bytes_up[-1],
                         rejected=[vars(r) for r in strategy.rejections.get(server_round, [])])
        rounds.append(entry)
        clock[0] = time.perf_counter()
        if progress is not None:
            progress(f"{aggregator.label}: round {server_round}/{scenario.rounds} accuracy {scores['accuracy']:.3f}"
                     f" loss {scores['loss']:.3f}")
        return MetricRecord({"accuracy": scores["accuracy"]})

    started = time.perf_counter()
    strategy.start(counting, ArrayRecord(federation.base_state), num_rounds=scenario.rounds, train_config=ConfigRecord(),
                   evaluate_fn=evaluate)
    return {"method": aggregator.method, "parameters": aggregator.parameters, "rounds": rounds,
            "wall_seconds": time.perf_counter() - started,
            "bytes_total": sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rounds)}


def run_aggregators(federation: Federation, scenario: Scenario, progress: Callable[[str], None] | None = None,
                    grid: Grid | None = None) -> dict[str, Any]:
    """Every aggregator of the scenario in turn, over the same federation and client draws (on
    ``grid``, as :func:`run_aggregator`); the report without the references."""
    results = {aggregator.label: run_aggregator(federation, scenario, aggregator, progress, grid)
               for aggregator in scenario.aggregators}
    attackers = scenario.malicious.clients if scenario.malicious is not None and scenario.malicious.scale != 1.0 else 0
    return {"scenario": scenario.model_dump(mode="json"), "shards": federation.shards, "examples": federation.examples,
            "malicious": [f"node {FIRST_NODE + client}" for client in range(attackers)], "aggregators": results}


def run_scenario(scenario: Scenario, progress: Callable[[str], None] | None = None, source: str = "scenario") -> dict[str, Any]:
    """Every aggregator of the scenario over the same federation and client draws."""
    torch.manual_seed(scenario.seed)
    federation = build_federation(scenario, source)
    report = run_aggregators(federation, scenario, progress)
    if scenario.references:
        from mergeforge.federated.references import centralised, one_shot

        report["references"] = {"centralised": centralised(federation, scenario, progress),
                                "one_shot": one_shot(federation, scenario, progress)}
    return report


def write_report(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``results.json`` and ``accuracy.png`` (mean accuracy per round, one line per aggregator)."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "png": out_dir / "accuracy.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4))
    curves = [(label, run["rounds"], {"marker": "o"}) for label, run in result["aggregators"].items()]
    if "references" in result:
        curves.append(("centralised", result["references"]["centralised"]["rounds"], {"color": "k", "linestyle": "--"}))
    for label, rounds, style in curves:
        steps = [r["round"] for r in rounds]
        accuracy_axes.plot(steps, [r["accuracy"] for r in rounds], label=label, **style)
        loss_axes.plot(steps, [r["loss"] for r in rounds], label=label, **style)
    for axes, name in ((accuracy_axes, "mean exact-match accuracy"), (loss_axes, "mean answer loss")):
        axes.set_xlabel("round")
        axes.set_ylabel(name)
    accuracy_axes.set_title("federated training on the zoo")
    loss_axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=100)
    plt.close(figure)
    return paths


def summary(result: dict[str, Any]) -> str:
    """One markdown table: accuracy per round, the answer loss before and after, bytes and wall
    time per aggregator (and the references when the scenario asked for them)."""
    runs = result["aggregators"]
    rounds = max(len(run["rounds"]) for run in runs.values())
    header = ("| aggregator | " + " | ".join(f"round {r}" for r in range(rounds))
              + " | loss, first → last | MB sent | seconds |")
    lines = [header, "|" + "---|" * (rounds + 4)]

    def row(label: str, entries: list[dict[str, Any]], sent: str, seconds: float) -> str:
        accuracies = " | ".join(f"{r['accuracy']:.3f}" for r in entries)
        return f"| {label} | {accuracies} | {entries[0]['loss']:.3f} → {entries[-1]['loss']:.3f} | {sent} | {seconds:.1f} |"

    for label, run in runs.items():
        lines.append(row(label, run["rounds"], f"{run['bytes_total'] / 1e6:.2f}", run["wall_seconds"]))
    if "references" in result:
        central = result["references"]["centralised"]
        lines.append(row("centralised (same steps)", central["rounds"], "-", central["wall_seconds"]))
        lines += ["", "| one-shot merge of clients trained alone | accuracy | loss |", "|---|---|---|"]
        one_shot = result["references"]["one_shot"]
        lines += [f"| {label} | {accuracy:.3f} | {one_shot['loss'][label]:.3f} |" for label, accuracy in one_shot["accuracy"].items()]
    return "\n".join(lines)
