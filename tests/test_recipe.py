"""Recipes: every accepted form, mergekit's fields, the value rules (gradients, filters), and the
fields that are refused instead of ignored."""

from __future__ import annotations

from pathlib import Path

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
    ({**TIES, "tokenizer_source": "union", "tokenizer": {"source": "base"}}, "'tokenizer_source' and 'tokenizer' cannot both be given"),
    ({**TIES, "tokenizer": {"tokens": {"<t>": {"source": {"kind": "zeros"}}}}},
     "field 'tokenizer.tokens.<t>.source.kind': unknown kind 'zeros'; did you mean 'zero'?"),
    ({**TIES, "tokenizer": {"tokens": {"<t>": {"source": "m", "forse": True}}}}, "unknown field 'tokenizer.tokens.<t>.forse'; did you mean 'force'?"),
    ({**TIES, "tokenizer": {"pad_to_multiple_of": 0}}, "field 'tokenizer.pad_to_multiple_of'"),
    ({**TIES, "chat_template": "chatm"}, "chat_template: unknown template 'chatm'; did you mean 'chatml'?"),
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


# -- parameter values: every malformed one gets one line naming the key, the place and the fix --

EXAMPLES = Path(__file__).parent / "mergekit_examples"
SLERP = {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]}
# Words of pydantic's own messages about union branches, which must never reach a user.
PYDANTIC_NOISE = ("Input should", ".bool", ".int", ".float", "FilterEntry", "list[", "union", "validation error", "\n")


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yml") if p.name != "gradient-slerp.yml"))
def test_mergekit_example_recipes_load(name):
    recipe = load_recipe(EXAMPLES / name)
    assert recipe.referenced_models()


def test_gradient_slerp_names_pattern_its_line_and_filter():
    path = EXAMPLES / "gradient-slerp.yml"
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "pattern:" in text)
    assert message.startswith(f"{path}, line {line}: field 'parameters.t[0]': unknown key 'pattern'")
    assert "did you mean 'filter'?" in message
    assert "mergekit would ignore it and apply this entry to every tensor" in message
    fixed = load_recipe(path.read_text().replace("pattern:", "filter:"))
    assert resolve_value(fixed.parameters["t"], "model.layers.9.mlp.up_proj.weight", 0.0) == 1.0


@pytest.mark.parametrize(("where", "value", "expected"), [
    ("parameters", {"t": [{"pattern": "mlp", "value": 1}]}, "field 'parameters.t[0]': unknown key 'pattern'"),
    ("parameters", {"t": [{"filter": "mlp", "valeu": 1}]}, "unknown key 'valeu' in a filter entry; did you mean 'value'?"),
    ("parameters", {"t": [{"fitler": "mlp", "value": 1}]}, "unknown key 'fitler' in a filter entry; did you mean 'filter'?"),
    ("parameters", {"t": {"filter": "mlp", "vale": 1}}, "field 'parameters.t': unknown key 'vale'"),
    ("parameters", {"t": [{"filter": "mlp"}]}, "field 'parameters.t[0]': a filter entry needs a 'value'"),
    ("parameters", {"t": [{"filter": 3, "value": 1}]}, "field 'parameters.t[0].filter': a filter is a substring of tensor names"),
    ("parameters", {"t": [{"filter": "mlp", "value": [0, "x"]}]}, "field 'parameters.t[0].value[1]': expected a number, got 'x'"),
    ("parameters", {"t": [{"filter": "mlp", "value": 1}, 0.5]}, "field 'parameters.t[1]': a filter list holds only {filter, value}"),
    ("parameters", {"t": "half"}, "field 'parameters.t': expected a number, a list of numbers (a gradient over the layers) or"),
    ("parameters", {"t": None}, "field 'parameters.t': expected a number, a list of numbers"),
    ("parameters", {"t": []}, "field 'parameters.t': an empty list"),
    ("parameters", {"t": [0, [1, 2]]}, "field 'parameters.t[1]': expected a number, got a list"),
    ("models", {"weight": [{"filter": "mlp", "value": {"x": 1}}]}, "field 'models[1].parameters.weight[0].value': expected a number"),
    ("slices", {"t": [{"patern": "mlp", "value": 1}]}, "field 'slices[0].parameters.t[0]': unknown key 'patern'"),
    ("sources", {"weight": [{"regex": "mlp", "value": 1}]},
     "field 'slices[0].sources[1].parameters.weight[0]': unknown key 'regex' in a filter entry; did you mean 'filter'?"),
])
def test_malformed_parameter_values_get_one_clear_line(where, value, expected):
    if where == "parameters":
        recipe = {**SLERP, "parameters": value}
    elif where == "models":
        recipe = {**SLERP, "models": [{"model": "a"}, {"model": "b", "parameters": value}]}
    else:
        sources = [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]
        if where == "sources":
            sources[1]["parameters"] = value
        recipe = {"merge_method": "slerp", "base_model": "a",
                  "slices": [{"sources": sources, **({"parameters": value} if where == "slices" else {})}]}
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    message = str(error.value)
    assert message.startswith("recipe: ") and expected in message
    assert not [noise for noise in PYDANTIC_NOISE if noise in message], message


def test_a_parameter_value_error_in_yaml_gives_the_line_of_the_key():
    text = "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t:\n    - value: 1\n      pattern: mlp\n"
    with pytest.raises(RecipeError, match=r"^recipe, line 9: field 'parameters.t\[0\]': unknown key 'pattern'"):
        load_recipe(text)
    with pytest.raises(RecipeError, match=r"^recipe, line 6: unknown field 'slices\[0\].sources\[0\].layer_rnage'"):
        load_recipe("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 1]\n"
                    "        layer_rnage: [0, 1]\n")


def test_values_mergekit_accepts_are_accepted():
    recipe = load_recipe({**SLERP, "parameters": {"t": {"filter": "mlp", "value": [0, 1]}, "x": "0.5", "y": "true"}})
    assert recipe.parameters == {"t": [FilterEntry(filter="mlp", value=[0, 1])], "x": 0.5, "y": True}
    assert load_recipe(recipe.to_yaml()) == recipe
