"""Reference tests of the data-aware methods and their statistic collectors.

Expected values come straight from the papers' formulas, computed here by hand:
Fisher merging (arXiv:2111.09832), RegMean (arXiv:2212.09849), AdaMerging (arXiv:2310.02575).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from methods_support import run_method, seeded

from mergeforge.calibration.adamerging import (
    evaluate_entropy,
    learn_coefficients,
    merged_parameters,
    prediction_entropy,
    stack_task_vectors,
)
from mergeforge.calibration.config import CalibrationConfig
from mergeforge.calibration.data import (
    CalibrationError,
    CalibrationExample,
    encode_examples,
    load_examples,
    make_batches,
    read_jsonl,
)
from mergeforge.calibration.fisher import diagonal_fisher
from mergeforge.calibration.gram import linear_input_grams
from mergeforge.errors import MergeforgeError, RecipeError
from mergeforge.methods import get_method


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: a second intra-op thread only adds synchronisation.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_llama(seed: int = 0):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from conftest import save_tokenizer
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------- Fisher merging


def test_fisher_merging_is_the_fisher_weighted_average_with_a_floor():
    thetas = [seeded(5, 4, seed=i) for i in range(3)]
    fishers = [seeded(5, 4, seed=10 + i).abs() for i in range(3)]
    fishers[1][0, 0] = 0.0  # below the floor
    weights = [1.0, 2.0, 0.5]
    floor = 1e-2
    out = run_method("fisher_merging", thetas, None, weight=weights, fisher_floor=floor)  # no statistics
    torch.testing.assert_close(out, sum(w * t for w, t in zip(weights, thetas)) / sum(weights))

    method = get_method("fisher_merging")
    out = method.run(thetas, None, {"weight": weights, "fisher_floor": floor, "statistics": fishers})
    expected = torch.zeros(5, 4)
    for row in range(5):
        for col in range(4):
            floored = [max(float(f[row, col]), floor) for f in fishers]
            numerator = sum(w * f * float(t[row, col]) for w, f, t in zip(weights, floored, thetas))
            expected[row, col] = numerator / sum(w * f for w, f in zip(weights, floored))
    torch.testing.assert_close(out, expected)


def test_fisher_merging_with_equal_fishers_is_the_average():
    thetas = [seeded(6, 3, seed=20 + i) for i in range(3)]
    fisher = seeded(6, 3, seed=30).abs() + 0.1
    out = get_method("fisher_merging").run(thetas, None, {"weight": [1.0] * 3, "fisher_floor": 1e-6, "statistics": [fisher] * 3})
    torch.testing.assert_close(out, (thetas[0] + thetas[1] + thetas[2]) / 3)


def test_fisher_merging_follows_the_model_with_the_larger_fisher():
    thetas = [torch.zeros(4), torch.ones(4)]
    fishers = [torch.tensor([1.0, 1.0, 1e3, 0.0]), torch.tensor([1e3, 1.0, 1.0, 0.0])]
    out = get_method("fisher_merging").run(thetas, None, {"weight": [1.0, 1.0], "fisher_floor": 1e-6, "statistics": fishers})
    torch.testing.assert_close(out, torch.tensor([1e3 / 1001, 0.5, 1 / 1001, 0.5]))


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient(tokenizer):
    model = tiny_llama(seed=1)
    texts = ["hello world", "abc", "merge models"]
    encoded = encode_examples(tokenizer, [CalibrationExample(t) for t in texts], max_length=32)
    fisher = diagonal_fisher(model, encoded, torch.device("cpu"))
    # Reference: transformers' own loss is the mean token cross-entropy; the sequence
    # log-likelihood is minus that times the number of predicted tokens.
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for example in encoded:
        ids = torch.tensor([example.input_ids])
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1)
        loss.backward()
        for name, parameter in model.named_parameters():
            expected[name] += parameter.grad.square() / len(texts)
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-10)


def test_diagonal_fisher_scores_only_the_answer(tokenizer):
    model = tiny_llama(seed=2)
    encoded = encode_examples(tokenizer, [CalibrationExample("rev:abc=", "cba")], max_length=32)
    assert encoded[0].scored == [False] * encoded[0].prompt_length + [True] * (len(encoded[0].input_ids) - encoded[0].prompt_length)
    fisher = diagonal_fisher(model, encoded, torch.device("cpu"))
    ids = torch.tensor([encoded[0].input_ids])
    labels = ids.clone()
    labels[0, : encoded[0].prompt_length] = -100
    model.zero_grad()
    (model(input_ids=ids, labels=labels).loss * int((labels[0, 1:] != -100).sum())).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(fisher[name], parameter.grad.square(), rtol=1e-4, atol=1e-10)


class FullLogitsOnly(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_sequence_log_likelihood_runs_the_head_at_the_answer_and_equals_the_full_logits_one(tokenizer):
    from mergeforge.calibration.fisher import sequence_log_likelihood

    model = tiny_llama(seed=3)
    encoded = encode_examples(tokenizer, [CalibrationExample("rev:abc=", "cba")], max_length=32)[0]
    ids, scored = torch.tensor([encoded.input_ids]), torch.tensor([encoded.scored])
    kept = sequence_log_likelihood(model, ids, scored)
    torch.testing.assert_close(kept, sequence_log_likelihood(FullLogitsOnly(model), ids, scored))
    labels = ids.clone()
    labels[0, : encoded.prompt_length] = -100
    answer_tokens = int((labels[0, 1:] != -100).sum())
    torch.testing.assert_close(kept, -model(input_ids=ids, labels=labels).loss.reshape(1) * answer_tokens)


# ---------------------------------------------------------------- RegMean


def least_squares_merge(inputs: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """argmin_W Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖², solved as one least-squares problem on stacked data."""
    stacked_inputs = torch.cat(inputs).double()
    stacked_targets = torch.cat([x.double() @ w.double().T for x, w in zip(inputs, weights)])
    return torch.linalg.lstsq(stacked_inputs, stacked_targets).solution.T.float()


def test_regmean_with_alpha_one_is_least_squares_on_the_concatenated_inputs():
    inputs = [seeded(40, 6, seed=40 + i) for i in range(3)]
    weights = [seeded(5, 6, seed=50 + i) for i in range(3)]
    grams = [x.double().T @ x.double() for x in inputs]
    out = get_method("regmean").run(weights, None, {"alpha": 1.0, "statistics": grams})
    torch.testing.assert_close(out, least_squares_merge(inputs, weights), rtol=1e-4, atol=1e-4)
    # It is not the plain average: the inputs decide.
    assert not torch.allclose(out, torch.stack(weights).mean(0), atol=1e-3)


def test_regmean_with_alpha_zero_weighs_each_input_feature_by_its_energy():
    inputs = [seeded(30, 4, seed=60 + i) * (i + 1) for i in range(2)]
    weights = [seeded(3, 4, seed=70 + i) for i in range(2)]
    grams = [x.double().T @ x.double() for x in inputs]
    out = get_method("regmean").run(weights, None, {"alpha": 0.0, "statistics": grams})
    energy = [torch.diagonal(g).float() for g in grams]
    expected = (weights[0] * energy[0] + weights[1] * energy[1]) / (energy[0] + energy[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_regmean_shrinks_the_off_diagonal_gram_entries_by_alpha():
    inputs = [seeded(30, 4, seed=80 + i) for i in range(2)]
    weights = [seeded(3, 4, seed=90 + i) for i in range(2)]
    grams = [x.double().T @ x.double() for x in inputs]
    alpha = 0.9
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    expected = torch.linalg.solve(shrunk[0] + shrunk[1], shrunk[0] @ weights[0].double().T + shrunk[1] @ weights[1].double().T).T
    out = get_method("regmean").run(weights, None, {"alpha": alpha, "statistics": grams})
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-5)


def test_regmean_averages_tensors_without_a_gram_matrix():
    vectors = [seeded(7, seed=100 + i) for i in range(3)]
    out = run_method("regmean", vectors, None)
    torch.testing.assert_close(out, torch.stack(vectors).mean(0))


def test_regmean_keeps_never_seen_input_directions_at_the_average():
    # Feature 2 is zero in every input: RegMean leaves its column undetermined; our ridge picks the average.
    inputs = [seeded(20, 3, seed=110 + i) for i in range(2)]
    for x in inputs:
        x[:, 2] = 0
    weights = [seeded(2, 3, seed=120 + i) for i in range(2)]
    grams = [x.double().T @ x.double() for x in inputs]
    out = get_method("regmean").run(weights, None, {"alpha": 1.0, "statistics": grams})
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2], (weights[0][:, 2] + weights[1][:, 2]) / 2, rtol=1e-3, atol=1e-4)


class EmbedThenLinear(torch.nn.Module):
    """input_ids -> embedding -> linear: the Linear's inputs are the embeddings of the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids))


