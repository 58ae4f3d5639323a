"""The two executors behind ``mergeforge.merge``: the NumPy executor writes exactly the bytes the
torch executor writes, takes the plans it can run and says why it refuses the others, and a merge
it runs never imports torch."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mergeforge
from mergeforge.engine.api import choose_executor, plan_merge
from mergeforge.engine.options import MergeOptions
from mergeforge.methods import kernels
from mergeforge.methods._task_vector_kernels import SAMPLE, TopK, select
from mergeforge.methods.sparsify import topk_mask

# ---------------------------------------------------------------- exact top-k


def test_topk_keeps_exactly_k_with_ties_in_position_order():
    """Exactly k entries, ties kept by position; a block's mask depends only on where it begins, so
    blocks asked for out of order get the same masks. Small arrays and ones past the sampling
    selection's size, with many ties at any threshold; the keys are left unchanged."""
    rng = np.random.default_rng(1)
    for n in (5000, 4 * SAMPLE + 777):
        keys = rng.integers(0, 20, size=n).astype(np.float32)
        before = keys.copy()
        for k in (0, 1, 7, n // 2, n - 1, n):
            order = np.argsort(-keys, kind="stable")  # largest first, earlier position first among equals
            expected = np.zeros(keys.size, dtype=bool)
            expected[order[:k]] = True
            selector = TopK(keys, k)
            starts = list(range(0, n, 333))[::-1]
            blocks = {i: selector.mask(keys[i:i + 333], i) for i in starts}
            np.testing.assert_array_equal(np.concatenate([blocks[i] for i in sorted(blocks)]), expected,
                                          err_msg=f"n={n} k={k}")
        np.testing.assert_array_equal(keys, before)


def test_selection_is_exact_on_large_arrays_of_every_kind():
    """The sampling selection (above 4 x SAMPLE entries) against a sort: distinct values, long runs
    of one value (bf16 task vectors), mostly zeros, and sorted orders that a strided sample would
    misjudge; every position kind, including the ends."""
    rng = np.random.default_rng(3)
    n = 4 * SAMPLE + 12345
    arrays = {
        "distinct": rng.random(n, dtype=np.float32),
        "runs": rng.integers(0, 40, n).astype(np.float32),
        "mostly zero": np.where(rng.random(n) < 0.8, 0, rng.random(n)).astype(np.float32),
        "ascending": np.arange(n, dtype=np.float32),
        "descending": np.arange(n, dtype=np.float32)[::-1].copy(),
        "one value": np.full(n, 7, dtype=np.float32),
    }
    for kind, values in arrays.items():
        bits = values.view(np.uint32)
        ordered = np.sort(bits)
        for position in (0, 1, n // 5, n // 2, 4 * n // 5, n - 2, n - 1):
            assert select(bits.copy(), position) == ordered[position], (kind, position)


def test_topk_mask_is_the_same_on_the_torch_path():
    rng = np.random.default_rng(2)
    values = torch.from_numpy(rng.integers(0, 50, size=(40, 30)).astype(np.float32))
    numpy_path = topk_mask(values, 600)
    torch_path = topk_mask(values.double(), 600)  # float64 takes the torch (GPU) code
    assert int(numpy_path.sum()) == 600
    assert torch.equal(numpy_path, torch_path)


# ---------------------------------------------------------------- same bytes from both executors


@pytest.fixture(scope="module")
def bf16_family(model_factory) -> dict[str, Path]:
    base = model_factory("llama", "fast-base", seed=0, dtype=torch.bfloat16)
    return {"base": base, **{f"ft{i}": model_factory("llama", f"fast-ft{i}", seed=i, base=base, dtype=torch.bfloat16)
                             for i in (1, 2, 3)}}


SLERP_T = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.2]}, {"value": 0.3}]


def task_vector_recipe(family: dict[str, Path], method: str, **parameters) -> dict:
    base, fts = str(family["base"]), [str(family[f"ft{i}"]) for i in (1, 2, 3)]
    return {
        "merge_method": method, "base_model": base,
        "models": [{"model": base}] + [{"model": m, "parameters": {"weight": w, **parameters}} for m, w in zip(fts, (1.0, 0.7, 0.4))],
    }


