"""mergeforge.federated: MergeStrategy's aggregation is merge_state_dicts over the client models,
FedAvg weights by example counts, each round trains from the last aggregate (a closed form over
3 rounds; a one-client federation on the tiny zoo is that client's own training, scored on the
new model), bad updates (NaN, infinity, shapes, missing tensors, no examples, a failed or silent
node, malformed sparse uploads) are rejected with a reason while the round completes, sparse
uploads are rebuilt and cost fewer bytes, the median bounds a scaled malicious update, the
Dirichlet split hands out disjoint shares, a tied output head travels once, and
``mergeforge federated`` runs end to end on the tiny zoo through the real CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("flwr")

from conftest import run_cli  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from mergeforge import merge_state_dicts  # noqa: E402
from mergeforge.errors import RecipeError  # noqa: E402
from mergeforge.federated import MergeStrategy  # noqa: E402
from mergeforge.federated.scenario import load_scenario  # noqa: E402
from mergeforge.federated.simulation import LocalGrid, client_skills, scaled_update, shard_pairs  # noqa: E402

SHAPES = {"layer.weight": (6, 4), "layer.bias": (6,), "head.weight": (3, 6)}


def random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * scale for name, shape in SHAPES.items()}


def fixed_client(state: dict[str, torch.Tensor], examples: int):
    """A client that answers every round with the same model and example count."""

    def reply(message: Message) -> Message:
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": examples})})
        return Message(content, reply_to=message)

    return reply


def one_round(strategy: MergeStrategy, global_state, clients) -> dict[str, torch.Tensor] | None:
    """Flower's own round loop (Strategy.start) for one round over in-process clients."""
    grid = LocalGrid(dict(enumerate(clients, start=101)))
    result = strategy.start(grid, ArrayRecord(global_state), num_rounds=1, train_config=ConfigRecord())
    return dict(result.arrays.to_torch_state_dict()) or None


def strategy(method: str, parameters=None) -> MergeStrategy:
    return MergeStrategy(method, parameters, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)


@pytest.mark.parametrize(("method", "parameters"), [("task_arithmetic", {}), ("ties", {"density": 0.5}),
                                                    ("dare_ties", {"density": 0.5}), ("median", {}),
                                                    ("trimmed_mean", {"trim": 0.25})])
def test_the_aggregate_is_merge_state_dicts_over_the_client_models(method, parameters):
    global_state = random_state(0)
    clients = [{name: global_state[name] + update for name, update in random_state(seed, 0.1).items()} for seed in (1, 2, 3, 4)]
    counts = [10, 20, 30, 40]
    merged = one_round(strategy(method, parameters), global_state, [fixed_client(s, n) for s, n in zip(clients, counts)])
    weights = [{"weight": n / 100} for n in counts] if method in ("task_arithmetic", "ties", "dare_ties") else None
    base = global_state if method in ("task_arithmetic", "ties", "dare_ties") else None
    # Round 1 seeds random methods with seed + round.
    expected = merge_state_dicts(method, clients, base=base, parameters=parameters, model_parameters=weights, seed=1)
    assert merged is not None and merged.keys() == expected.keys()
    for name in expected:
        # Not bit-equal: tensors read back from an ArrayRecord may take the torch path where
        # the originals take the NumPy kernel (last-bit differences).
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-7)


def test_fedavg_weights_the_updates_by_example_counts_and_matches_flowers_fedavg():
    from flwr.serverapp.strategy import FedAvg

    global_state = random_state(0)
    a, b = random_state(1), random_state(2)
    clients = [fixed_client(a, 1), fixed_client(b, 3)]
    merged = one_round(strategy("linear"), global_state, clients)
    assert merged is not None
    for name in SHAPES:
        torch.testing.assert_close(merged[name], (a[name] + 3 * b[name]) / 4)
    flower = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    result = flower.start(LocalGrid({101: clients[0], 102: clients[1]}), ArrayRecord(global_state), num_rounds=1)
    for name, tensor in result.arrays.to_torch_state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6)


