"""The plan: one job per output tensor with every parameter resolved, built from header entries and
dtype names only (no torch, no tensor data), and every user error found before anything is read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mergeforge.engine.api import plan_merge
from mergeforge.engine.rules import job_seed
from mergeforge.errors import CheckpointError, RecipeError
from mergeforge.methods.registry import STATISTICS


def ties_recipe(family, **top):
    return {"merge_method": "ties", "base_model": str(family["base"]), "parameters": top, "models": [
        {"model": str(family["base"])},
        {"model": str(family["ft1"]), "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
        {"model": str(family["ft2"]), "parameters": {"weight": 0.5}},
    ]}


def test_jobs_resolve_every_parameter_per_tensor(llama_family):
    with plan_merge(ties_recipe(llama_family, density=0.5, normalize=False), seed=7) as plan:
        assert plan.method.name == "ties" and plan.reference == str(llama_family["base"])
        assert (plan.compute_dtype, plan.cast_dtype) == ("F32", None)
        jobs = {job.output.name: job for job in plan.jobs}
        first, last = jobs["model.layers.0.mlp.up_proj.weight"], jobs["model.layers.3.mlp.up_proj.weight"]
        # A model's own gradient runs over the layers (4 layers: 0.2 at the first, 0.8 at the last);
        # the other model takes the top-level value; defaults fill the rest.
        assert first.params["density"] == [pytest.approx(0.2), 0.5] and last.params["density"] == [pytest.approx(0.8), 0.5]
        assert first.params["weight"] == [1.0, 0.5] and first.params["normalize"] is False and first.params["lambda"] == 1.0
        assert [s.model for s in first.inputs] == [str(llama_family["ft1"]), str(llama_family["ft2"])]
        assert first.base is not None and first.base.model == str(llama_family["base"])
        assert first.output.dtype == "F32" and first.input_dtypes == ["F32", "F32"]
        assert first.seed == job_seed(7, first.output.name)
        assert plan.bytes_to_write == sum(job.output.nbytes for job in plan.jobs)
        assert plan.bytes_to_read == 3 * plan.bytes_to_write
        assert plan.side_tensors() == []


def test_planning_reads_headers_only_and_imports_no_torch(llama_family):
    code = f"import sys, mergeforge; p = mergeforge.plan_merge({ties_recipe(llama_family)!r}); print(len(p.jobs), 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["39", "False"]


def test_with_statistics_gives_a_new_plan_and_leaves_the_old_one(llama_family):
    with plan_merge(ties_recipe(llama_family)) as plan:
        name = plan.jobs[0].output.name
        updated = plan.with_statistics({name: [1.0, 2.0]})
        assert updated.jobs[0].params[STATISTICS] == [1.0, 2.0]
        assert all(job.params[STATISTICS] is None for job in updated.jobs[1:] if job.method)
        assert STATISTICS not in plan.jobs[0].params
        assert updated.checkpoints is plan.checkpoints


def test_slices_renumber_layers_and_take_outer_tensors_from_the_ends(llama_family):
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(llama_family["ft1"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(llama_family["ft2"]), "layer_range": [2, 4]}]},
    ]}
    with plan_merge(recipe) as plan:
        jobs = {job.output.name: job for job in plan.jobs}
        assert [(layer.model, layer.name) for layer in plan.output_layers] == [
            (str(llama_family["ft1"]), "0"), (str(llama_family["ft1"]), "1"), (str(llama_family["ft1"]), "2"),
            (str(llama_family["ft2"]), "2"), (str(llama_family["ft2"]), "3")]
        fourth = jobs["model.layers.4.self_attn.q_proj.weight"]
        assert (fourth.inputs[0].model, fourth.inputs[0].name) == (str(llama_family["ft2"]), "model.layers.3.self_attn.q_proj.weight")
        assert jobs["model.embed_tokens.weight"].inputs[0].model == str(llama_family["ft1"])  # embeddings: the first slice
        assert jobs["lm_head.weight"].inputs[0].model == str(llama_family["ft2"])  # the rest: the last


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r["models"][1]["parameters"].update(densty=0.1), "unknown parameter 'densty' for merge_method 'ties'. Did you mean 'density'?"),
    (lambda r: r["models"][1]["parameters"].update(normalize=True), "'normalize' is a global parameter of 'ties'"),
    (lambda r: r["parameters"].update(density=0), "parameter 'density' = 0 is outside its valid range (0, 1]"),
    (lambda r: r.pop("base_model"), "merge_method 'ties' needs a base_model"),
    (lambda r: r.update(dtype="int4"), "dtype: unknown dtype 'int4'"),
    (lambda r: r["models"][2]["parameters"].pop("weight"), "model '{ft2}', tensor '*': parameter 'weight' is required and not set"),
])
def test_user_errors_are_found_while_planning(llama_family, change, message):
    recipe = ties_recipe(llama_family)
    change(recipe)
    with pytest.raises(RecipeError) as error:
        plan_merge(recipe).close()
    for part in message.format(ft2=llama_family["ft2"]).split("*"):
        assert part in str(error.value)


def test_shape_and_depth_mismatches(llama_family, model_factory):
    other = model_factory("qwen2", "qwen2-other", seed=0)  # 3 layers, tied embeddings (no lm_head)
    recipe = {"merge_method": "linear", "models": [{"model": str(llama_family["ft1"]), "parameters": {"weight": 1}},
                                                   {"model": str(other), "parameters": {"weight": 1}}]}
    with pytest.raises(RecipeError, match="has 3 layers but .* has 4; use slices"):
        plan_merge(recipe).close()
    sliced = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(other), "layer_range": [0, 4]}]}]}
    with pytest.raises(RecipeError, match=r"layer_range \[0, 4\] of model .* goes past its 3 layers"):
        plan_merge(sliced).close()
    mixed = {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(llama_family["ft1"]), "layer_range": [0, 1], "parameters": {"weight": 1}},
        {"model": str(other), "layer_range": [0, 1], "parameters": {"weight": 1}}]}]}
    with pytest.raises(CheckpointError, match="model .*qwen2-other.*: tensor .lm_head.weight. not found"):
        plan_merge(mixed).close()
