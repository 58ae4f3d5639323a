"""Recipes: every accepted form, mergekit's fields, the value rules (gradients, filters), and the
fields that are refused instead of ignored."""

from __future__ import annotations

import pytest

from mergeforge.engine.recipe import (
    FilterEntry,
    Recipe,
    interpolate_gradient,
    load_recipe,
    resolve_value,
)
from mergeforge.errors import RecipeError

TIES = {"merge_method": "ties", "base_model": "b", "models": [{"model": "b"}, {"model": "m", "parameters": {"weight": 1}}]}


def test_a_recipe_loads_from_a_dict_a_yaml_string_a_file_and_itself(tmp_path):
    from_dict = load_recipe(TIES)
    text = from_dict.to_yaml()
    (tmp_path / "r.yml").write_text(text)
    assert load_recipe(text) == from_dict == load_recipe(tmp_path / "r.yml") == load_recipe(str(tmp_path / "r.yml"))
    assert load_recipe(from_dict) is from_dict
    assert text.splitlines()[0] == "merge_method: ties"


def test_reference_model_is_the_base_else_the_first_model_or_slice_source():
    assert load_recipe(TIES).reference_model() == "b"
    assert load_recipe({"merge_method": "linear", "models": [{"model": "x"}, {"model": "y"}]}).reference_model() == "x"
    sliced = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "s", "layer_range": [0, 2]}]}]}
    assert load_recipe(sliced).reference_model() == "s"
    assert load_recipe({**TIES, "tokenizer_source": "t"}).referenced_models() == ["b", "m", "t"]


@pytest.mark.parametrize(("recipe", "message"), [
    ({**TIES, "out_dtpye": "bf16"}, "unknown field 'out_dtpye'; did you mean 'out_dtype'?"),
    ({"merge_method": "ties"}, "give exactly one of 'models', 'slices' or 'modules'"),
    ({**TIES, "slices": [{"sources": [{"model": "b", "layer_range": [0, 1]}]}]}, "(got models, slices)"),
    ({"merge_method": "x", "slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}]}, "layer_range must be [start, end)"),
    ({"merge_method": "x", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "c", "layer_range": [0, 2]}]}]},
     "all sources of a slice must span the same number of layers"),
    ({**TIES, "tokenizer_source": "union"}, "'union' (merging vocabularies) is not supported yet"),
    ({**TIES, "tokenizer": {"source": "base"}}, "per-token tokenizer configuration is not supported yet"),
    ({"merge_method": "x", "modules": {"text": {"models": [{"model": "a"}]}}}, "'modules' (multi-module recipes) is not supported yet"),
    ({**TIES, "calibration": {"data": "d.jsonl", "samples": 0}}, "field 'calibration.samples'"),
])
def test_refused_recipes_name_the_field(recipe, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert message in str(error.value)
    assert str(error.value).startswith("recipe: ")


def test_bad_yaml_gives_the_line(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text("merge_method: ties\nmodels: [\n")
    with pytest.raises(RecipeError, match=rf"{path}: not valid YAML \(line 3, column 1\)"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yml")


def test_gradients_interpolate_over_the_layers():
    assert interpolate_gradient([0.0, 1.0], 0.25) == 0.25
    assert interpolate_gradient([0.0, 1.0, 0.0], 0.75) == 0.5
    assert interpolate_gradient([2.0], 0.6) == 2.0
    assert interpolate_gradient([0.0, 1.0], 1.5) == 1.0  # clamped


def test_filters_take_the_first_match_and_fall_back():
    value = [FilterEntry(filter="self_attn", value=0.1), FilterEntry(filter="mlp", value=[0.0, 1.0]), FilterEntry(value=0.7)]
    assert resolve_value(value, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert resolve_value(value, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.5
    assert resolve_value(value, "model.norm.weight", 0.0) == 0.7
    assert resolve_value([FilterEntry(filter="mlp", value=1.0)], "model.norm.weight", 0.0) is None


def test_name_is_kept_for_the_model_card():
    recipe = load_recipe({**TIES, "name": "my-merge"})
    assert isinstance(recipe, Recipe) and recipe.name == "my-merge"
    assert "name: my-merge" in recipe.to_yaml()
