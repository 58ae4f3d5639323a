"""mergeforge.lora: extraction round trips through PEFT, exact adapter merges, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, run_cli

from mergeforge.engine.api import merge_tensors
from mergeforge.errors import CheckpointError, MergeforgeError, RecipeError
from mergeforge.lora.adapter import pattern_value, read_lora
from mergeforge.lora.extract import REPORT_FILE, ExtractOptions, extract_lora
from mergeforge.lora.factors import RankRule, core_svd, refactor, truncated_svd
from mergeforge.lora.merge import merge_adapters

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def peft_logits(base: Path, adapter: Path, vocab: int | None = None) -> torch.Tensor:
    model = load(base)
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    return logits(peft.PeftModel.from_pretrained(model, adapter).eval())


@pytest.fixture(scope="module")
def base(model_factory) -> Path:
    return model_factory("llama", "lora-base", seed=0)


@pytest.fixture(scope="module")
def finetune(model_factory, base) -> Path:
    """The base plus Gaussian noise on every tensor (norms and embeddings too): full-rank deltas."""
    return model_factory("llama", "lora-ft", seed=1, base=base)


@pytest.fixture(scope="module")
def low_rank_finetune(base, tmp_path_factory) -> Path:
    """The base plus an exactly rank-2 update on every linear layer, nothing else changed."""
    model = load(base)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                out_features, in_features = module.weight.shape
                module.weight.add_(torch.randn(out_features, 2, generator=generator) @ torch.randn(2, in_features, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("lowrank") / "ft"
    model.save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int, **config) -> Path:
    """A real PEFT adapter with random (non-zero) factors."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(load(base), peft.LoraConfig(r=config.pop("r", 4), lora_alpha=config.pop("lora_alpha", 8),
                                                             target_modules=TARGETS, init_lora_weights=False, **config))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> list[Path]:
    """Three adapters of one base: plain, rsLoRA with rank_pattern/alpha_pattern, and rank 8."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(base, root / "a", 1),
        make_adapter(base, root / "b", 2, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
        make_adapter(base, root / "c", 3, r=8, lora_alpha=4),
    ]


def recipe(method: str, folders: list[Path], weights: list[float], **parameters) -> dict:
    return {"merge_method": method, "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(folders, weights)],
            **({"parameters": parameters} if parameters else {})}


# ---------------------------------------------------------------------------------------------
# Factors


def test_rank_rule_energy_and_cap():
    singular = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float((singular**2).sum())
    assert RankRule(energy=0.9).rank(singular, total) == 2  # 13 / 14.25 = 0.91
    assert RankRule(energy=0.9, max_rank=1).rank(singular, total) == 1
    assert RankRule(energy=1.0).rank(singular, total) == 4
    assert RankRule(max_rank=8, sv_epsilon=0.75).rank(singular, total) == 3
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(MergeforgeError, match="--energy"):
            RankRule(energy=bad)


def test_refactor_equals_the_optimal_truncation_of_the_product():
    generator = torch.Generator().manual_seed(0)
    up, down = torch.randn(20, 9, generator=generator), torch.randn(9, 30, generator=generator)
    dense = up @ down
    u, s, vh = core_svd(up, down)
    assert torch.allclose(s.float(), torch.linalg.svdvals(dense)[:9], rtol=1e-4, atol=1e-4)
    factors = refactor(up, down, RankRule(max_rank=3))
    best = truncated_svd(dense, RankRule(max_rank=3))
    assert torch.allclose(factors.up @ factors.down, best.up @ best.down, atol=1e-4)
    assert factors.kept_energy == pytest.approx(best.kept_energy, rel=1e-6)


def test_pattern_value_follows_peft_matching():
    patterns = {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 5}
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 4) == 2
    assert pattern_value(patterns, "model.layers.1.mlp.down_proj", 4) == 5
    assert pattern_value(patterns, "model.layers.11.mlp.down_proj", 4) == 4
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 4) == 4


# ---------------------------------------------------------------------------------------------
# Extraction


def test_full_rank_extraction_round_trips_through_peft(base, finetune, tmp_path):
    out = tmp_path / "adapter"
    result = extract_lora(finetune, base, out, ExtractOptions(max_rank=VOCAB, embed_lora=True))
    kinds = {m.kind for m in result.modules}
    assert kinds == {"lora", "embedding_lora", "modules_to_save"}  # norms changed too: saved whole, not dropped
    assert result.max_error < 1e-5
    report = json.loads((out / REPORT_FILE).read_text())
    assert len(report["modules"]) == len(result.modules) and report["max_relative_error"] == result.max_error
    assert relative(peft_logits(base, out), logits(load(finetune))) < 1e-4


def test_energy_target_recovers_a_low_rank_finetune(base, low_rank_finetune, tmp_path):
    out = tmp_path / "adapter"
    result = extract_lora(low_rank_finetune, base, out, ExtractOptions(energy=0.999))
    assert {m.kind for m in result.modules} == {"lora"}
    assert {m.rank for m in result.modules} == {2}
    assert result.max_error < 1e-5
    assert relative(peft_logits(base, out), logits(load(low_rank_finetune))) < 1e-4


def test_energy_target_bounds_each_module_error(base, finetune, tmp_path):
    result = extract_lora(finetune, base, tmp_path / "adapter", ExtractOptions(energy=0.8, skip_undecomposable=True))
    decomposed = [m for m in result.modules if m.kind == "lora"]
    assert decomposed and all(m.kept_energy >= 0.8 - 1e-6 for m in decomposed)
    # Eckart-Young: the measured error is the discarded share's square root.
    assert all(m.relative_error == pytest.approx((1 - m.kept_energy) ** 0.5, rel=1e-3) for m in decomposed)
    assert any(m.rank < min(m.shape) for m in decomposed)
    skipped = [m for m in result.modules if m.kind == "skipped"]
    assert skipped and all("norm" in m.module for m in skipped)  # listed, never silently dropped
    assert any(m.kind == "modules_to_save" and "embed_tokens" in m.module for m in result.modules)  # no --embed-lora
    lines = "\n".join(result.summary_lines())
    assert "skipped" in lines and "--skip-undecomposable" in lines


def test_randomized_svd_error_is_measured(base, low_rank_finetune, finetune, tmp_path):
    exact = extract_lora(low_rank_finetune, base, tmp_path / "a", ExtractOptions(max_rank=2, randomized=True))
    assert exact.max_error < 1e-4
    noisy = extract_lora(finetune, base, tmp_path / "b", ExtractOptions(max_rank=4, randomized=True, skip_undecomposable=True))
    optimal = extract_lora(finetune, base, tmp_path / "c", ExtractOptions(max_rank=4, skip_undecomposable=True))
    errors = {m.module: m.relative_error for m in optimal.modules}
    # Not optimal, but measured: never below the optimum, and close to it with two power iterations.
    for module in noisy.modules:
        if module.kind == "lora":
            assert errors[module.module] - 1e-6 <= module.relative_error <= errors[module.module] * 1.2


def test_added_tokens_save_the_embeddings_whole(base, tmp_path):
    model = load(base)
    generator = torch.Generator().manual_seed(3)
    model.resize_token_embeddings(VOCAB + 4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    finetune = tmp_path / "ft"
    model.save_pretrained(finetune)
    out = tmp_path / "adapter"
    result = extract_lora(finetune, base, out, ExtractOptions(max_rank=VOCAB, embed_lora=True))
    grown = {m.module: m for m in result.modules if "grew" in m.note}
    assert set(grown) == {"model.embed_tokens", "lm_head"} and all(m.kind == "modules_to_save" for m in grown.values())
    assert f"resize_token_embeddings({VOCAB + 4})" in grown["lm_head"].note
    assert relative(peft_logits(base, out, vocab=VOCAB + 4), logits(model)) < 1e-4


def test_unchanged_biases_stay_the_bases(model_factory, tmp_path):
    base = model_factory("qwen2", "lora-qwen-base", seed=0)
    model = load(base)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.weight"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        model.model.layers[0].self_attn.k_proj.bias.add_(0.1)
    finetune = tmp_path / "ft"
    model.save_pretrained(finetune)
    out = tmp_path / "adapter"
    result = extract_lora(finetune, base, out, ExtractOptions(max_rank=VOCAB))
    kinds = {m.module: m.kind for m in result.modules}
    assert kinds["model.layers.0.self_attn.q_proj"] == "lora"  # its bias did not change
    assert kinds["model.layers.0.self_attn.k_proj"] == "modules_to_save"  # its bias did
    assert relative(peft_logits(base, out), logits(model)) < 1e-4


def test_save_module_and_exclude_regex(base, finetune, tmp_path):
    result = extract_lora(finetune, base, tmp_path / "adapter",
                          ExtractOptions(max_rank=4, save_modules=("lm_head",), exclude_regex=r"layers\.3\."))
    kinds = {m.module: m.kind for m in result.modules}
    assert kinds["lm_head"] == "modules_to_save"
    assert kinds["model.layers.3.self_attn.q_proj"] == "excluded"
    assert kinds["model.layers.2.self_attn.q_proj"] == "lora"


def test_nothing_to_extract_writes_nothing(base, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to extract"):
        extract_lora(base, base, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_extraction_refusals(base, model_factory, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        extract_lora(tmp_path / "missing", base, tmp_path / "out")
    other = model_factory("qwen2", "lora-qwen", seed=0)
    with pytest.raises(CheckpointError, match="tensor '"):
        extract_lora(other, base, tmp_path / "out")
    model = load(base)
    model.model.norm.weight = torch.nn.Parameter(torch.ones(1))
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    mismatched = tmp_path / "mismatched"
    model.save_pretrained(mismatched)
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight': shape \[1\]"):
        extract_lora(mismatched, base, tmp_path / "out")
    with pytest.raises(MergeforgeError, match="--energy"):
        ExtractOptions(energy=1.5)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Merging


def exact_deltas(folders: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [{name: update.delta() for name, update in read_lora(folder).updates.items()} for folder in folders]


def test_linear_merge_is_exact_with_rslora_patterns_and_negative_weights(base, adapters, tmp_path):
    weights = [1.0, -0.5, 0.25]
    out = tmp_path / "merged"
    result = merge_adapters(recipe("task_arithmetic", adapters, weights), out)
    assert {m.path for m in result.modules} == {"concat"} and result.max_discarded == 0
    merged = read_lora(out)
    deltas = exact_deltas(adapters)
    for name, update in merged.updates.items():
        expected = sum(w * d[name] for w, d in zip(weights, deltas))
        assert relative(update.delta(), expected) < 1e-5, name
    # PEFT applies the merged adapter to the same model as adding the exact sum.
    model = load(base)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in merged.updates:
                module.weight.add_(sum(w * d[name] for w, d in zip(weights, deltas)))
    assert relative(peft_logits(base, out), logits(model)) < 1e-5


def test_ties_merge_equals_the_dense_delta_space_merge(adapters, tmp_path):
    out = tmp_path / "merged"
    result = merge_adapters(recipe("ties", adapters, [1.0, 1.0, 0.5], density=0.5), out, rank=64)
    assert {m.path for m in result.modules} == {"dense-svd"} and result.max_discarded < 1e-10
    deltas = exact_deltas(adapters)
    for name, update in read_lora(out).updates.items():
        members = [d[name] for d in deltas]
        expected = merge_tensors("ties", members, base=torch.zeros_like(members[0]), density=0.5, weight=[1.0, 1.0, 0.5])
        assert relative(update.delta(), expected) < 1e-5, name


def test_truncated_linear_merge_is_optimal_and_reports_discarded_energy(adapters, tmp_path):
    result = merge_adapters(recipe("linear", adapters, [1.0, 1.0, 1.0], normalize=False), tmp_path / "merged", rank=3)
    assert {m.path for m in result.modules} == {"qr-svd"} and {m.rank for m in result.modules} == {3}
    deltas = exact_deltas(adapters)
    for module, update in zip(result.modules, read_lora(tmp_path / "merged").updates.values()):
        exact = sum(d[module.module] for d in deltas)
        singular = torch.linalg.svdvals(exact.double())
        assert module.discarded_energy == pytest.approx(float((singular[3:] ** 2).sum() / (singular**2).sum()), rel=1e-4)
        assert relative(update.delta(), exact) == pytest.approx(module.discarded_energy**0.5, rel=1e-3)


def test_knots_with_a_linear_method_is_the_linear_merge(adapters, tmp_path):
    weights = [0.5, 0.3, 0.2]
    merge_adapters(recipe("linear", adapters, weights), tmp_path / "knots", knots=True)
    deltas = exact_deltas(adapters)
    for name, update in read_lora(tmp_path / "knots").updates.items():
        assert relative(update.delta(), sum(w * d[name] for w, d in zip(weights, deltas))) < 1e-5
    result = merge_adapters(recipe("ties", adapters, [1.0] * 3, density=0.5), tmp_path / "knots-ties", knots=True)
    assert {m.path for m in result.modules} == {"knots"}


def test_merge_refusals(base, adapters, model_factory, tmp_path):
    dora = make_adapter(base, tmp_path / "dora", 4, use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        merge_adapters(recipe("linear", [adapters[0], dora], [1, 1]), tmp_path / "out")
    other_base = model_factory("llama", "lora-other-base", seed=5)
    stranger = make_adapter(other_base, tmp_path / "stranger", 5)
    with pytest.raises(CheckpointError, match="only adapters of one base"):
        merge_adapters(recipe("linear", [adapters[0], stranger], [1, 1]), tmp_path / "out")
    with pytest.raises(CheckpointError, match="adapter folder not found"):
        merge_adapters(recipe("linear", [adapters[0], tmp_path / "missing"], [1, 1]), tmp_path / "out")
    with pytest.raises(RecipeError, match="no parameter 'densty'"):
        merge_adapters(recipe("ties", adapters, [1, 1, 1], densty=0.5), tmp_path / "out")
    with pytest.raises(RecipeError, match="calibration"):
        merge_adapters(recipe("fisher_merging", adapters, [1, 1, 1]), tmp_path / "out")
    with pytest.raises(MergeforgeError, match="--energy"):
        merge_adapters(recipe("linear", adapters, [1, 1, 1]), tmp_path / "out", energy=2.0)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_extract_and_merge(base, low_rank_finetune, adapters, tmp_path):
    out = tmp_path / "extracted"
    done = run_cli("lora", "extract", low_rank_finetune, base, out, "--energy", "0.99", "--max-rank", "8")
    assert done.returncode == 0, done.stderr
    assert "relative error max" in done.stdout and (out / "adapter_model.safetensors").is_file()
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: ties\nparameters: {density: 0.5}\nrank: 4\nmodels:\n"
                      + "".join(f"  - model: {folder}\n    parameters: {{weight: 1.0}}\n" for folder in adapters))
    done = run_cli("lora", "merge", config, tmp_path / "merged", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "dense-svd" in done.stdout and "discarded energy" in done.stdout


def test_cli_errors_are_one_line(base, tmp_path):
    done = run_cli("lora", "extract", base, base, tmp_path / "out")
    assert done.returncode == 2 and "nothing to extract" in done.stderr and "Traceback" not in done.stderr, done.stderr
    from click.testing import CliRunner

    from mergeforge.cli import main

    for args, message in [
        (("extract", tmp_path / "missing", base, tmp_path / "out"), "folder not found"),
        (("extract", base, base, tmp_path / "out", "--energy", "0"), "--energy"),
        (("merge", tmp_path / "missing.yml", tmp_path / "out"), "recipe file not found"),
    ]:
        done = CliRunner().invoke(main, ["lora", *map(str, args)])
        assert done.exit_code == 2 and message in done.output and done.exc_info[0] is SystemExit, done.output
    assert not (tmp_path / "out").exists()
