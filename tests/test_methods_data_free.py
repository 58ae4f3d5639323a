"""Every data-free method from the literature (TSV-M, Iso-C/CTS, Consensus/TALL, MagMax, PCB,
WUDI, EMR) runs from a YAML recipe through the real `mergeforge merge` on a tiny Llama, and
transformers loads the result; bad parameter values stop the merge with the engine's one-line
error. Also: the fast spectral route (randomized SVD, Gram-matrix SVD and polar factor) agrees
with full SVDs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, run_cli
from methods_support import run_method, seeded

from mergeforge.errors import RecipeError
from mergeforge.methods import _spectral

METHODS: dict[str, dict] = {
    "tsv": {},
    "iso_c": {"lambda": 1.2},
    "iso_cts": {"common_space_fraction": 0.5},
    "consensus": {"k": 2, "lambda": 0.5},
    "tall_mask": {"tall_lambda": 0.4},
    "magmax": {},
    "pcb": {"density": 0.2},
    "wudi": {"iterations": 50},
    "emr": {},
}


def write_recipe(path: Path, family: dict[str, Path], method: str, parameters: dict) -> Path:
    recipe = {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [{"model": str(family[name])} for name in ("ft1", "ft2", "ft3")],
        "dtype": "float32",
    }
    if parameters:
        recipe["parameters"] = parameters
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow  # nine real CLI merges: about a minute on two cores
@pytest.mark.parametrize("method", list(METHODS))
def test_a_yaml_merge_runs_and_transformers_loads_it(method, llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = run_cli("merge", write_recipe(tmp_path / "r.yml", llama_family, method, METHODS[method]), out, "--quiet")
    assert result.returncode == 0, result.stderr
    merged, base = load_state(out), load_state(llama_family["base"])
    assert set(merged) == set(base)
    moved = [name for name in base if not torch.equal(merged[name], base[name])]
    assert "model.layers.0.mlp.down_proj.weight" in moved and "model.norm.weight" in moved
    assert all(torch.isfinite(tensor).all() for tensor in merged.values())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 7, 3, 9]])).logits).all()
    assert (out / "mergeforge_side").is_dir() == (method in ("emr", "tall_mask"))


@pytest.mark.parametrize(
    ("method", "parameters", "named"),
    [
        ("tsv", {"exact_svd": 3}, "exact_svd"),
        ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
        ("consensus", {"k": -1}, "'k'"),
        ("tall_mask", {"tall_lambda": -0.5}, "tall_lambda"),
        ("magmax", {"lambda": "half"}, "lambda"),
        ("pcb", {"density": 0}, "density"),
        ("wudi", {"iterations": 2.5}, "iterations"),
        ("iso_c", {"common_space_fraction": 0.5}, "common_space_fraction"),
    ],
)
def test_bad_parameters_stop_the_merge_before_writing(method, parameters, named, llama_family, tmp_path):
    from mergeforge import merge

    with pytest.raises(RecipeError, match=named) as raised:
        merge(write_recipe(tmp_path / "r.yml", llama_family, method, parameters), tmp_path / "out", quiet=True)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the fast spectral route


def low_rank_plus_noise(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, rank, generator=generator)).Q
    values = 1 + torch.rand(rank, generator=generator)
    return (left * values) @ right.T + 1e-5 * torch.randn(rows, cols, generator=generator)


def test_randomized_svd_finds_the_top_triplets():
    matrix = low_rank_plus_noise(300, 200, 40, seed=1)
    u, s, vh = _spectral.randomized_svd(matrix, 40)
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(s, exact_s[:40], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((u * s) @ vh, (exact_u[:, :40] * exact_s[:40]) @ exact_vh[:40], rtol=0, atol=1e-4)
    assert torch.equal(_spectral.randomized_svd(matrix, 40)[0], u)  # the sketch seed is fixed


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_gram_svd_and_polar_factor_match_the_exact_ones(shape):
    matrix = seeded(*shape, seed=2)
    u, s, vh = _spectral.gram_svd(matrix)
    exact_u, exact_s, exact_vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(s, exact_s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((u * s) @ vh, matrix, rtol=0, atol=1e-4)
    torch.testing.assert_close(u @ vh, exact_u @ exact_vh, rtol=0, atol=1e-4)
    forced = _spectral.EXACT_MAX_SIDE
    try:
        _spectral.EXACT_MAX_SIDE = 0
        polar = _spectral.orthogonal_polar_factor(matrix, exact=False)
    finally:
        _spectral.EXACT_MAX_SIDE = forced
    torch.testing.assert_close(polar, exact_u @ exact_vh, rtol=0, atol=1e-4)


def common_plus_specific(rows: int, cols: int, tasks: int, seed: int) -> list[torch.Tensor]:
    """Task matrices sharing a strong rank-128 part, each with its own weaker rank-8 part: the
    structure Iso-CTS assumes, with spectral gaps at both of its cut-offs (common 128, 8 per task)."""
    shared = low_rank_plus_noise(rows, cols, 128, seed=seed) * 3
    return [shared / tasks + low_rank_plus_noise(rows, cols, 8, seed=seed + 1 + i) for i in range(tasks)]


@pytest.mark.parametrize(("method", "tolerance"), [("tsv", 1e-3), ("iso_c", 1e-3), ("iso_cts", 1e-3)])
def test_the_fast_route_agrees_with_full_svds(method, tolerance):
    # Where singular values are nearly equal at a cut-off, the exact methods themselves change by as
    # much under rounding noise, so the task matrices here have clear spectral gaps: rank 40 each
    # (TSV keeps exactly 160 / 4 = 40 directions per task; the sum has full rank), or for Iso-CTS
    # a shared part plus task-specific ones.
    base = seeded(160, 240, seed=3)
    if method == "iso_cts":
        deltas = common_plus_specific(160, 240, 4, seed=4)
    else:
        deltas = [low_rank_plus_noise(160, 240, 40, seed=4 + i) for i in range(4)]
    finetunes = [base + 0.01 * delta for delta in deltas]
    exact = run_method(method, finetunes, base, exact_svd=True)
    forced = _spectral.EXACT_MAX_SIDE
    try:
        _spectral.EXACT_MAX_SIDE = 0  # lower the size threshold so a test-sized matrix takes the fast route
        fast = run_method(method, finetunes, base)
        again = run_method(method, finetunes, base)
    finally:
        _spectral.EXACT_MAX_SIDE = forced
    assert torch.equal(fast, again)
    error = float((fast - exact).norm() / (exact - base).norm())
    assert error < tolerance