def test_linear_input_grams_sum_over_real_tokens_only():
    torch.manual_seed(0)
    model = EmbedThenLinear()
    batch = make_batches(
        [encoded for encoded in [_encoded([1, 2, 3]), _encoded([4, 5])]], batch_size=2, pad_id=9
    )
    grams = linear_input_grams(model, batch)
    assert set(grams) == {"proj.weight"}
    rows = model.embed.weight.detach()[[1, 2, 3, 4, 5]].double()  # token 9 (padding) excluded
    torch.testing.assert_close(grams["proj.weight"], rows.T @ rows)


def test_linear_input_grams_share_one_matrix_between_layers_fed_the_same_input():
    model = tiny_llama(seed=7)
    batches = make_batches([_encoded([1, 2, 3, 4]), _encoded([5, 6]), _encoded([7, 8, 9])], batch_size=2, pad_id=0)
    grams = linear_input_grams(model, batches)
    layer = "model.layers.1"
    q, k, v = (grams[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv")
    assert q is k is v and grams[f"{layer}.mlp.gate_proj.weight"] is grams[f"{layer}.mlp.up_proj.weight"]
    assert grams[f"{layer}.self_attn.o_proj.weight"] is not q and grams[f"{layer}.mlp.down_proj.weight"] is not q
    # Each shared matrix is the Gram of that layer's own inputs, checked against a hook of our own.
    inputs: dict[str, list[torch.Tensor]] = {"v": [], "up": []}
    handles = [model.model.layers[1].self_attn.v_proj.register_forward_pre_hook(lambda m, a: inputs["v"].append(a[0])),
               model.model.layers[1].mlp.up_proj.register_forward_pre_hook(lambda m, a: inputs["up"].append(a[0]))]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()
    for key, name in (("v", f"{layer}.self_attn.v_proj.weight"), ("up", f"{layer}.mlp.up_proj.weight")):
        rows = torch.cat([x.reshape(-1, x.shape[-1])[b.attention_mask.bool().reshape(-1)] for x, b in zip(inputs[key], batches, strict=True)])
        torch.testing.assert_close(grams[name], rows.double().T @ rows.double())


def _regmean_context(tokenizer, count: int):
    """A calibration context over ``count`` tiny Llamas, each with its own two texts."""
    from mergeforge.calibration.context import CalibrationContext, state_dict_loader

    template = tiny_llama(seed=0)
    states = {f"m{i}": tiny_llama(seed=20 + i).state_dict() for i in range(count)}
    texts = ["merge models", "abc def", "hello world", "streaming", "least squares", "gram", "regress", "xyz"]
    examples = {ref: [CalibrationExample(texts[(2 * i) % 8]), CalibrationExample(texts[(2 * i + 1) % 8])] for i, ref in enumerate(states)}
    names = [name for name, tensor in template.state_dict().items() if tensor.is_floating_point()]
    context = CalibrationContext(input_refs=list(states), base_ref=None, examples=examples, params={}, tensor_names=names,
                                 config=CalibrationConfig(data="unused", batch_size=2), tokenizer=tokenizer,
                                 device=torch.device("cpu"), progress=False, loader=state_dict_loader(template, states))
    return context, states


def test_regmean_statistics_hold_sums_where_smaller_and_give_the_merge_of_every_models_grams(tokenizer):
    from mergeforge.methods.regmean import InputGrams, RegressionSums, collect_grams

    context, states = _regmean_context(tokenizer, count=4)
    statistics = collect_grams(context)
    # Four models of hidden 32, intermediate 64: o_proj (32 -> 32) and down_proj (64 -> 32) keep sums,
    # the q/k/v and gate/up groups (one shared Gram, 64 and 128 outputs) keep each model's Gram.
    layer = "model.layers.2"
    kinds = {name.removeprefix(layer + ".").removesuffix(".weight"): type(stat) for name, stat in statistics.items()
             if name.startswith(layer + ".")}
    assert kinds == {"self_attn.q_proj": InputGrams, "self_attn.k_proj": InputGrams, "self_attn.v_proj": InputGrams,
                     "self_attn.o_proj": RegressionSums, "mlp.gate_proj": InputGrams, "mlp.up_proj": InputGrams,
                     "mlp.down_proj": RegressionSums}
    assert "model.embed_tokens.weight" not in statistics
    # Against the regression from every model's own Grams, computed apart.
    grams = [linear_input_grams(context.load_model(ref), context.batches(ref)) for ref in context.input_refs]
    regmean = get_method("regmean")
    for name in statistics:
        tensors = [state[name] for state in states.values()]
        for alpha in (0.5, 0.9):
            expected = regmean.run(tensors, None, {"alpha": alpha, "statistics": [g[name] for g in grams]})
            out = regmean.run(tensors, None, {"alpha": alpha, "statistics": statistics[name]})
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # Sums keep no model's weights: given other weights, the merge refuses rather than mixing them.
    name = f"{layer}.mlp.down_proj.weight"
    others = [state[name] + 0.01 for state in states.values()]
    with pytest.raises(MergeforgeError, match="regmean: input 0's weight of shape \\[32, 64\\] is not the one its calibration ran"):
        regmean.run(others, None, {"alpha": 0.9, "statistics": statistics[name]})


def test_regmean_with_two_models_keeps_every_models_grams(tokenizer):
    from mergeforge.methods.regmean import InputGrams, collect_grams

    context, _ = _regmean_context(tokenizer, count=2)
    assert {type(stat) for stat in collect_grams(context).values()} == {InputGrams}


def _encoded(ids: list[int]):
    from mergeforge.calibration.data import EncodedExample

    return EncodedExample(ids, [True] * len(ids), len(ids))


# ---------------------------------------------------------------- AdaMerging


def test_prediction_entropy_is_log_vocab_for_uniform_logits_and_zero_for_certain_ones():
    mask = torch.tensor([[1, 1, 0]])
    uniform = torch.zeros(1, 3, 7)
    assert math.isclose(float(prediction_entropy(uniform, mask)), math.log(7), rel_tol=1e-6)
    certain = torch.full((1, 3, 7), -1e4)
    certain[..., 2] = 1e4
    assert float(prediction_entropy(certain, mask)) < 1e-6


def test_adamerging_tensor_merge_is_base_plus_scaled_task_vectors():
    base = seeded(4, 3, seed=130)
    tensors = [seeded(4, 3, seed=131), seeded(4, 3, seed=132)]
    out = get_method("adamerging").run(tensors, base, {"layer_wise": True, "init_lambda": 0.3, "steps": 0, "lr": 1e-3,
                                                       "statistics": [0.2, 0.7]})
    torch.testing.assert_close(out, base + 0.2 * (tensors[0] - base) + 0.7 * (tensors[1] - base))
    out = run_method("adamerging", tensors, base, init_lambda=0.4)  # no statistics: every λ is init_lambda
    torch.testing.assert_close(out, base + 0.4 * (tensors[0] - base) + 0.4 * (tensors[1] - base))


@pytest.mark.parametrize("layer_wise", [True, False], ids=["layer-wise", "task-wise"])
def test_adamerging_lowers_the_entropy_and_keeps_lambda_in_the_unit_interval(tokenizer, layer_wise: bool):
    module = tiny_llama(seed=3)
    base = {name: p.detach().clone() for name, p in module.named_parameters()}
    generator = torch.Generator().manual_seed(4)
    task_vectors = stack_task_vectors([{name: torch.randn(p.shape, generator=generator) * 0.5 for name, p in base.items()}
                                       for _ in range(2)])
    prompts = [CalibrationExample(p) for p in ("rev:abc=", "sort:cab=", "add:12+5=", "hello there", "kv:a1b2;a=")]
    batches = make_batches(encode_examples(tokenizer, prompts, max_length=16), batch_size=5, pad_id=0)
    start = torch.full((len(base) if layer_wise else 1, 2), 0.3)

    initial = evaluate_entropy(module, merged_parameters(base, task_vectors, list(base), start), batches)
    learned = learn_coefficients(module, base, task_vectors, batches, layer_wise=layer_wise, init_lambda=0.3, steps=30, lr=0.05)
    assert learned.coefficients.shape == start.shape
    assert float(learned.coefficients.min()) >= 0.0 and float(learned.coefficients.max()) <= 1.0
    assert learned.entropy[0] == pytest.approx(initial, rel=1e-5)
    assert learned.final_entropy < initial - 1e-3
    assert learned.entropy[-1] < learned.entropy[0]
    assert not torch.allclose(learned.coefficients, start)


def test_adamerging_clamps_lambda_at_the_bounds(tokenizer):
    module = tiny_llama(seed=5)
    base = {name: p.detach().clone() for name, p in module.named_parameters()}
    generator = torch.Generator().manual_seed(6)
    task_vectors = stack_task_vectors([{name: torch.randn(p.shape, generator=generator) for name, p in base.items()}])
    batches = make_batches(encode_examples(tokenizer, [CalibrationExample("abcabc")], max_length=16), batch_size=1, pad_id=0)
    learned = learn_coefficients(module, base, task_vectors, batches, layer_wise=True, steps=15, lr=0.5)
    values = learned.coefficients.flatten()
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    assert bool(((values == 0.0) | (values == 1.0)).any())  # the large steps hit a bound and stayed there


# ---------------------------------------------------------------- calibration data


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_calibration_jsonl_reads_text_and_prompt_answer_records_up_to_samples(tmp_path: Path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"text": "plain"}), "", json.dumps({"prompt": "p", "answer": "a"}),
                                              json.dumps({"prompt": "only"}), json.dumps({"text": "beyond"})])
    assert read_jsonl(path, samples=3) == [CalibrationExample("plain"), CalibrationExample("p", "a"), CalibrationExample("only")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"question": "x"}', "missing field 'text' or 'prompt'"),
        ('{"text": 3}', "field 'text' must be a string"),
        ('{"prompt": "x", "answer": 1}', "field 'answer' must be a string"),
    ],
)
def test_malformed_calibration_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(CalibrationError) as raised:
        read_jsonl(path, samples=10)
    assert f"{path}:2:" in str(raised.value) and message in str(raised.value)
    assert isinstance(raised.value, MergeforgeError)


