"""Reference tests for EMR-merging (Huang et al. 2024, arXiv:2405.17461): τ_uni = sign(Στᵢ) ⊙ the
largest agreeing |τᵢ|; masks Mᵢ = [τᵢ ⊙ τ_uni > 0]; rescalers λᵢ = Σ|τᵢ| / Σ|Mᵢ ⊙ τ_uni|; task i's
model θ_base + λᵢ Mᵢ ⊙ τ_uni. Also `mergeforge emr materialize` end to end through the real CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_state, run_cli
from methods_support import resolve_params, seeded

from mergeforge.methods import get_method, task_masks


def emr_reference(base: np.ndarray, finetunes: list[np.ndarray]):
    deltas = [f - base for f in finetunes]
    sign = np.where(sum(deltas) > 0, 1.0, -1.0)
    masks = [d * sign > 0 for d in deltas]
    unified = sign * np.max([np.abs(d) * m for d, m in zip(deltas, masks)], axis=0)
    rescalers = [np.abs(d).sum() / np.abs(m * unified).sum() for d, m in zip(deltas, masks)]
    return unified, masks, rescalers


def run_emr(finetunes: list[torch.Tensor], base: torch.Tensor):
    method = get_method("emr")
    return method.run(finetunes, base, resolve_params(method, len(finetunes), {}))


@pytest.mark.parametrize("shape", [(7, 6), (13,)])
def test_elect_mask_rescale_match_the_paper(shape):
    base = seeded(*shape, seed=1)
    finetunes = [base + seeded(*shape, seed=2 + i) for i in range(3)]
    merged, side = run_emr(finetunes, base)
    unified, masks, rescalers = emr_reference(base.double().numpy(), [f.double().numpy() for f in finetunes])
    np.testing.assert_allclose(merged.double().numpy(), base.double().numpy() + unified, rtol=1e-5, atol=1e-6)
    packed = side[task_masks.MASKS]
    assert packed.dtype == torch.uint8 and packed.shape == (3, (int(np.prod(shape)) + 7) // 8)
    for index, mask in enumerate(masks):
        assert np.array_equal(task_masks.unpack(packed[index], shape).numpy(), mask)
    np.testing.assert_allclose(side[task_masks.SCALES].numpy(), rescalers, rtol=1e-5)


def test_a_modulated_task_keeps_its_mean_magnitude():
    base = torch.zeros(50)
    finetunes = [seeded(50, seed=10 + i) for i in range(4)]
    merged, side = run_emr(finetunes, base)
    for index, finetune in enumerate(finetunes):
        keep = task_masks.unpack(side[task_masks.MASKS][index], (50,))
        modulated = side[task_masks.SCALES][index] * keep * merged
        torch.testing.assert_close(modulated.abs().sum(), finetune.abs().sum())
        assert bool(((modulated * finetune) >= 0).all())  # never against the task's own sign


def test_runs_are_deterministic():
    base = seeded(9, 9, seed=20)
    finetunes = [base + seeded(9, 9, seed=21 + i) for i in range(3)]
    first, second = run_emr(finetunes, base), run_emr(finetunes, base)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][key], second[1][key]) for key in first[1])


def test_emr_takes_no_parameters(llama_family, tmp_path):
    from mergeforge import merge
    from mergeforge.errors import RecipeError

    recipe = {
        "merge_method": "emr", "base_model": str(llama_family["base"]),
        "models": [{"model": str(llama_family["ft1"])}, {"model": str(llama_family["ft2"])}],
        "parameters": {"density": 0.5},
    }
    with pytest.raises(RecipeError, match="unknown parameter 'density'"):
        merge(recipe, tmp_path / "out", quiet=True)


# ---------------------------------------------------------------- materialize end to end


@pytest.fixture(scope="module")
def emr_merge(llama_family, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("emr")
    recipe = folder / "emr.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "emr",
        "base_model": str(llama_family["base"]),
        "models": [{"model": str(llama_family[name])} for name in ("ft1", "ft2", "ft3")],
        "dtype": "float32",
    }))
    out = folder / "merged"
    result = run_cli("merge", recipe, out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_the_merge_writes_masks_and_rescalers_beside_the_model(emr_merge, llama_family):
    side = load_state(emr_merge / "mergeforge_side")
    merged = load_state(emr_merge)
    base = load_state(llama_family["base"])
    finetunes = [load_state(llama_family[name]) for name in ("ft1", "ft2", "ft3")]
    name = "model.layers.1.mlp.down_proj.weight"
    unified, masks, rescalers = emr_reference(base[name].double().numpy(), [f[name].double().numpy() for f in finetunes])
    np.testing.assert_allclose(merged[name].double().numpy(), base[name].double().numpy() + unified, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(side[f"{name}::task_scales"].numpy(), rescalers, rtol=1e-5)
    assert side[f"{name}::task_masks"].dtype == torch.uint8
    # One bit per entry per task: the side file is about 3/32 of a float32 model for three tasks.
    side_bytes = sum(p.stat().st_size for p in (emr_merge / "mergeforge_side").glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in emr_merge.glob("*.safetensors"))
    assert side_bytes < 0.15 * model_bytes


@pytest.mark.parametrize("task", [0, 2])
def test_materialize_rebuilds_a_task_model_that_transformers_loads(emr_merge, llama_family, tmp_path, task):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"task{task}"
    result = run_cli("emr", "materialize", emr_merge, "--task", str(task), out)
    assert result.returncode == 0, result.stderr
    state = load_state(out)
    base = load_state(llama_family["base"])
    finetune = load_state(llama_family[f"ft{task + 1}"])
    merged = load_state(emr_merge)
    side = load_state(emr_merge / "mergeforge_side")
    for name, tensor in state.items():
        unified = merged[name].double().numpy() - base[name].double().numpy()
        shape = tuple(tensor.shape)
        keep = task_masks.unpack(side[f"{name}::task_masks"][task], shape).numpy()
        scale = float(side[f"{name}::task_scales"][task])
        np.testing.assert_allclose(tensor.double().numpy(), base[name].double().numpy() + scale * keep * unified, rtol=1e-5, atol=1e-6)
    # The task model is closer to its own fine-tune than the unified model is.
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (state[name] - finetune[name]).norm() < (merged[name] - finetune[name]).norm()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model(torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 96)
    assert (out / "tokenizer.json").is_file() and not (out / "mergeforge_side").exists()


def test_materialize_rejects_bad_inputs_with_one_line(emr_merge, llama_family, tmp_path):
    out_of_range = run_cli("emr", "materialize", emr_merge, "--task", "3", tmp_path / "x")
    assert out_of_range.returncode == 2 and "--task 3" in out_of_range.stderr and "0: " in out_of_range.stderr
    not_emr = run_cli("emr", "materialize", llama_family["ft1"], "--task", "0", tmp_path / "y")
    assert not_emr.returncode == 2 and "mergeforge_config.yml" in not_emr.stderr
    wrong_base = run_cli("emr", "materialize", emr_merge, "--task", "0", tmp_path / "z", "--base", tmp_path / "missing")
    assert wrong_base.returncode == 2 and "missing" in wrong_base.stderr
    for result in (out_of_range, not_emr, wrong_base):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


@pytest.mark.slow
def test_materialize_works_for_tall_masks(llama_family, tmp_path):
    recipe = tmp_path / "tall.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "tall_mask",
        "base_model": str(llama_family["base"]),
        "models": [{"model": str(llama_family["ft1"])}, {"model": str(llama_family["ft2"])}],
        "parameters": {"tall_lambda": 0.5},
    }))
    merged = tmp_path / "merged"
    assert run_cli("merge", recipe, merged, "--quiet").returncode == 0
    out = tmp_path / "task1"
    result = run_cli("emr", "materialize", merged, "--task", "1", out)
    assert result.returncode == 0, result.stderr
    base, ft1, ft2 = (load_state(llama_family[n]) for n in ("base", "ft1", "ft2"))
    name = "model.layers.2.mlp.up_proj.weight"
    delta1, delta2 = ft1[name] - base[name], ft2[name] - base[name]
    multi = delta1 + delta2
    keep = delta2.abs() >= 0.5 * (multi - delta2).abs()
    torch.testing.assert_close(load_state(out)[name], base[name] + keep * multi, rtol=1e-5, atol=1e-6)


def test_emr_in_memory_returns_the_unified_model_and_its_side_outputs():
    import torch

    from mergeforge import merge_state_dicts

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 6, generator=generator)}
    models = [{"w": base["w"] + 0.1 * torch.randn(4, 6, generator=generator)} for _ in range(3)]
    side: dict[str, torch.Tensor] = {}
    merged = merge_state_dicts("emr", models, base, side_outputs=side)
    assert set(merged) == {"w"}
    assert {name.split("::")[0] for name in side} == {"w"} and len(side) >= 2
    # Without a dict the side outputs are simply not returned.
    assert torch.equal(merge_state_dicts("emr", models, base)["w"], merged["w"])


def test_task_state_in_memory_equals_materialize_on_disk(tmp_path, llama_family):
    """The in-memory per-task model (what the bench scores) equals what `mergeforge emr materialize` writes."""
    import yaml
    from conftest import load_state
    from safetensors.torch import load_file

    from mergeforge import merge
    from mergeforge.engine.api import merge_state_dicts
    from mergeforge.engine.materialize import materialize_task
    from mergeforge.methods.task_masks import task_state

    base, models = llama_family["base"], [llama_family["ft1"], llama_family["ft2"]]
    recipe = tmp_path / "emr.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "emr", "base_model": str(base), "models": [{"model": str(m)} for m in models],
                                      "dtype": "float32"}))
    merge(recipe, tmp_path / "merged")
    materialize_task(tmp_path / "merged", 1, tmp_path / "task1")
    side: dict = {}
    merged = merge_state_dicts("emr", [load_state(m) for m in models], load_state(base), side_outputs=side)
    in_memory = task_state(merged, load_state(base), side, 1)
    on_disk = load_file(str(tmp_path / "task1" / "model.safetensors"))
    assert set(in_memory) == set(on_disk)
    for name, tensor in on_disk.items():
        torch.testing.assert_close(in_memory[name], tensor, rtol=0, atol=1e-6)
