"""The torch-free fast path writes exactly the bytes the full path writes, and hands back every
recipe it does not handle exactly; its kernels' pieces (bf16 rounding, exact top-k) are checked
against torch and against a direct computation."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mergeforge
from mergeforge.fastpath import kernels
from mergeforge.fastpath.arrays import bf16_to_f32, f32_to_bf16
from mergeforge.fastpath.methods import FAST_METHODS, REQUIRED
from mergeforge.fastpath.run import try_fast_merge
from mergeforge.methods.registry import get_method
from mergeforge.methods.sparsify import topk_mask

# ---------------------------------------------------------------- conversions


def special_floats() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 1e-40, -1e-40, 1.00390625, 1.01171875]
    halfway = (np.arange(0x3F800000, 0x3F800000 + (1 << 22), 0x10000, dtype=np.uint32) | 0x8000).view(np.float32)
    return np.concatenate([np.array(values, dtype=np.float32), halfway, rng.standard_normal(5000).astype(np.float32),
                           rng.integers(0, 2**32, 5000, dtype=np.uint32).view(np.float32)])


def test_f32_to_bf16_matches_torch_bit_for_bit():
    values = special_floats()
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16(values), expected)


def test_bf16_to_f32_is_exact():
    bits = np.arange(0, 1 << 16, dtype=np.uint32).astype(np.uint16)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_to_f32(bits).view(np.uint32), expected.view(np.uint32))


def test_f32_to_f16_matches_torch_bit_for_bit():
    values = special_floats()
    values = values[~np.isnan(values)]
    expected = torch.from_numpy(values).to(torch.float16).numpy()
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(values.astype(np.float16).view(np.uint16), expected.view(np.uint16))


# ---------------------------------------------------------------- exact top-k


def test_topk_keeps_exactly_k_with_ties_in_position_order():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 20, size=5000).astype(np.float32)  # many ties at any threshold
    for k in (0, 1, 7, 2500, 4999, 5000):
        order = np.argsort(-keys, kind="stable")  # largest first, earlier position first among equals
        expected = np.zeros(keys.size, dtype=bool)
        expected[order[:k]] = True
        selector = kernels.TopK(keys.copy(), k)
        blocks = [selector.mask(keys[i:i + 333]) for i in range(0, keys.size, 333)]
        np.testing.assert_array_equal(np.concatenate(blocks), expected, err_msg=f"k={k}")


def test_topk_mask_is_the_same_on_the_torch_path():
    rng = np.random.default_rng(2)
    values = torch.from_numpy(rng.integers(0, 50, size=(40, 30)).astype(np.float32))
    numpy_path = topk_mask(values, 600)
    torch_path = topk_mask(values.double(), 600)  # float64 takes the torch (GPU) code
    assert int(numpy_path.sum()) == 600
    assert torch.equal(numpy_path, torch_path)


# ---------------------------------------------------------------- the fast path's mirrors


def test_fast_methods_mirror_the_registry():
    for name, fast in FAST_METHODS.items():
        method = get_method(name)
        assert [p.name for p in fast.params] == [p.name for p in method.params], name
        for fast_param, param in zip(fast.params, method.params):
            default = REQUIRED if param.required else param.default
            assert (fast_param.default is REQUIRED) == param.required, (name, param.name)
            if not param.required:
                assert fast_param.default == default, (name, param.name)
            assert (fast_param.per_model, fast_param.kind, fast_param.low, fast_param.high, fast_param.low_open) == (
                param.per_model, param.kind, param.low, param.high, param.low_open), (name, param.name)
            assert not param.high_open
        assert fast.uses_base == (method.base.value == "required"), name
        assert fast.random == method.random and fast.max_models == method.max_models, name


# ---------------------------------------------------------------- same bytes as the full path


@pytest.fixture(scope="module")
def bf16_family(model_factory) -> dict[str, Path]:
    base = model_factory("llama", "fast-base", seed=0, dtype=torch.bfloat16)
    return {"base": base, **{f"ft{i}": model_factory("llama", f"fast-ft{i}", seed=i, base=base, dtype=torch.bfloat16)
                             for i in (1, 2, 3)}}


SLERP_T = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.2]}, {"value": 0.3}]


def recipes(family: dict[str, Path]) -> dict[str, dict]:
    base, fts = str(family["base"]), [str(family[f"ft{i}"]) for i in (1, 2, 3)]
    tv = lambda method, **p: {  # noqa: E731
        "merge_method": method, "base_model": base,
        "models": [{"model": base}] + [{"model": m, "parameters": {"weight": w, **p}} for m, w in zip(fts, (1.0, 0.7, 0.4))],
    }
    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (0.5, 0.3, 0.2))]},
        "linear_f32": {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
                       "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (2.0, -1.0, 0.5))],
                       "parameters": {"normalize": False}},
        "task_arithmetic": {**tv("task_arithmetic"), "parameters": {"lambda": 0.8}},
        "ties": {**tv("ties", density=0.4), "dtype": "float32"},
        "ties_gradient": {**tv("ties", density=[0.2, 0.9]), "parameters": {"normalize": False}},
        "dare_ties": tv("dare_ties", density=0.5),
        "dare_linear": tv("dare_linear", density=0.3),
        "breadcrumbs": tv("breadcrumbs", density=0.6, gamma=0.05),
        "breadcrumbs_ties": tv("breadcrumbs_ties", density=0.5),
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": fts[0]}],
                  "parameters": {"t": SLERP_T}, "out_dtype": "float16"},
    }


def assert_same_folders(first: Path, second: Path) -> None:
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        if (first / name).is_file():
            assert filecmp.cmp(first / name, second / name, shallow=False), name


@pytest.mark.parametrize("name", list(recipes({"base": Path("b"), **{f"ft{i}": Path(str(i)) for i in (1, 2, 3)}})))
def test_fast_path_writes_the_full_paths_bytes(bf16_family, tmp_path, monkeypatch, name):
    # Small blocks, so top-k thresholds, DARE's per-block draws and the output writes span many blocks.
    monkeypatch.setattr(kernels, "BLOCK", 256)
    recipe = recipes(bf16_family)[name]
    fast = try_fast_merge(recipe, tmp_path / "fast", quiet=True, seed=3, out_shard_size="20KB")
    assert fast is not None, "the fast path should take this recipe"
    mergeforge.merge(recipe, tmp_path / "full", quiet=True, seed=3, out_shard_size="20KB")
    assert_same_folders(tmp_path / "fast", tmp_path / "full")
    assert len(list((tmp_path / "fast").glob("*.safetensors"))) > 1


def test_fast_path_float32_models(llama_family, tmp_path):
    base, fts = str(llama_family["base"]), [str(llama_family[f"ft{i}"]) for i in (1, 2, 3)]
    recipe = {"merge_method": "ties", "base_model": base,
              "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in fts]}
    assert try_fast_merge(recipe, tmp_path / "fast", quiet=True) is not None
    mergeforge.merge(recipe, tmp_path / "full", quiet=True)
    assert_same_folders(tmp_path / "fast", tmp_path / "full")


def test_fast_path_hands_back_what_it_does_not_handle(bf16_family, tmp_path):
    base, ft = str(bf16_family["base"]), str(bf16_family["ft1"])
    handed_back = {
        "unknown method": {"merge_method": "karcher", "models": [{"model": base}, {"model": ft}]},
        "misspelled parameter": {"merge_method": "linear", "models": [{"model": ft, "parameters": {"wieght": 1}}]},
        "density out of range": {"merge_method": "ties", "base_model": base,
                                 "models": [{"model": ft, "parameters": {"weight": 1, "density": 1.5}}]},
        "no base": {"merge_method": "ties", "models": [{"model": ft, "parameters": {"weight": 1}}]},
        "slices": {"merge_method": "passthrough", "slices": [{"sources": [{"model": ft, "layer_range": [0, 1]}]}]},
        "float64": {"merge_method": "linear", "dtype": "float64", "models": [{"model": ft, "parameters": {"weight": 1}}]},
        "missing model": {"merge_method": "linear", "models": [{"model": str(tmp_path / "nope"), "parameters": {"weight": 1}}]},
    }
    for why, recipe in handed_back.items():
        assert try_fast_merge(recipe, tmp_path / "out", quiet=True) is None, why
        assert not (tmp_path / "out").exists(), why
    assert try_fast_merge(handed_back["misspelled parameter"], tmp_path / "out", dry_run=True) is None


def test_fast_path_refuses_a_non_empty_output_like_the_full_path(bf16_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    recipe = {"merge_method": "linear", "models": [{"model": str(bf16_family["ft1"]), "parameters": {"weight": 1}}]}
    with pytest.raises(mergeforge.MergeforgeError, match="not empty"):
        try_fast_merge(recipe, out, quiet=True)
    assert (out / "keep.txt").read_text() == "x"


def test_fast_path_modules_import_no_torch():
    code = "import sys, mergeforge.fastpath.run, mergeforge.fastpath.plan; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_kernel_names_match_the_docs_of_the_methods():
    # The fast path's sparsifier names are the ones task_vectors maps its masks to.
    from mergeforge.methods import task_vectors

    assert set(task_vectors._KERNEL_SPARSIFIERS.values()) == {m.sparsify for m in FAST_METHODS.values() if m.sparsify}
    assert re.fullmatch(r"\d+", str(kernels.BLOCK))


def test_dry_run_lists_the_plan_as_the_full_path_does(bf16_family):
    recipe = recipes(bf16_family)["ties"]
    fast = try_fast_merge(recipe, None, dry_run=True)
    full = mergeforge.merge(recipe, None, dry_run=True)
    assert fast is not None and fast.plan_lines[:-1] == full.plan_lines[:-1]
    assert fast.plan_lines[-1].startswith("estimated peak memory:")
    assert 0 < fast.estimated_peak_bytes < full.estimated_peak_bytes
