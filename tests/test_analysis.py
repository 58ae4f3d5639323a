"""``mergeforge analyze`` and ``mergeforge lmc``: task-vector statistics that match a direct
computation, a self-contained report, the loss barrier along real interpolations, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import load_state, run_cli

from mergeforge.analysis.stats import SAR_ENERGY, effective_rank, tensor_sums


@pytest.fixture(scope="module")
def analysis(llama_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "report"
    models = [llama_family[f"ft{i}"] for i in (1, 2, 3)]
    result = run_cli("analyze", "--base", llama_family["base"], *models, "--out", out, "--density", "0.3")
    assert result.returncode == 0, result.stderr
    return json.loads((out / "analysis.json").read_text()), out, result


def test_the_statistics_match_a_direct_computation(llama_family, analysis):
    report, _, _ = analysis
    base = load_state(llama_family["base"])
    models = [load_state(llama_family[f"ft{i}"]) for i in (1, 2, 3)]
    names = [n for n in base if base[n].is_floating_point()]
    flat = [torch.cat([(m[n].double() - base[n].double()).flatten() for n in names]) for m in models]
    base_norm = torch.cat([base[n].double().flatten() for n in names]).norm()
    overall = report["overall"]
    for i in range(3):
        assert overall["relative_norm"][i] == pytest.approx(float(flat[i].norm() / base_norm), rel=1e-6)
        for j in range(3):
            expected = float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()))
            assert overall["cosine"][i][j] == pytest.approx(expected, abs=1e-6)

    # One tensor by hand: TIES sign conflicts at density 0.3, and the spectra.
    name = "model.layers.1.mlp.down_proj.weight"
    row = next(t for t in report["tensors"] if t["name"] == name)
    taus = [m[name].float() - base[name].float() for m in models]
    kept = []
    for tau in taus:  # exactly k entries of largest magnitude, ties kept in order of position
        order = torch.sort(tau.abs().flatten(), descending=True, stable=True).indices[:int(0.3 * tau.numel())]
        mask = torch.zeros(tau.numel(), dtype=torch.bool)
        mask[order] = True
        kept.append(mask.view(tau.shape))
    positive = sum((m & (t > 0)).int() for m, t in zip(kept, taus))
    negative = sum((m & (t < 0)).int() for m, t in zip(kept, taus))
    multi = (positive + negative) >= 2
    assert row["sign_conflict_rate"] == pytest.approx(float(((positive > 0) & (negative > 0)).sum() / multi.sum()))
    total = sum(taus).double()
    u, s, _ = torch.linalg.svd(total, full_matrices=False)
    k = int(((s**2).cumsum(0) < SAR_ENERGY * (s**2).sum()).sum()) + 1
    assert row["spectral"]["sar_rank"] == k
    singular = torch.linalg.svdvals(taus[0].double())
    p = singular / singular.sum()
    assert row["spectral"]["effective_rank"][0] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight"):  # both Gram sides
        row = next(t for t in report["tensors"] if t["name"] == name)
        taus = [(m[name].float() - base[name].float()).double() for m in models]
        u, s, _ = torch.linalg.svd(sum(taus), full_matrices=False)
        k = int(((s**2).cumsum(0) < SAR_ENERGY * (s**2).sum()).sum()) + 1
        assert row["spectral"]["sar_rank"] == k
        for i, tau in enumerate(taus):
            assert row["subspace_alignment"][i] == pytest.approx(float((u[:, :k].T @ tau).norm() / tau.norm()), rel=1e-6)
    layer = next(layer for layer in report["layers"] if layer["layer"] == 1)
    assert 0 < layer["subspace_alignment"][0] <= 1
    # DARE's measured noise is close to its expectation sqrt(p / (1 - p)) ||tau|| / ||base||.
    for expected, measured in zip(overall["dare_noise_expected"], overall["dare_noise_measured"]):
        assert measured == pytest.approx(expected, rel=0.05)


def test_tensor_sums_match_float64_on_a_tensor_of_several_blocks():
    """bf16 inputs across several of the kernels' blocks (1 << 20 entries): the Gram matrix in
    float64, the sign conflicts of exact top-k masks, and DARE's measured noise from the very mask
    and rescale a DARE merge draws."""
    from mergeforge.methods.sparsify import apply_mask, bernoulli_mask, magnitude_mask

    generator = torch.Generator().manual_seed(4)
    base = torch.randn(1100, 2000, generator=generator).bfloat16()
    models = [(base.float() + 0.004 * torch.randn(1100, 2000, generator=generator)).bfloat16() for _ in range(3)]
    sums = tensor_sums(base, models, 0.25, 9)
    taus = [(m.float() - base.float()).flatten() for m in models]
    wide = torch.stack(taus).double()
    exact = wide @ wide.T  # float32 products within spans: within 1e-7 of the squared norms
    assert float((sums.gram - exact).abs().max()) < 1e-7 * float(exact.diagonal().max())
    assert sums.base_sq == pytest.approx(float(base.double().pow(2).sum()), rel=1e-9)
    kept = [magnitude_mask(t, 0.25) for t in taus]
    positive = sum((k & (t > 0)).int() for k, t in zip(kept, taus))
    negative = sum((k & (t < 0)).int() for k, t in zip(kept, taus))
    assert sums.kept_by_two == int(((positive + negative) >= 2).sum())
    assert sums.conflicts == int(((positive > 0) & (negative > 0)).sum())
    for index, tau in enumerate(taus):
        dropped = apply_mask(tau, bernoulli_mask(tau, 0.25, 9 + index), rescale=True)
        assert float(sums.dare_sq[index]) == pytest.approx(float((dropped - tau).double().pow(2).sum()), rel=1e-5)


def test_one_thread_and_several_give_the_same_report(llama_family, analysis):
    """Tensors are shared out over threads; every number is the same on one thread."""
    from mergeforge.analysis.analyze import analyze

    report, _, _ = analysis
    models = [llama_family[f"ft{i}"] for i in (1, 2, 3)]
    single = analyze(llama_family["base"], models, density=0.3, threads=1)
    assert report["workers"] >= 1 and single["workers"] == 1
    for key in ("overall", "layers", "tensors", "skipped"):
        assert single[key] == report[key], key


def test_the_report_is_one_self_contained_page(analysis):
    _, out, result = analysis
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page and "http" not in page
    assert "mean pairwise cosine" in result.stdout and str(out / "report.html") in result.stdout


def test_a_recipe_names_the_models(llama_family, tmp_path):
    recipe = tmp_path / "ties.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(llama_family["base"]),
                                      "models": [{"model": str(llama_family[n]), "parameters": {"weight": 1.0, "density": 0.5}}
                                                 for n in ("ft1", "ft2")]}))
    result = run_cli("analyze", recipe, "--out", tmp_path / "out", "--no-spectral", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert report["models"] == 2 and "spectral" not in report["tensors"][0]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--density", "1.5"], "--density"),
    (["missing-model"], "missing-model"),
])
def test_bad_input_gives_one_message_and_no_output(llama_family, tmp_path, arguments, message):
    models = [a for a in arguments if not a.startswith("-") and a != "1.5"]
    options = [a for a in arguments if a not in models]
    out = tmp_path / "out"
    result = run_cli("analyze", "--base", llama_family["base"], *(models or [llama_family["ft1"]]), *options, "--out", out)
    assert result.returncode != 0 and "Traceback" not in result.stderr and message in result.stderr
    assert not out.exists()


def test_a_recipe_without_a_base_is_refused(llama_family, tmp_path):
    recipe = tmp_path / "linear.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 1.0}}]}))
    result = run_cli("analyze", recipe, "--out", tmp_path / "out")
    assert result.returncode != 0 and "needs a base model" in result.stderr and str(recipe) in result.stderr


@pytest.fixture(scope="module")
def zoo():
    from mergeforge.zoo import build_zoo, load_zoo
    from mergeforge.zoo.build import default_zoo_dir

    build_zoo(None, size="tiny", seed=0)  # cached by content hash, shared with the zoo tests
    return load_zoo(default_zoo_dir("tiny", 0))


@pytest.mark.slow  # several real builds or a curve of evaluations: CI runs it with make test-slow
def test_lmc_curves_and_barriers_match_the_interpolated_models(zoo, tmp_path):
    """Each point of the curve is the evaluator's score of the interpolated model; the barrier is
    the largest excess over the chord; the path through the base starts and ends at the experts."""
    from transformers import AutoModelForCausalLM

    from mergeforge.analysis.lmc import barrier
    from mergeforge.evaluate.api import evaluate_model

    a, b = zoo.expert("shift").path, zoo.expert("sort").path
    out = tmp_path / "lmc"
    result = run_cli("lmc", a, b, "--base", zoo.base.path, "--tasks", "shift,sort", "--points", "3", "--limit", "8", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "lmc.json").read_text())
    linear = report["paths"]["linear"]["curve"]
    assert [row["alpha"] for row in linear] == [0.0, 0.5, 1.0]
    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    other = load_state(b)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(torch.lerp(tensor.float(), other[name].float(), 0.5))
    tasks = [zoo.task_dir("shift"), zoo.task_dir("sort")]
    from transformers import AutoTokenizer

    direct = evaluate_model(model, tasks, max_examples=8, scoring="forced", tokenizer=AutoTokenizer.from_pretrained(a))
    assert linear[1]["loss"] == pytest.approx(sum(t["loss"] for t in direct["tasks"].values()) / 2, rel=1e-4)
    losses = [row["loss"] for row in linear]
    assert report["paths"]["linear"]["loss_barrier"] == pytest.approx(max(0.0, losses[1] - (losses[0] + losses[2]) / 2))
    shift = [row["tasks"]["shift"]["loss"] for row in linear]
    assert report["paths"]["linear"]["tasks"]["shift"]["loss_barrier"] == pytest.approx(max(0.0, shift[1] - (shift[0] + shift[2]) / 2))
    through = report["paths"]["through_base"]["curve"]
    assert len(through) == 5 and through[0]["loss"] == pytest.approx(linear[0]["loss"])
    assert through[-1]["loss"] == pytest.approx(linear[-1]["loss"])
    assert barrier([0, 0.5, 1], [1.0, 0.5, 1.0]) == 0.0 and barrier([0, 0.5, 1], [1.0, 1.5, 1.0]) == 0.5
    assert barrier([0, 0.5, 1], [1.0, 0.5, 1.0], higher_is_better=True) == 0.5
    assert (out / "lmc.png").stat().st_size > 0 and "data:image/png" in (out / "report.html").read_text()


def test_lmc_refuses_models_of_other_shapes(llama_family, model_factory, tmp_path):
    other = model_factory("mistral", "mistral-lmc", seed=4)
    task = tmp_path / "t"
    task.mkdir()
    (task / "spec.json").write_text(json.dumps({"name": "t"}))
    (task / "test.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    result = run_cli("lmc", llama_family["base"], other, "--tasks", task, "--out", tmp_path / "out")
    assert result.returncode != 0 and "Traceback" not in result.stderr and "tensor '" in result.stderr
    assert not (tmp_path / "out").exists()
