"""Multi-stage recipes (mergekit-multi's multi-document YAML): a real two-stage merge equals the two
merges done by hand, intermediates are temporary unless kept, and every malformed file is refused
before anything is merged, naming its documents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, run_cli

import mergeforge
from mergeforge.engine.stages import read_stages
from mergeforge.errors import MergeforgeError, RecipeError


def stage_one(family: dict[str, Path]) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(family["ft1"]), "parameters": {"weight": 0.6}},
                                                  {"model": str(family["ft2"]), "parameters": {"weight": 0.4}}]}


def final_stage(family: dict[str, Path], mixed: str) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
            "models": [{"model": mixed, "parameters": {"weight": 0.7}}, {"model": str(family["ft3"]), "parameters": {"weight": 0.5}}]}


def multi_document(*documents: dict) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


@pytest.fixture
def two_stages(llama_family, tmp_path) -> Path:
    # The final merge comes first in the file: stages run in dependency order, not file order.
    path = tmp_path / "multi.yml"
    path.write_text(multi_document(final_stage(llama_family, "mixed"), {"name": "mixed", **stage_one(llama_family)}))
    return path


def test_a_two_stage_merge_equals_the_two_merges_by_hand(llama_family, two_stages, tmp_path):
    result = mergeforge.merge(two_stages, tmp_path / "out", quiet=True)
    assert [stage.method for stage in result.stages] == ["linear"] and result.method == "task_arithmetic"
    assert not list(tmp_path.glob(".out.stages-*")), "the temporary stage folder is deleted"

    mergeforge.merge(stage_one(llama_family), tmp_path / "by-hand-1", quiet=True)
    mergeforge.merge(final_stage(llama_family, str(tmp_path / "by-hand-1")), tmp_path / "by-hand-2", quiet=True)
    merged, by_hand = load_state(tmp_path / "out"), load_state(tmp_path / "by-hand-2")
    assert merged.keys() == by_hand.keys()
    assert all(torch.equal(merged[name], by_hand[name]) for name in merged)


def test_intermediate_dir_keeps_each_stage_and_refuses_to_reuse_it_silently(llama_family, two_stages, tmp_path):
    kept = tmp_path / "stages"
    mergeforge.merge(two_stages, tmp_path / "out", intermediate_dir=kept, quiet=True)
    mergeforge.merge(stage_one(llama_family), tmp_path / "by-hand", quiet=True)
    stage, by_hand = load_state(kept / "mixed"), load_state(tmp_path / "by-hand")
    assert all(torch.equal(stage[name], by_hand[name]) for name in by_hand)
    with pytest.raises(MergeforgeError, match=r"stages/mixed: folder exists and is not empty; pass --overwrite"):
        mergeforge.merge(two_stages, tmp_path / "out2", intermediate_dir=kept, quiet=True)
    mergeforge.merge(two_stages, tmp_path / "out", intermediate_dir=kept, overwrite=True, quiet=True)


def test_a_bad_output_folder_is_refused_before_any_stage_runs(two_stages, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(MergeforgeError, match="folder exists and is not empty"):
        mergeforge.merge(two_stages, tmp_path / "full", intermediate_dir=tmp_path / "stages", quiet=True)
    assert not (tmp_path / "stages" / "mixed").exists()


def test_dry_run_lists_the_stages_and_plans_those_it_can(two_stages, tmp_path):
    lines = mergeforge.merge(two_stages, tmp_path / "out", dry_run=True).plan_lines
    assert lines[0] == "stages: document 2 ('mixed') -> document 1 (the final merge)"
    assert "  method: linear" in lines
    assert "  reads mixed: planned when they are merged" in lines
    assert not (tmp_path / "out").exists()


def test_an_unused_stage_is_skipped_with_a_warning(llama_family, tmp_path, caplog):
    path = tmp_path / "multi.yml"
    path.write_text(multi_document({"name": "unused", **stage_one(llama_family)}, stage_one(llama_family)))
    result = mergeforge.merge(path, tmp_path / "out", quiet=True)
    assert result.stages == []
    assert "document 1 ('unused') is not read by the final merge; skipped" in caplog.text


@pytest.mark.parametrize(("documents", "message"), [
    ([{"name": "a", "x": "b"}, {"name": "b", "x": "a"}, {"x": "a"}],
     "the stages read each other in a cycle: document 1 ('a') -> document 2 ('b') -> document 1 ('a')"),
    ([{"name": "a", "x": "a"}, {"x": "a"}], "cycle: document 1 ('a') -> document 1 ('a')"),
    ([{"name": "first-merge", "x": "m"}, {"x": "first-merg"}],
     "document 2 (the final merge) reads model 'first-merg', which is neither a stage nor a folder; did you mean stage 'first-merge'?"),
    ([{"x": "m"}, {"x": "n"}], "documents 1 and 2 both have no 'name'; exactly one document"),
    ([{"name": "a", "x": "m"}, {"name": "a", "x": "n"}, {"x": "a"}], "documents 1 and 2 are both named 'a'"),
    ([{"name": "a", "x": "m"}, {"name": "b", "x": "a"}], "every document has a 'name', so none is the final merge"),
    ([{"name": "../up", "x": "m"}, {"x": "m"}], "document 1: stage name '../up' becomes a folder name"),
    ([{"name": "a", "x": "m"}, {"x": "a", "parameters": {"weight": [{"pattern": "mlp", "value": 1}]}}],
     "multi.yml, document 2, line {line}: field 'parameters.weight[0]': unknown key 'pattern'"),
])
def test_malformed_multi_document_recipes_name_the_document(tmp_path, documents, message):
    def recipe(document: dict) -> dict:
        model = document.pop("x")
        return {**document, "merge_method": "linear", "models": [{"model": model, "parameters": {"weight": 1}}]}

    path = tmp_path / "multi.yml"
    path.write_text(multi_document(*(recipe(dict(d)) for d in documents)))
    # A line number counts from the top of the file, not of the document.
    lines = path.read_text().splitlines()
    message = message.replace("{line}", str(next((i for i, t in enumerate(lines, 1) if "pattern" in t), 0)))
    with pytest.raises(RecipeError) as error:
        read_stages(path)
    assert message in str(error.value) and str(error.value).startswith(str(path))


def test_one_document_is_an_ordinary_recipe(tmp_path):
    single = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n---\n"
    assert read_stages(single) is None and read_stages({"merge_method": "linear"}) is None
    with pytest.raises(RecipeError, match="--intermediate-dir keeps the stages of a multi-document recipe"):
        mergeforge.merge(single, tmp_path / "out", intermediate_dir=tmp_path / "i")
    with pytest.raises(RecipeError, match="plan_merge plans one recipe"):
        mergeforge.plan_merge(single + "name: b\n" + single.removesuffix("---\n"))


def test_the_cli_runs_a_multi_document_recipe(two_stages, tmp_path):
    done = run_cli("merge", two_stages, tmp_path / "out", "--intermediate-dir", tmp_path / "kept")
    assert done.returncode == 0, done.stderr
    assert "stage 1/2: document 2 ('mixed')" in done.stderr and "after 1 intermediate stage(s)" in done.stderr
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "kept" / "mixed" / "config.json").is_file()

    cyclic = tmp_path / "cyclic.yml"
    cyclic.write_text("name: a\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\n"
                      "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    failed = run_cli("merge", cyclic, tmp_path / "never")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [f"error: {cyclic}: the stages read each other in a cycle: "
                                                  "document 1 ('a') -> document 1 ('a')"]


def test_the_docs_example_runs(llama_family, tmp_path):
    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text(encoding="utf-8")
    section = usage[usage.index("### Multi-stage recipes"):]
    example = section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml\n") + 8)]
    (tmp_path / "path" / "to").mkdir(parents=True)
    for name, key in (("base", "base"), ("math-expert", "ft1"), ("code-expert", "ft2"), ("chat-expert", "ft3")):
        (tmp_path / "path" / "to" / name).symlink_to(llama_family[key], target_is_directory=True)
    (tmp_path / "multi.yml").write_text(example)
    result = mergeforge.merge(tmp_path / "multi.yml", tmp_path / "out", quiet=True)
    assert [stage.method for stage in result.stages] == ["linear"] and (tmp_path / "out" / "config.json").is_file()
