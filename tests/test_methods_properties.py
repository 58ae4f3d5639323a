"""Properties every registered merge method must have, checked over ``all_methods()`` so that
methods added later (built-in or plugin) are covered without editing this file.

Where a property does not apply to a method, the test is skipped with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from methods_support import resolve_params, run_method, seeded

from mergeforge.errors import RecipeError
from mergeforge.methods import BaseUse, MethodSpec, Param, all_methods

METHODS = all_methods()
IDS = [method.name for method in METHODS]

# Values that make a method's optional machinery do something (masks drop entries, selection
# selects), used where the property should hold for any parameter values.
EXERCISING_VALUES: dict[str, Any] = {"density": 0.5, "select_topk": 0.5}

# Methods that use a base and still average (so N copies of one fine-tune give that fine-tune).
AVERAGING_WITH_BASE = {"ties", "model_stock", "sce", "ram", "ramplus_tl", "nuslerp", "multislerp"}


def model_count(method: MethodSpec, preferred: int = 3) -> int:
    upper = preferred if method.max_models is None else min(preferred, method.max_models)
    return max(method.min_models, upper)


def exercising_overrides(method: MethodSpec) -> dict[str, Any]:
    return {name: value for name, value in EXERCISING_VALUES.items() if method.param(name) is not None}


def finetunes_of(base: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    return [base + seeded(*base.shape, seed=seed + i, scale=0.1) for i in range(count)]


def base_for(method: MethodSpec, base: torch.Tensor) -> torch.Tensor | None:
    return None if method.base is BaseUse.NONE else base


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("shape", [(9,), (6, 5)], ids=["vector", "matrix"])
@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_output_has_the_input_shape_and_dtype_and_is_finite(method: MethodSpec, shape: tuple[int, ...]):
    base = seeded(*shape, seed=1)
    tensors = finetunes_of(base, model_count(method), seed=2)
    out = run_method(method.name, tensors, base_for(method, base), **exercising_overrides(method))
    assert out.shape == base.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_inputs_are_not_modified_even_when_the_base_is_also_an_input(method: MethodSpec):
    # The engine passes the base tensor object itself for a model that lacks a tensor.
    base = seeded(6, 5, seed=3)
    tensors = finetunes_of(base, model_count(method), seed=4)
    if method.base is not BaseUse.NONE and len(tensors) > 1:
        tensors[-1] = base
    snapshots = [tensor.clone() for tensor in tensors]
    base_snapshot = base.clone()
    params = resolve_params(method, len(tensors), exercising_overrides(method))
    generator = torch.Generator().manual_seed(0) if method.random else None
    method.run(tensors, base_for(method, base), params, generator)
    for tensor, snapshot in zip(tensors, snapshots, strict=True):
        assert torch.equal(tensor, snapshot)
    assert torch.equal(base, base_snapshot)


# ---------------------------------------------------------------- fixed points


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_zero_task_vectors_give_the_base_back(method: MethodSpec):
    if method.base is BaseUse.NONE:
        pytest.skip("no base model: covered by the identical-inputs property")
    base = seeded(6, 5, seed=5)
    tensors = [base.clone() for _ in range(model_count(method))]
    out = run_method(method.name, tensors, base, **exercising_overrides(method))
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_identical_inputs_give_that_input_back(method: MethodSpec):
    tensor = seeded(6, 5, seed=6)
    count = model_count(method)
    bases: list[torch.Tensor | None] = []
    if method.base in (BaseUse.NONE, BaseUse.OPTIONAL):
        bases.append(None)
    if method.base is not BaseUse.NONE and method.name in AVERAGING_WITH_BASE:
        bases.append(seeded(6, 5, seed=7))
    if not bases:
        if method.max_models == 1:
            pytest.skip("interpolates between the base and one model, so the base takes part")
        pytest.skip("adds task vectors instead of averaging them, so N equal fine-tunes do not give one back")
    for base in bases:
        out = run_method(method.name, [tensor.clone() for _ in range(count)], base)
        torch.testing.assert_close(out, tensor, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- symmetry


def permutable_overrides(method: MethodSpec, count: int) -> dict[str, Any]:
    overrides = exercising_overrides(method)
    if method.param("weight") is not None:
        overrides["weight"] = [0.5, 1.0, 2.0][:count]
    return overrides


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_order_of_inputs_does_not_matter(method: MethodSpec):
    count = model_count(method)
    if count < 2:
        pytest.skip("takes a single non-base model")
    if method.random:
        pytest.skip("random draws are assigned to inputs by position, so a permutation changes them")
    base = seeded(6, 5, seed=8)
    tensors = finetunes_of(base, count, seed=9)
    overrides = permutable_overrides(method, count)
    forward = run_method(method.name, tensors, base_for(method, base), **overrides)
    order = list(reversed(range(count)))
    permuted = {
        name: [value[i] for i in order] if isinstance(value, list) else value for name, value in overrides.items()
    }
    backward = run_method(method.name, [tensors[i] for i in order], base_for(method, base), **permuted)
    torch.testing.assert_close(backward, forward, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- interpolation endpoints


def test_slerp_endpoints():
    base, other = seeded(4, 3, seed=10), seeded(4, 3, seed=11)
    torch.testing.assert_close(run_method("slerp", [other], base, t=0.0), base)
    torch.testing.assert_close(run_method("slerp", [other], base, t=1.0), other)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_endpoints(flatten: bool, with_base: bool):
    base = seeded(4, 3, seed=12) if with_base else None
    first, second = seeded(4, 3, seed=13), seeded(4, 3, seed=14)
    start = run_method("nuslerp", [first, second], base, weight=[1.0, 0.0], nuslerp_flatten=flatten)
    end = run_method("nuslerp", [first, second], base, weight=[0.0, 1.0], nuslerp_flatten=flatten)
    torch.testing.assert_close(start, first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(end, second, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- randomness


RANDOM_METHODS = [method for method in METHODS if method.random]


@pytest.mark.parametrize("method", RANDOM_METHODS, ids=[method.name for method in RANDOM_METHODS])
def test_a_seed_fixes_the_output_and_the_global_rng_does_not_matter(method: MethodSpec):
    base = seeded(20, 20, seed=15)
    tensors = finetunes_of(base, model_count(method), seed=16)
    overrides = exercising_overrides(method)
    torch.manual_seed(1)
    first = run_method(method.name, tensors, base_for(method, base), seed=42, **overrides)
    torch.manual_seed(2)
    again = run_method(method.name, tensors, base_for(method, base), seed=42, **overrides)
    assert torch.equal(first, again)
    if method.param("density") is not None:
        other_seed = run_method(method.name, tensors, base_for(method, base), seed=43, **overrides)
        assert not torch.equal(first, other_seed)


# ---------------------------------------------------------------- elementwise claim


ELEMENTWISE = [method for method in METHODS if method.elementwise]


@pytest.mark.parametrize("method", ELEMENTWISE, ids=[method.name for method in ELEMENTWISE])
def test_elementwise_methods_give_the_same_result_on_row_blocks(method: MethodSpec):
    # The engine splits large tensors of elementwise methods into row blocks.
    if method.random:
        pytest.skip("the engine reseeds each block, so blocks legitimately differ from one full run")
    base = seeded(8, 6, seed=17)
    tensors = finetunes_of(base, model_count(method), seed=18)
    full = run_method(method.name, tensors, base_for(method, base))
    blocks = [
        run_method(method.name, [t[start:stop] for t in tensors], base_for(method, base[start:stop]))
        for start, stop in ((0, 3), (3, 8))
    ]
    torch.testing.assert_close(torch.cat(blocks), full)


# ---------------------------------------------------------------- parameter validation


PARAMS = [(method, param) for method in METHODS for param in method.params]
PARAM_IDS = [f"{method.name}.{param.name}" for method, param in PARAMS]


@pytest.mark.parametrize(("method", "param"), PARAMS, ids=PARAM_IDS)
def test_defaults_pass_their_own_check(method: MethodSpec, param: Param):
    if param.required:
        pytest.skip("no default")
    assert param.check(param.default, method.name) == param.default


def bad_values(param: Param) -> list[Any]:
    if param.kind == "bool":
        return ["yes", 2, None]
    values: list[Any] = ["abc", None, True, [1.0]]
    if param.kind == "float":
        values.append(math.nan)
    else:
        values.append(1.5)
    if param.low is not None:
        values.append(param.low if param.low_open else param.low - 1e-3 * (1 + abs(param.low)))
    if param.high is not None:
        values.append(param.high if param.high_open else param.high + 1e-3 * (1 + abs(param.high)))
    return values


@pytest.mark.parametrize(("method", "param"), PARAMS, ids=PARAM_IDS)
def test_bad_values_are_rejected_with_a_recipe_error_naming_the_parameter(method: MethodSpec, param: Param):
    where = f"merge_method {method.name}"
    for value in bad_values(param):
        with pytest.raises(RecipeError) as raised:
            param.check(value, where)
        message = str(raised.value)
        assert f"'{param.name}'" in message and where in message and "\n" not in message


@pytest.mark.parametrize(("method", "param"), PARAMS, ids=PARAM_IDS)
def test_range_bounds_that_are_closed_are_accepted(method: MethodSpec, param: Param):
    if param.low is None and param.high is None:
        pytest.skip("unbounded")
    for bound, is_open in ((param.low, param.low_open), (param.high, param.high_open)):
        if bound is not None and not is_open:
            param.check(int(bound) if param.kind == "int" else bound, method.name)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_registration_is_complete(method: MethodSpec):
    assert method.math and method.citation
    assert method.min_models >= 1
    assert method.max_models is None or method.max_models >= method.min_models
    for param in method.params:
        assert param.help, f"{method.name}.{param.name} has no help line"
        assert param.kind in ("float", "int", "bool")