def stepping_client(target: dict[str, torch.Tensor], examples: int, rate: float = 0.5):
    """A client whose local training is one gradient step on ||θ − target||²/2 from the model
    it receives: θ + rate·(target − θ). It answers with what it was sent, so a round that
    started from a stale model shows in the result."""

    def reply(message: Message) -> Message:
        received = dict(next(iter(message.content.array_records.values())).to_torch_state_dict())
        trained = {name: tensor + rate * (target[name] - tensor) for name, tensor in received.items()}
        content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": examples})})
        return Message(content, reply_to=message)

    return reply


def test_each_round_starts_from_the_last_aggregate_and_adds_the_weighted_mean_update():
    global_state = random_state(0)
    targets, counts = [random_state(1), random_state(2)], [1, 3]
    result = strategy("linear").start(LocalGrid({101: stepping_client(targets[0], 1), 102: stepping_client(targets[1], 3)}),
                                      ArrayRecord(global_state), num_rounds=3, train_config=ConfigRecord())
    expected = dict(global_state)
    for _ in range(3):  # θ ← θ + Σ nᵢ/N · (θᵢ − θ), θᵢ trained from this round's θ
        updates = [{name: 0.5 * (target[name] - expected[name]) for name in SHAPES} for target in targets]
        expected = {name: expected[name] + (counts[0] * updates[0][name] + counts[1] * updates[1][name]) / 4 for name in SHAPES}
    for name, tensor in result.arrays.to_torch_state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6)
    # Two clients holding the same data follow the one client's trajectory.
    twins = strategy("linear").start(LocalGrid({101: stepping_client(targets[0], 5), 102: stepping_client(targets[0], 5)}),
                                     ArrayRecord(global_state), num_rounds=3, train_config=ConfigRecord())
    alone = strategy("linear").start(LocalGrid({101: stepping_client(targets[0], 5)}), ArrayRecord(global_state),
                                     num_rounds=3, train_config=ConfigRecord())
    for name, tensor in twins.arrays.to_torch_state_dict().items():
        torch.testing.assert_close(tensor, alone.arrays.to_torch_state_dict()[name], rtol=1e-6, atol=1e-7)


def broken_clients(good: dict[str, torch.Tensor]):
    nan = {name: tensor.clone() for name, tensor in good.items()}
    nan["layer.bias"][2] = float("nan")
    wrong_shape = {**good, "head.weight": torch.zeros(3, 7)}
    missing = {name: tensor for name, tensor in good.items() if name != "layer.bias"}
    infinite = {name: tensor.clone() for name, tensor in good.items()}
    infinite["head.weight"][0, 0] = float("-inf")

    def crash(message: Message) -> Message:
        raise ConnectionError("client dropped out")

    def silent(message: Message) -> None:  # never replies
        return None

    return [fixed_client(nan, 5), fixed_client(wrong_shape, 5), fixed_client(missing, 5), crash, fixed_client(good, 0),
            fixed_client(infinite, 5), silent]


def test_nan_wrong_shape_and_missing_updates_are_rejected_with_a_reason_and_the_round_completes(caplog):
    global_state = random_state(0)
    good = [random_state(1), random_state(2)]
    merging = strategy("linear")
    with caplog.at_level(logging.WARNING, logger="mergeforge.federated"):
        merged = one_round(merging, global_state, [fixed_client(good[0], 5), *broken_clients(good[0]), fixed_client(good[1], 5)])
    assert merged is not None
    for name in SHAPES:
        torch.testing.assert_close(merged[name], (good[0][name] + good[1][name]) / 2)
    reasons = {rejection.client: rejection.reason for rejection in merging.rejections[1]}
    assert reasons == {
        "node 102": "tensor 'layer.bias' holds NaN or infinite values",
        "node 103": "tensor 'head.weight' has shape (3, 7), the global model's is (3, 6)",
        "node 104": "missing tensor 'layer.bias'",
        "node 106": "metric 'num-examples' is 0, not a positive number of examples",
        "node 107": "tensor 'head.weight' holds NaN or infinite values",
    }  # node 105 failed (an error reply, logged by FedAvg) and node 108 never replied: both left out
    assert "update from node 103 rejected: tensor 'head.weight' has shape (3, 7)" in caplog.text


