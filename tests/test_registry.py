"""The method registry: torch-free specs, names that cannot be taken twice, schemas that must match
the functions they describe, and the task-vector family as one table."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from methods_support import resolve_params, seeded

from mergeforge.errors import MethodError, RecipeError
from mergeforge.methods import BaseUse, Param, all_methods, get_method, register_method
from mergeforge.methods.task_vectors import KERNEL_SPARSIFIERS, VARIANTS


def test_looking_up_a_method_with_a_kernel_imports_no_torch():
    code = ("import sys; from mergeforge.methods import get_method; "
            "print([get_method(n).kernel is not None for n in ('linear', 'slerp', 'ties', 'dare_ties')], 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[True,", "True,", "True,", "True]", "False"]


def test_every_other_method_is_found_too_and_torch_loads_then():
    code = "import sys; from mergeforge.methods import get_method; print(get_method('karcher').name, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["karcher", "True"]


def test_the_task_vector_family_is_registered_from_its_table():
    for variant in VARIANTS:
        spec = get_method(variant.name)
        assert spec.base is BaseUse.REQUIRED and spec.citation == variant.citation and spec.math == variant.math
        assert spec.random == (variant.sparsify in ("bernoulli", "rank_probability"))
        assert (spec.kernel is not None) == (variant.sparsify in KERNEL_SPARSIFIERS)
        assert spec.param("normalize").default == variant.normalize and spec.param("rescale").default == variant.rescale
        assert [p.name for p in spec.params] == ["weight", "density", *(p.name for p in variant.extra), "lambda",
                                                 "normalize", "rescale", "int8_mask"]


def test_a_taken_name_is_an_error_that_names_the_owner(scratch_methods):
    with pytest.raises(MethodError, match=r"register_method\('ties'\): the name 'ties' is already taken by method 'ties' "
                                          r"\(built-in\); choose another name, or pass replace=True"):
        register_method("ties", math="-", citation="-")(lambda tensors, base: tensors[0])
    assert get_method("ties").plugin is None  # TIES is untouched
    with pytest.raises(MethodError, match="the name 'emr_merging' is already taken by method 'emr'"):
        register_method("my_emr", aliases=["emr_merging"], math="-", citation="-")(lambda tensors, base: tensors[0])


def test_replace_true_replaces_a_method_on_purpose(scratch_methods):
    def first(tensors, base):
        return tensors[0]

    def second(tensors, base):
        return tensors[-1]

    register_method("pick_for_test", math="-", citation="-", max_models=2)(first)
    register_method("pick_for_test", math="-", citation="-", max_models=2, replace=True)(second)
    a, b = seeded(3, seed=1), seeded(3, seed=2)
    assert torch.equal(get_method("pick_for_test").run([a, b], None, {}), b)
    scratch_methods.remove("pick_for_test")
    with pytest.raises(RecipeError, match="unknown method 'pick_for_test'"):
        get_method("pick_for_test")


def test_the_schema_must_match_the_functions_keyword_arguments(scratch_methods):
    with pytest.raises(MethodError, match=r"register_method\('bad_for_test'\): the function takes no keyword argument 'gain'"):
        @register_method("bad_for_test", params=[Param("gain", 1.0)], math="-", citation="-")
        def no_gain(tensors, base, *, scale):
            return tensors[0]
    with pytest.raises(MethodError, match=r"the function's keyword argument 'scale' is not in the schema"):
        @register_method("bad_for_test", params=[Param("gain", 1.0)], math="-", citation="-")
        def extra(tensors, base, *, gain, scale):
            return tensors[0]
    with pytest.raises(MethodError, match="the function takes no keyword argument 'generator'"):
        @register_method("bad_for_test", math="-", citation="-", random=True)
        def no_generator(tensors, base):
            return tensors[0]
    with pytest.raises(RecipeError):
        get_method("bad_for_test")  # nothing was registered

    @register_method("lambda_for_test", params=[Param("lambda", 1.0)], math="-", citation="-")
    def keyword_name(tensors, base, *, lambda_):  # a Python keyword arrives with a trailing underscore
        return tensors[0] * lambda_

    assert torch.equal(get_method("lambda_for_test").run([torch.ones(2)], None, resolve_params(get_method("lambda_for_test"), 1,
                                                                                              {"lambda": 3.0})), torch.full((2,), 3.0))


def test_an_unknown_name_suggests_the_closest():
    with pytest.raises(RecipeError, match="unknown method 'tie'. Did you mean 'ties'"):
        get_method("tie")


def test_every_method_has_a_citation_math_and_sane_counts():
    for spec in all_methods():
        assert spec.math and spec.citation, spec.name
        assert spec.min_models >= 1 and (spec.max_models is None or spec.max_models >= spec.min_models), spec.name
        with pytest.raises(RecipeError, match=f"merge_method '{spec.name}' takes"):
            spec.check_model_count(0, "test")