def test_non_utf8_calibration_file_names_the_line(tmp_path: Path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CalibrationError, match=r"latin1.jsonl:2: not UTF-8"):
        read_jsonl(path, samples=10)


def test_calibration_data_from_a_task_folder_and_per_model_files(tmp_path: Path):
    task = tmp_path / "rev"
    task.mkdir()
    (task / "spec.json").write_text(json.dumps({"name": "rev", "prompt_key": "q", "answer_key": "a"}), encoding="utf-8")
    write_lines(task / "train.jsonl", [json.dumps({"q": f"rev:{w}=", "a": w[::-1]}) for w in ("ab", "cd", "ef")])
    write_lines(tmp_path / "other.jsonl", [json.dumps({"text": "xyz"})])
    config = CalibrationConfig(data={"m1": "rev", "m2": "other.jsonl"}, samples=2)
    examples = load_examples(config, ["m1", "m2"], relative_to=tmp_path)
    assert examples["m1"] == [CalibrationExample("rev:ab=", "ba"), CalibrationExample("rev:cd=", "dc")]
    assert examples["m2"] == [CalibrationExample("xyz")]
    with pytest.raises(RecipeError, match="no data for input model 'm3'"):
        load_examples(config, ["m1", "m2", "m3"], relative_to=tmp_path)
    with pytest.raises(RecipeError, match="'m2' is not an input model"):
        load_examples(config, ["m1"], relative_to=tmp_path)
    with pytest.raises(CalibrationError, match="calibration.data.*'missing.jsonl' not found"):
        load_examples(CalibrationConfig(data="missing.jsonl"), ["m1"], relative_to=tmp_path)