def test_a_round_without_a_valid_update_keeps_the_global_model():
    global_state = random_state(0)
    merging = strategy("ties")
    merged = one_round(merging, global_state, broken_clients(random_state(1))[:2])
    assert merged is None  # no new global model: Flower keeps the current one for the next round
    assert len(merging.rejections[1]) == 2


def test_an_unknown_method_or_parameter_fails_when_the_strategy_is_built():
    with pytest.raises(RecipeError, match="tiez"):
        MergeStrategy("tiez")
    with pytest.raises(RecipeError, match="aggregator 'ties' has no parameter 'trim'"):
        MergeStrategy("ties", {"trim": 0.1})
    with pytest.raises(RecipeError, match="weights come from example counts"):
        MergeStrategy("task_arithmetic", {"weight": 2.0})


def test_non_iid_shards_give_each_client_its_skills_and_disjoint_examples():
    shards = client_skills(["a", "b", "c"], clients=4, per_client=2)
    assert shards == [["a", "b"], ["b", "c"], ["c", "a"], ["a", "b"]]
    pairs = [(str(i), str(i)) for i in range(30)]
    holders = [k for k, held in enumerate(shards) if "a" in held]  # clients 0, 2, 3
    slices = [shard_pairs(pairs, holders, client, size=100) for client in holders]
    assert [len(s) for s in slices] == [10, 10, 10] and len({p for s in slices for p in s}) == 30


def test_a_dirichlet_split_hands_out_each_skills_pool_and_small_alpha_concentrates_it():
    from mergeforge.federated.simulation import dirichlet_counts

    pools = {f"skill{i}": 100 + i for i in range(40)}
    for alpha, lowest, highest in ((0.05, 0.8, 1.0), (100.0, 0.0, 0.3)):
        counts = dirichlet_counts(pools, clients=6, alpha=alpha, seed=0)
        assert all(sum(client[skill] for client in counts) == pool for skill, pool in pools.items())
        largest = [max(client[skill] for client in counts) / pool for skill, pool in pools.items()]
        assert lowest <= sum(largest) / len(largest) <= highest  # an even split gives each client 1/6
    assert dirichlet_counts(pools, 6, 0.5, seed=1) == dirichlet_counts(pools, 6, 0.5, seed=1)


def test_dirichlet_shards_are_disjoint_slices_of_each_skill():
    from mergeforge.federated.simulation import client_pairs

    scenario = load_scenario({"clients": 4, "skills_per_client": 1, "examples_per_client": 15,
                              "split": {"kind": "dirichlet", "alpha": 0.3}})
    train_pairs = {skill: [(f"{skill}{i}", str(i)) for i in range(50)] for skill in ("a", "b", "c")}
    shards = client_pairs(scenario, train_pairs)
    for skill in train_pairs:  # pools of 15 · 4 clients · 1 skill ÷ 3 skills = 20 examples
        held = [pair for client in shards for pair in client[skill]]
        assert len(held) == len(set(held)) == 20 and set(held) <= set(train_pairs[skill])


def test_a_client_the_dirichlet_split_leaves_empty_is_left_out_with_its_reason(tiny_zoo_dir):
    from mergeforge.federated.simulation import build_federation, run_aggregator

    scenario = load_scenario({"zoo": str(tiny_zoo_dir), "skills": ["count"], "clients": 6, "examples_per_client": 8,
                              "split": {"kind": "dirichlet", "alpha": 0.05}, "rounds": 1, "local_steps": 2,
                              "batch_size": 4, "eval_examples": 4})
    federation = build_federation(scenario)
    sizes = {node: client.size for node, client in federation.clients.items()}
    assert sum(sizes.values()) == 8 * 6 and 0 in sizes.values()  # the pool: 8 examples × 6 clients × 1 skill
    run = run_aggregator(federation, scenario, scenario.aggregators[0])
    rejected = {r["client"] for r in run["rounds"][1]["rejected"]}
    assert rejected == {f"node {node}" for node, size in sizes.items() if size == 0}


