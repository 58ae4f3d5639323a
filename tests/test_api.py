"""The public surface: what ``import mergeforge`` offers, the options object, and the in-memory
entry points (merge_state_dicts, merge_tensors) against direct computations."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from methods_support import dare_reference, seeded

import mergeforge

# ---------------------------------------------------------------- the package


def test_every_public_name_resolves_and_the_type_checking_imports_list_the_same_names():
    for name in mergeforge.__all__:
        assert getattr(mergeforge, name) is not None, name
    tree = ast.parse(Path(mergeforge.__file__).read_text())
    typed = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.If)
             for stmt in node.body if isinstance(stmt, ast.ImportFrom) for alias in stmt.names}
    assert typed == set(mergeforge.__all__) - {"__version__"}
    assert mergeforge.__version__ == version("mergeforge")
    assert issubclass(mergeforge.RecipeError, mergeforge.MergeforgeError)
    assert (Path(mergeforge.__file__).parent / "py.typed").is_file()


def test_importing_mergeforge_imports_neither_torch_nor_numpy():
    code = "import sys, mergeforge; print([m for m in ('torch', 'numpy', 'pydantic') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- options


def test_options_take_fields_as_keywords_and_refuse_unknown_ones():
    options = mergeforge.MergeOptions.of(None, {"seed": 3, "out_shard_size": "2GB"})
    assert (options.seed, options.shard_bytes, options.budget_bytes) == (3, 2 * 1000**3, None)
    assert mergeforge.MergeOptions.of(options, {}) is options
    with pytest.raises(TypeError, match="unknown merge option 'sead'"):
        mergeforge.MergeOptions.of(None, {"sead": 3})
    with pytest.raises(mergeforge.MergeforgeError, match="--threads must be at least 1"):
        mergeforge.MergeOptions(threads=0)
    with pytest.raises(mergeforge.MergeforgeError, match="size 'lots'"):
        mergeforge.MergeOptions(memory_budget="lots")
    with pytest.raises(mergeforge.MergeforgeError, match="--executor: unknown executor 'gpu'"):
        mergeforge.MergeOptions(executor="gpu")


# ---------------------------------------------------------------- merge_tensors


def test_merge_tensors_task_arithmetic_and_slerp_against_direct_computation():
    base = seeded(5, 4, seed=1)
    first, second = seeded(5, 4, seed=2), seeded(5, 4, seed=3)
    merged = mergeforge.merge_tensors("task_arithmetic", [first, second], base=base, weight=[0.5, -0.25], **{"lambda": 2.0})
    expected = base.double() + 2.0 * (0.5 * (first.double() - base.double()) - 0.25 * (second.double() - base.double()))
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6)
    # slerp at t: the angle between the flattened tensors is split in the ratio t : 1 - t.
    t = 0.3
    out = mergeforge.merge_tensors("slerp", [first], base=base, t=t)
    a, b = base.double().flatten(), first.double().flatten()
    omega = torch.arccos(torch.dot(a / a.norm(), b / b.norm()))
    expected = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(out.double().flatten(), expected, rtol=1e-5, atol=1e-6)


def test_merge_tensors_computes_in_float32_whatever_the_input_dtype():
    base, first = seeded(4, seed=1).bfloat16(), seeded(4, seed=2).bfloat16()
    out = mergeforge.merge_tensors("linear", [base, first], weight=[1.0, 3.0])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (base.float() + 3 * first.float()) / 4)


def test_merge_tensors_errors_name_the_parameter():
    a, b = seeded(3, seed=1), seeded(3, seed=2)
    with pytest.raises(mergeforge.RecipeError, match="ties: 'weight' has 1 values for 2 tensors"):
        mergeforge.merge_tensors("ties", [a, b], base=a, weight=[1.0])
    with pytest.raises(mergeforge.RecipeError, match="ties: unknown parameter\\(s\\) dnsity"):
        mergeforge.merge_tensors("ties", [a], base=b, weight=1.0, dnsity=0.5)
    with pytest.raises(mergeforge.RecipeError, match="ties needs a base tensor"):
        mergeforge.merge_tensors("ties", [a], weight=1.0)
    with pytest.raises(mergeforge.RecipeError, match="linear model 0: parameter 'weight' is required"):
        mergeforge.merge_tensors("linear", [a])
    with pytest.raises(mergeforge.RecipeError, match="merge_method 'slerp' takes exactly 1 model"):
        mergeforge.merge_tensors("slerp", [a, b], base=a, t=0.5)


# ---------------------------------------------------------------- dare_ties under its seed


def test_dare_ties_values_are_the_direct_computation_under_its_seed():
    base = seeded(16, 8, seed=4)
    finetunes = [base + seeded(16, 8, seed=s, scale=0.1) for s in (5, 6, 7)]
    weights, density, seed = [1.0, 0.6, 0.3], 0.4, 1234
    out = mergeforge.merge_tensors("dare_ties", finetunes, base=base, weight=weights, density=density, seed=seed)
    expected = dare_reference(base, finetunes, weights, density, seed, consensus=True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    # Another seed draws other masks.
    assert not torch.equal(out, mergeforge.merge_tensors("dare_ties", finetunes, base=base, weight=weights, density=density,
                                                         seed=seed + 1))


def test_dare_ties_in_a_merge_uses_each_tensors_own_seed(llama_family, tmp_path):
    from conftest import load_state

    from mergeforge.engine.rules import job_seed

    base, fts = llama_family["base"], [llama_family[f"ft{i}"] for i in (1, 2)]
    recipe = {"merge_method": "dare_ties", "base_model": str(base),
              "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.5}} for m, w in zip(fts, (1.0, 0.5))]}
    mergeforge.merge(recipe, tmp_path / "out", quiet=True, seed=9)
    merged, base_state, states = load_state(tmp_path / "out"), load_state(base), [load_state(m) for m in fts]
    for name, tensor in merged.items():
        expected = dare_reference(base_state[name], [s[name] for s in states], [1.0, 0.5], 0.5, job_seed(9, name), consensus=True)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- merge_state_dicts


def test_merge_state_dicts_follows_recipe_rules_and_keeps_integer_buffers():
    base = {"model.layers.0.w": seeded(4, 3, seed=1), "model.layers.1.w": seeded(4, 3, seed=2), "ids": torch.arange(3)}
    fts = [{k: v + seeded(*v.shape, seed=10 + i, scale=0.1) if v.is_floating_point() else v for k, v in base.items()}
           for i in range(2)]
    merged = mergeforge.merge_state_dicts("task_arithmetic", fts, base, parameters={"lambda": [0.0, 1.0]},
                                          model_parameters=[{"weight": 1.0}, {"weight": 1.0}])
    assert list(merged) == list(base)
    torch.testing.assert_close(merged["model.layers.0.w"], base["model.layers.0.w"])  # λ = 0 at the first layer
    expected = base["model.layers.1.w"] + sum(ft["model.layers.1.w"] - base["model.layers.1.w"] for ft in fts)
    torch.testing.assert_close(merged["model.layers.1.w"], expected)
    assert torch.equal(merged["ids"], base["ids"])
    with pytest.raises(mergeforge.RecipeError, match="1 model_parameters for 2 models"):
        mergeforge.merge_state_dicts("linear", fts, model_parameters=[{"weight": 1}])
    np.testing.assert_array_equal(mergeforge.merge_state_dicts("linear", fts[:1], model_parameters=[{"weight": 2.0}],
                                                               parameters={"normalize": False})["ids"].numpy(), [0, 1, 2])