def test_long_examples_keep_their_end_and_prompts_only_drops_answers(tokenizer):
    encoded = encode_examples(tokenizer, [CalibrationExample("abcdefghij", "xyz")], max_length=6)[0]
    prompt_ids = tokenizer("abcdefghij")["input_ids"]
    full = prompt_ids + tokenizer("xyz", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.input_ids == full[-6:]
    assert encoded.scored == [False] * 2 + [True] * 4  # the answer and end-of-sequence are scored
    prompt_only = encode_examples(tokenizer, [CalibrationExample("abc", "xyz")], max_length=16, prompts_only=True)[0]
    assert prompt_only.input_ids == tokenizer("abc")["input_ids"] and all(prompt_only.scored)


def test_regmean_on_a_conv1d_weight_solves_the_regression_in_its_stored_orientation():
    from mergeforge.methods.regmean import InputGrams

    # GPT-2's Conv1D computes y = x W with W stored [in, out]; square, so a wrong orientation cannot hide.
    inputs = [seeded(40, 5, seed=140 + i) for i in range(2)]
    weights = [seeded(5, 5, seed=150 + i) for i in range(2)]
    stacked_targets = torch.cat([x.double() @ w.double() for x, w in zip(inputs, weights)])
    expected = torch.linalg.lstsq(torch.cat(inputs).double(), stacked_targets).solution.float()
    grams = [x.double().T @ x.double() for x in inputs]
    out = get_method("regmean").run(weights, None, {"alpha": 1.0, "statistics": InputGrams(grams, input_dim=0)})
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    linear_out = get_method("regmean").run(weights, None, {"alpha": 1.0, "statistics": InputGrams(grams, input_dim=1)})
    assert not torch.allclose(linear_out, expected, atol=1e-3)


def test_linear_layers_include_gpt2_conv1d_with_their_input_dimension():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from mergeforge.calibration.gram import linear_layers

    gpt2 = linear_layers(AutoModelForCausalLM.from_config(tiny_config("gpt2")))
    assert gpt2["transformer.h.0.attn.c_attn.weight"][1] == 0 and gpt2["transformer.h.0.mlp.c_proj.weight"][1] == 0
    assert gpt2["lm_head.weight"][1] == 1
    llama = linear_layers(tiny_llama())
    assert llama["model.layers.0.self_attn.q_proj.weight"][1] == 1