def test_a_malicious_client_scales_its_update_and_the_median_bounds_it():
    global_state = random_state(0)
    honest = [{name: global_state[name] + update for name, update in random_state(seed, 0.1).items()} for seed in (1, 2, 3, 4)]
    attacker = scaled_update(global_state, honest[0], -10.0)
    for name in SHAPES:
        torch.testing.assert_close(attacker[name] - global_state[name], -10 * (honest[0][name] - global_state[name]))
    clients = [fixed_client(state, 10) for state in (attacker, *honest[1:])]
    averaged = one_round(strategy("linear"), global_state, clients)
    median = one_round(strategy("median"), global_state, clients)
    assert averaged is not None and median is not None
    spread = max(float((state[name] - global_state[name]).abs().max()) for state in honest[1:] for name in SHAPES)
    assert max(float((median[name] - global_state[name]).abs().max()) for name in SHAPES) <= spread + 1e-6
    assert max(float((averaged[name] - global_state[name]).abs().max()) for name in SHAPES) > spread


def sparse_client(global_state, trained, kind: str, density: float, examples: int = 10, tamper=None):
    from mergeforge.federated.sparse import encode_update

    upload = encode_update(global_state, trained, kind, density, seed=3)
    if tamper is not None:
        tamper(upload)
    return fixed_client(upload, examples)


@pytest.mark.parametrize("kind", ["topk", "dare"])
def test_sparse_uploads_are_rebuilt_on_the_global_model_before_merging(kind):
    from mergeforge.federated.sparse import decode_update, encode_update

    global_state = random_state(0)
    clients = [{name: global_state[name] + update for name, update in random_state(seed, 0.1).items()} for seed in (1, 2, 3)]
    merging = strategy("ties", {"density": 0.5})
    grid = LocalGrid({101 + i: sparse_client(global_state, state, kind, 0.25) for i, state in enumerate(clients)})
    result = merging.start(grid, ArrayRecord(global_state), num_rounds=1, train_config=ConfigRecord())
    rebuilt = [decode_update(global_state, encode_update(global_state, state, kind, 0.25, seed=3))[0] for state in clients]
    expected = merge_state_dicts("ties", rebuilt, base=global_state, parameters={"density": 0.5},
                                 model_parameters=[{"weight": 1 / 3}] * 3)
    for name, tensor in result.arrays.to_torch_state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7)
    if kind == "topk":  # exactly the largest quarter of each update, the rest of the global model unchanged
        update = clients[0]["layer.weight"] - global_state["layer.weight"]
        sent = rebuilt[0]["layer.weight"] - global_state["layer.weight"]
        assert int((sent != 0).sum()) == 6 and float(sent.abs().min()) == 0.0
        assert set(sent.reshape(-1).nonzero().reshape(-1).tolist()) == set(update.abs().reshape(-1).topk(6).indices.tolist())


@pytest.mark.parametrize("kind", ["topk", "dare"])
def test_a_sparse_upload_sends_fewer_bytes(kind):
    # Large enough that each array's serialisation header (about 128 bytes) does not dominate.
    generator = torch.Generator().manual_seed(0)
    global_state = {"w": torch.randn(128, 128, generator=generator)}
    trained = {"w": global_state["w"] + 0.1 * torch.randn(128, 128, generator=generator)}
    grid = LocalGrid({101: sparse_client(global_state, trained, kind, 0.1)})
    strategy("linear").start(grid, ArrayRecord(global_state), num_rounds=1, train_config=ConfigRecord())
    dense = grid.bytes_down[0]  # the global model went down whole
    assert 0.15 * dense < grid.bytes_up[0] < 0.25 * dense  # 10% of the entries, 4 bytes of index + 4 of value each


def test_malformed_sparse_uploads_are_rejected_with_a_reason():
    global_state = random_state(0)
    good = {name: global_state[name] + update for name, update in random_state(1, 0.1).items()}

    def out_of_range(upload):
        upload["layer.bias::indices"][0] = 99

    def repeated(upload):
        upload["head.weight::indices"][1] = upload["head.weight::indices"][0]

    def dropped(upload):
        del upload["layer.weight::values"]

    merging = strategy("linear")
    clients = [sparse_client(global_state, good, "topk", 0.5, tamper=t) for t in (None, out_of_range, repeated, dropped)]
    merged = one_round(merging, global_state, clients)
    assert merged is not None
    assert {r.client: r.reason for r in merging.rejections[1]} == {
        "node 102": "sparse upload of 'layer.bias': an index outside [0, 6)",
        "node 103": "sparse upload of 'head.weight': repeated indices",
        "node 104": "sparse upload lacks 'layer.weight::values'",
    }


