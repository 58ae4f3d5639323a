"""``--math-dtype float32|recipe``: float32 math by default; the recipe's 16-bit dtype on request,
as mergekit computes, with the methods whose math cannot be 16-bit kept in float32."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import run_cli

from mergeforge import MergeOptions, merge_state_dicts
from mergeforge.engine.plan import compute_dtype
from mergeforge.errors import MergeforgeError, MethodError


@pytest.mark.parametrize(("math_dtype", "cast", "inputs", "expected"), [
    ("float32", "BF16", {"BF16"}, "F32"),
    ("float32", None, {"BF16"}, "F32"),
    ("float32", "F64", {"F32"}, "F64"),
    ("recipe", "BF16", {"F32"}, "BF16"),
    ("recipe", "F16", {"BF16"}, "F16"),
    ("recipe", None, {"BF16"}, "BF16"),  # no recipe dtype: the inputs' own, as mergekit loads them
    ("recipe", None, {"BF16", "F16"}, "F32"),  # torch's promotion of the two
    ("recipe", None, {"F8_E4M3"}, "F32"),  # no float8 arithmetic
])
def test_the_compute_dtype(math_dtype, cast, inputs, expected):
    assert compute_dtype(math_dtype, cast, inputs) == expected


def test_an_unknown_math_dtype_is_refused():
    with pytest.raises(MergeforgeError, match="--math-dtype: unknown choice 'bf16'; use one of float32, recipe"):
        MergeOptions(math_dtype="bf16")


def family(count: int, shape=(48, 96)) -> list[dict]:
    """A bf16 base state dict, then ``count`` fine-tunes: the base plus small noise."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator) * 0.02
    tuned = [base + torch.randn(shape, generator=generator) * 0.002 for _ in range(count)]
    return [{"w": tensor.to(torch.bfloat16)} for tensor in (base, *tuned)]


def mergekit_arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion in the tensors' own dtype, written from its definition: importance
    |δ|·KL per row, fence median + 1.5·IQR from the sorted importances, base + δ·mask."""
    delta = other - base
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = delta.abs() * (p * (p / q).log()).sum(dim=-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    q1, median, q3 = (ordered[int(fraction * (ordered.numel() - 1))] for fraction in (0.25, 0.5, 0.75))
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + delta * mask  # float32, as mergekit writes it


def test_recipe_math_reproduces_mergekit_arcee_fusion_at_bfloat16_and_float32_math_does_not():
    base, other = family(1)
    expected = mergekit_arcee_fusion(base["w"], other["w"])
    # mergekit writes this method's output in float32 (its mask is float32); --out-dtype float32 gets its bytes.
    exact = merge_state_dicts("arcee_fusion", [other], base, dtype="bfloat16", out_dtype="float32", math_dtype="recipe")["w"]
    assert expected.dtype == torch.float32 and torch.equal(exact, expected)
    rounded = merge_state_dicts("arcee_fusion", [other], base, dtype="bfloat16", math_dtype="recipe")["w"]
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, expected.to(torch.bfloat16))
    float32_math = merge_state_dicts("arcee_fusion", [other], base, dtype="bfloat16")["w"]
    assert not torch.equal(float32_math, rounded)


def test_16_bit_math_changes_ties_but_not_the_float32_methods():
    base, other, third = family(2)
    ties = {"parameters": {"density": 0.5}, "model_parameters": [{"weight": 1.0}, {"weight": 0.5}]}
    both = [merge_state_dicts("ties", [other, third], base, dtype="bfloat16", math_dtype=m, **ties)["w"] for m in ("float32", "recipe")]
    assert not torch.equal(*both)
    # slerp widens to float32 in mergekit too; tsv's SVD has no bf16 kernel on the CPU.
    for method, extra, models in (("slerp", {"parameters": {"t": 0.3}}, [other]), ("tsv", {}, [other, third])):
        float32_math, recipe_math = (merge_state_dicts(method, models, base, dtype="bfloat16", math_dtype=m, **extra)["w"]
                                     for m in ("float32", "recipe"))
        assert torch.equal(float32_math, recipe_math), method


def test_a_method_torch_cannot_run_in_16_bits_says_so(scratch_methods):
    from mergeforge.methods.registry import register_method

    @register_method("no_half", math="-", citation="-")
    def no_half(tensors, base):
        if tensors[0].dtype == torch.bfloat16:
            raise NotImplementedError('"some_kernel" not implemented for \'BFloat16\'')
        return tensors[0]

    _, other = family(1)
    with pytest.raises(MethodError, match=r"merge_method 'no_half' cannot compute tensor 'w' in bfloat16 on cpu "
                                          r"\(\"some_kernel\" not implemented for 'BFloat16'\); use --math-dtype float32"):
        merge_state_dicts("no_half", [other], dtype="bfloat16", math_dtype="recipe")


def test_the_cli_flag_reaches_the_plan(llama_family, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]), "dtype": "bfloat16",
                                      "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 0.5}}]}))
    done = run_cli("merge", recipe, "--dry-run", "--math-dtype", "recipe")
    assert done.returncode == 0, done.stderr
    assert "executor: torch (computes in bfloat16)" in done.stdout
    assert "computes in bfloat16" not in run_cli("merge", recipe, "--dry-run").stdout