def recipes(family: dict[str, Path]) -> dict[str, dict]:
    base, fts = str(family["base"]), [str(family[f"ft{i}"]) for i in (1, 2, 3)]
    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (0.5, 0.3, 0.2))]},
        "linear_f32": {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
                       "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (2.0, -1.0, 0.5))],
                       "parameters": {"normalize": False}},
        "task_arithmetic": {**task_vector_recipe(family, "task_arithmetic"), "parameters": {"lambda": 0.8}},
        "ties": {**task_vector_recipe(family, "ties", density=0.4), "dtype": "float32"},
        "ties_gradient": {**task_vector_recipe(family, "ties", density=[0.2, 0.9]), "parameters": {"normalize": False}},
        "dare_ties": task_vector_recipe(family, "dare_ties", density=0.5),
        "dare_linear": task_vector_recipe(family, "dare_linear", density=0.3),
        "breadcrumbs": task_vector_recipe(family, "breadcrumbs", density=0.6, gamma=0.05),
        "breadcrumbs_ties": task_vector_recipe(family, "breadcrumbs_ties", density=0.5),
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": fts[0]}],
                  "parameters": {"t": SLERP_T}, "out_dtype": "float16"},
        "slices": {"merge_method": "linear", "slices": [
            {"sources": [{"model": fts[0], "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                         {"model": fts[1], "layer_range": [2, 4], "parameters": {"weight": 0.7}}]}]},
    }


def assert_same_folders(first: Path, second: Path) -> None:
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        if (first / name).is_file():
            assert filecmp.cmp(first / name, second / name, shallow=False), name


@pytest.mark.parametrize("name", list(recipes({"base": Path("b"), **{f"ft{i}": Path(str(i)) for i in (1, 2, 3)}})))
def test_numpy_executor_writes_the_torch_executors_bytes(bf16_family, tmp_path, monkeypatch, name):
    # Small blocks, so top-k thresholds, DARE's per-block draws and the output writes span many blocks.
    monkeypatch.setattr(kernels, "BLOCK", 256)
    recipe = recipes(bf16_family)[name]
    fast = mergeforge.merge(recipe, tmp_path / "numpy", quiet=True, seed=3, out_shard_size="20KB", executor="numpy")
    full = mergeforge.merge(recipe, tmp_path / "torch", quiet=True, seed=3, out_shard_size="20KB", executor="torch")
    assert (fast.executor, full.executor) == ("numpy", "torch")
    assert_same_folders(tmp_path / "numpy", tmp_path / "torch")
    assert len(list((tmp_path / "numpy").glob("*.safetensors"))) > 1


def test_numpy_executor_float32_models_and_missing_tensors(llama_family, tmp_path):
    from safetensors.torch import load_file, save_file

    base, fts = llama_family["base"], [llama_family[f"ft{i}"] for i in (1, 2)]
    # A fine-tune without its output head: that tensor counts as unchanged from the base.
    partial = tmp_path / "partial"
    partial.mkdir()
    state = load_file(fts[1] / "model.safetensors")
    state.pop("lm_head.weight")
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    (partial / "config.json").write_text((fts[1] / "config.json").read_text())
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in (fts[0], partial)]}
    fast = mergeforge.merge(recipe, tmp_path / "numpy", quiet=True)
    assert fast.executor == "numpy" and any("lacks 1 tensor" in w for w in fast.warnings)
    mergeforge.merge(recipe, tmp_path / "torch", quiet=True, executor="torch")
    assert_same_folders(tmp_path / "numpy", tmp_path / "torch")


# ---------------------------------------------------------------- which executor takes which plan


def executor_of(recipe: dict, **options) -> str:
    plan = plan_merge(recipe)
    try:
        return choose_executor(plan, MergeOptions(**options)).label
    finally:
        plan.close()


def test_the_numpy_executor_refuses_what_it_cannot_run_and_says_why(bf16_family, tmp_path):
    base, ft = str(bf16_family["base"]), str(bf16_family["ft1"])
    from safetensors.torch import load_file

    bin_model = tmp_path / "bin"
    bin_model.mkdir()
    torch.save(load_file(Path(ft) / "model.safetensors"), bin_model / "pytorch_model.bin")
    linear = {"merge_method": "linear", "models": [{"model": ft, "parameters": {"weight": 1}}]}
    assert executor_of(linear) == "numpy"
    assert executor_of(linear, device="cuda") == "torch (--device cuda)"
    assert executor_of(linear, executor="torch") == "torch (--executor torch)"
    assert executor_of({**linear, "dtype": "float64"}) == "torch (computes in float64)"
    assert executor_of({**linear, "dtype": "float16"}) == "torch (dtype F16 rounds the inputs first)"
    assert executor_of({**linear, "dtype": "bfloat16"}) == "numpy"  # the inputs are bf16 already
    assert executor_of({"merge_method": "karcher", "models": [{"model": base}, {"model": ft}]}) == \
        "torch ('karcher' has no NumPy kernel)"
    assert executor_of({"merge_method": "linear", "models": [{"model": str(bin_model), "parameters": {"weight": 1}}]}) == \
        f"torch (model '{bin_model}' is not in safetensors files)"
    # An FP8 base (NumPy has no FP8) sends the plan to torch, even when the fine-tunes are bf16.
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    state = load_file(Path(ft) / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, fp8 / "model.safetensors")
    ties = {"merge_method": "ties", "base_model": str(fp8), "models": [{"model": ft, "parameters": {"weight": 1, "density": 0.5}}]}
    assert executor_of(ties).startswith("torch (tensor '") and executor_of(ties).endswith("' is F8_E4M3)")
    assert mergeforge.merge(ties, tmp_path / "from-fp8", quiet=True).executor == "torch"
    with pytest.raises(mergeforge.MergeforgeError, match="--executor numpy: the NumPy executor cannot run this merge: "
                                                         "'karcher' has no NumPy kernel"):
        mergeforge.merge({"merge_method": "karcher", "models": [{"model": base}, {"model": ft}]}, tmp_path / "out",
                         executor="numpy")
    assert not (tmp_path / "out").exists()


def test_a_user_error_is_reported_whichever_executor_would_run(bf16_family, tmp_path):
    # No fall-back hides an error: the plan is checked once, before an executor is chosen.
    recipe = {"merge_method": "linear", "models": [{"model": str(bf16_family["ft1"]), "parameters": {"wieght": 1}}]}
    for executor in ("auto", "numpy", "torch"):
        with pytest.raises(mergeforge.MergeforgeError, match="unknown parameter 'wieght'"):
            mergeforge.merge(recipe, tmp_path / "out", executor=executor, quiet=True)


def test_a_numpy_merge_never_imports_torch(bf16_family, tmp_path):
    code = (
        "import sys, mergeforge; "
        f"r = mergeforge.merge({task_vector_recipe(bf16_family, 'ties', density=0.5)!r}, {str(tmp_path / 'out')!r}, quiet=True); "
        "print(r.executor, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["numpy", "False"]


def test_dry_run_lists_the_same_plan_for_either_executor(bf16_family):
    recipe = recipes(bf16_family)["ties"]
    fast = mergeforge.merge(recipe, None, dry_run=True)
    full = mergeforge.merge(recipe, None, dry_run=True, executor="torch")
    assert fast.plan_lines[:-2] == full.plan_lines[:-2]
    assert fast.plan_lines[-2:][0] == "executor: numpy" and full.plan_lines[-2] == "executor: torch (--executor torch)"
    assert all(line.startswith("estimated peak memory:") for line in (fast.plan_lines[-1], full.plan_lines[-1]))


# ---------------------------------------------------------------- the two implementations of a method


KERNEL_METHODS = [spec.name for spec in mergeforge.all_methods() if spec.kernel is not None]


@pytest.mark.parametrize("name", KERNEL_METHODS)
def test_a_methods_torch_function_and_numpy_kernel_agree(name):
    from methods_support import resolve_params, seeded

    spec = mergeforge.get_method(name)
    base = seeded(64, 48, seed=1)
    count = 1 if spec.max_models == 1 else 3
    tensors = [base + seeded(64, 48, seed=2 + i, scale=0.1) for i in range(count)]
    overrides = {key: value for key, value in {"density": 0.5, "t": 0.3, "gamma": 0.05}.items() if spec.param(key)}
    if spec.param("weight") is not None:
        overrides["weight"] = [1.0, 0.6, 0.3][:count]
    params = resolve_params(spec, count, overrides)
    with_base = base if spec.base.value != "none" else None
    kernel = spec.run([t.clone() for t in tensors], with_base, params, torch.Generator().manual_seed(5))  # CPU float32: the kernel
    kwargs = spec.arguments(params) | ({"generator": torch.Generator().manual_seed(5)} if spec.random else {})
    direct = spec.fn([t.clone() for t in tensors], with_base, **kwargs)  # the torch code
    torch.testing.assert_close(kernel, direct, rtol=1e-5, atol=1e-6)
    assert not torch.equal(kernel, base)
