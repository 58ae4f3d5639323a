"""The torch-free planning rules: layer indices, per-tensor seeds, parameter precedence, sizes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mergeforge.engine.rules import (
    count_layers,
    first_value,
    job_seed,
    layer_index,
    parse_size,
    with_layer_index,
)
from mergeforge.errors import RecipeError


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 1000**3), ("500MB", 500 * 1000**2), ("1.5GiB", 3 * 1024**3 // 2),
                                            ("123", 123), (4096, 4096), ("2k", 2000), (" 2 gib ", 2 * 1024**3)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "5XB", "", "-1GB", 0])
def test_bad_sizes_name_the_value(text):
    with pytest.raises(RecipeError, match="size '"):
        parse_size(text)


def test_layer_names():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("lm_head.weight") is None
    assert with_layer_index("model.layers.12.mlp.up_proj.weight", 4) == "model.layers.4.mlp.up_proj.weight"
    assert count_layers(["model.layers.0.a", "model.layers.7.b", "model.norm.weight"]) == 8
    assert count_layers(["lm_head.weight"]) == 0


def test_job_seeds_depend_on_seed_and_name_only():
    assert job_seed(7, "model.layers.0.a") == job_seed(7, "model.layers.0.a")
    assert len({job_seed(7, "model.layers.0.a"), job_seed(8, "model.layers.0.a"), job_seed(7, "model.layers.1.a")}) == 3
    assert 0 <= job_seed(0, "x") < 2**63


def test_first_value_takes_the_most_specific_level_that_applies():
    from mergeforge.engine.recipe import FilterEntry

    model = {"density": [FilterEntry(filter="mlp", value=0.3)]}  # applies to mlp tensors only
    top = {"density": [0.1, 0.9]}  # a gradient over the layers
    assert first_value("density", [model, top], "model.layers.0.mlp.up_proj.weight", 0.5) == 0.3
    assert first_value("density", [model, top], "model.layers.0.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert first_value("weight", [model, top], "x", 0.0) is None


def test_the_rules_import_no_torch():
    code = "import sys, mergeforge.engine.rules; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