# -- the scenario file and the CLI -------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("clients: 3\nrounds: 2\nlocal_step: 5\n", "unknown field 'local_step'; did you mean 'local_steps'?"),
    ("rounds: 0\n", "field 'rounds': Input should be greater than or equal to 1"),
    ("aggregators:\n  - method: tiez\n", "field 'aggregators.0':"),
    ("aggregators:\n  - method: ties\n    parameters: {trim: 0.1}\n", "field 'aggregators.0': aggregator 'ties' has no parameter 'trim'"),
    ("aggregators:\n  - method: ties\n  - method: ties\n", "two aggregators are named 'ties'"),
    ("- 1\n- 2\n", "a scenario must be a mapping"),
    ("clients: 2\nmalicious: {clients: 3}\n", "malicious.clients is 3, more than the 2 clients"),
    ("malicious: {clients: 1, factor: 3}\n", "unknown field 'malicious.factor'"),
    ("upload: {kind: top_k}\n", "field 'upload.kind': Input should be 'dense', 'topk' or 'dare'"),
    ("upload: {kind: topk, density: 0}\n", "field 'upload.density': Input should be greater than 0"),
    ("split: {kind: dirichlet}\n", "field 'split': the dirichlet split needs 'alpha' (e.g. 0.5)"),
    ("split: {kind: skills, alpha: 0.5}\n", "field 'split': 'alpha' applies to the dirichlet split, not 'skills'"),
    ("split: {kind: dirichlet, alpha: 0}\n", "field 'split.alpha': Input should be greater than 0"),
    ("split: {kind: dirichlet, alfa: 1}\n", "unknown field 'split.alfa'; did you mean 'alpha'?"),
    ("split: {kind: iid}\n", "field 'split.kind': Input should be 'skills' or 'dirichlet'"),
])
def test_bad_scenarios_are_one_recipe_error_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "scenario.yml"
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        load_scenario(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_the_cli_reports_a_bad_scenario_in_one_line_and_exits_non_zero(tmp_path):
    path = tmp_path / "scenario.yml"
    path.write_text("clients: 3\nround: 2\n")
    result = run_cli("federated", path, tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: unknown field 'round'; did you mean 'rounds'?"
    assert not (tmp_path / "out").exists()


def test_the_references_on_flowers_simulation_runtime_are_one_line_before_anything_starts(tmp_path):
    path = tmp_path / "scenario.yml"
    path.write_text("clients: 2\nreferences: true\n")
    result = run_cli("federated", path, tmp_path / "out", "--runtime", "simulation")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {path}: field 'references': the references need every client's data in one "
                                     "process; run them with --runtime local")
    assert not (tmp_path / "out").exists()


def test_without_ray_the_simulation_runtime_is_one_line_naming_the_install(tmp_path):
    import os
    import subprocess
    import sys

    site = tmp_path / "site"  # an interpreter on which `import ray` finds nothing
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    path = tmp_path / "scenario.yml"
    path.write_text("clients: 2\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    result = subprocess.run([sys.executable, "-m", "mergeforge", "federated", str(path), str(tmp_path / "out"),
                             "--runtime", "simulation"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: this needs ray, which is not installed: pip install 'mergeforge[ray]'"


def test_a_flower_run_config_without_a_scenario_and_a_node_without_its_partition_are_named():
    from mergeforge.errors import RecipeError
    from mergeforge.federated.flower_app import node_client, scenario_from

    with pytest.raises(RecipeError, match="^Flower run config: 'scenario' must be the path of a scenario file"):
        scenario_from({"out-dir": "out"})
    scenario = load_scenario({"clients": 2})
    with pytest.raises(RecipeError, match="node config 'partition-id' is 2; s.yml has clients 0 to 1"):
        node_client(scenario, "s.yml", {"partition-id": 2})
    with pytest.raises(RecipeError, match="node config 'partition-id' is None"):
        node_client(scenario, "s.yml", {})
    with pytest.raises(RecipeError, match="the runtime has 3 nodes but s.yml has 2 clients"):
        node_client(scenario, "s.yml", {"partition-id": 0, "num-partitions": 3})


def test_a_skill_the_zoo_lacks_is_named_with_the_file(tiny_zoo_dir, tmp_path):
    path = tmp_path / "scenario.yml"
    path.write_text(f"zoo: {tiny_zoo_dir}\nskills: [count, sorting]\n")
    result = run_cli("federated", path, tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}: field 'skills': the zoo has no skill 'sorting'; skills: ")


def test_with_one_client_the_rounds_are_that_clients_local_training_and_score_the_new_model(tiny_zoo_dir):
    from mergeforge.federated.simulation import build_federation, local_seed, run_aggregator, score

    scenario = load_scenario({"zoo": str(tiny_zoo_dir), "skills": ["count", "sort"], "clients": 1, "examples_per_client": 24,
                              "rounds": 2, "local_steps": 3, "batch_size": 8, "eval_examples": 8})
    federation = build_federation(scenario)
    ((node, client),) = federation.clients.items()
    run = run_aggregator(federation, scenario, scenario.aggregators[0])
    state = federation.base_state
    for server_round in (1, 2):  # what the client does alone: train on from where the last round ended
        state, _ = client.train_from(state, scenario.local_steps, local_seed(scenario, server_round, node))
        alone = score(federation, state, scenario.eval_examples)
        # The answer loss moves with every weight, so a round that trained from a stale model or
        # scored the wrong one would not match.
        assert run["rounds"][server_round]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
        assert run["rounds"][server_round]["accuracy"] == alone["accuracy"]
    assert run["rounds"][2]["loss"] != pytest.approx(run["rounds"][0]["loss"], rel=1e-3)


def test_a_tied_output_head_travels_once_and_is_restored_on_loading():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergeforge.federated.simulation import load_model_state, model_state, tied_names

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert tied_names(model) == {"lm_head.weight"}
    state = model_state(model)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    state = {name: tensor + 1.0 for name, tensor in state.items()}
    load_model_state(model, state)
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="missing"):
        load_model_state(model, {name: t for name, t in state.items() if name != "model.norm.weight"})


def test_a_two_round_simulation_on_the_tiny_zoo_runs_through_the_cli(tiny_zoo_dir, tmp_path):
    path = tmp_path / "scenario.yml"
    path.write_text(f"zoo: {tiny_zoo_dir}\nskills: [count, sort, reverse]\nclients: 3\nskills_per_client: 1\n"
                    "rounds: 2\nlocal_steps: 8\nexamples_per_client: 64\neval_examples: 16\nfraction_train: 0.67\n"
                    "references: true\naggregators:\n  - {method: linear, name: fedavg}\n  - {method: median}\n")
    out = tmp_path / "out"
    result = run_cli("federated", path, out, "--quiet")
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "results.json").read_text())
    assert (out / "accuracy.png").stat().st_size > 0
    assert payload["shards"] == {"node 101": ["count"], "node 102": ["sort"], "node 103": ["reverse"]}
    for label in ("fedavg", "median"):
        run = payload["aggregators"][label]
        assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
        model_bytes = run["rounds"][1]["bytes_down"] / 2  # 2 of the 3 clients sampled per round
        assert all(r["bytes_down"] == r["bytes_up"] == 2 * model_bytes for r in run["rounds"][1:])
        assert run["rounds"][-1]["accuracy"] >= run["rounds"][0]["accuracy"]
    references = payload["references"]
    assert [r["round"] for r in references["centralised"]["rounds"]] == [0, 1, 2]
    assert set(references["one_shot"]["accuracy"]) == {"fedavg", "median"}
    assert "| fedavg |" in result.stdout and "| centralised (same steps) |" in result.stdout


def test_the_example_scenario_and_the_docs_scenario_are_valid():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    example = load_scenario(root / "examples" / "federated_scenario.yml")
    assert [a.label for a in example.aggregators] == ["fedavg", "task_arithmetic", "ties", "median", "trimmed_mean"]
    docs = (root / "docs" / "federated.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(zoo: null.*?)```", docs, flags=re.DOTALL)
    assert block is not None
    import yaml

    assert load_scenario(yaml.safe_load(block.group(1))).clients == 6
