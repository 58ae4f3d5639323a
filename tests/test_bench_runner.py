"""The benchmark runner on a hand-built suite whose right answers are known.

Each task's answers are what its expert generates greedily (computed here with transformers'
own ``generate``, not with our evaluator), so every expert scores 100% on its own task by
construction. With two identical experts, every averaging method must give that same model back,
so its scores must equal the expert's; the output ensemble of identical members too.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_model

from mergeforge.bench.report import write_report
from mergeforge.bench.runner import BenchSuite, run_bench
from mergeforge.tasks.folders import TaskSpec, write_task

PROMPTS = [f"q{a}{b}=" for a in "abcdef" for b in "xyz"]


def greedy_answers(folder, prompts: list[str], new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


@pytest.fixture(scope="module")
def twin_suite(tmp_path_factory) -> BenchSuite:
    root = tmp_path_factory.mktemp("bench")
    base = build_model("llama", root / "base", seed=0)
    expert = build_model("llama", root / "expert-a", seed=1, base=base, noise=0.05)
    twin = root / "expert-b"
    shutil.copytree(expert, twin)
    tasks = {}
    for name, prompts in (("a", PROMPTS[:9]), ("b", PROMPTS[9:])):
        answers = greedy_answers(expert, prompts, 3)
        pairs = list(zip(prompts, answers, strict=True))
        tasks[name] = root / "tasks" / name
        write_task(tasks[name], TaskSpec(name=name, max_new_tokens=3), {"train": pairs, "val": pairs, "test": pairs})
    return BenchSuite(base=base, experts={"a": expert, "b": twin}, tasks=tasks)


def test_identical_experts_come_back_from_every_averaging_method(twin_suite, tmp_path):
    result = run_bench(twin_suite, ["linear", "task_arithmetic", "ties", "karcher", "fisher_merging"], curve_methods=["linear"], progress=lambda _: None)
    assert result.experts == {"a": 1.0, "b": 1.0}
    assert result.baselines["output ensemble"] == {"a": 1.0, "b": 1.0}
    by_name = {m.method: m for m in result.methods}
    assert by_name["linear"].test == {"a": 1.0, "b": 1.0}
    assert by_name["karcher"].test == {"a": 1.0, "b": 1.0}
    # Data-aware: the Fisher-weighted mean of identical models is that model, whatever the Fishers.
    assert by_name["fisher_merging"].test == {"a": 1.0, "b": 1.0}
    # Task arithmetic sums both task vectors: λ=0.5 gives the expert back and is in the grid, so the
    # setting chosen on validation (here the same pairs as test) must score 100%.
    assert {"params": {"lambda": 0.5}, "mean": 1.0, "scores": {"a": 1.0, "b": 1.0}} in by_name["task_arithmetic"].validation
    assert by_name["task_arithmetic"].test == {"a": 1.0, "b": 1.0}
    assert len(by_name["ties"].validation) == 9  # 3 λ x 3 densities
    assert result.curve["linear"][0]["normalised"] == 1.0

    paths = write_report(result, tmp_path / "out")
    table = paths["markdown"].read_text()
    assert "| `linear` | 100.0 | 100.0 | 100.0 | 100.0 |" in table
    assert "*output ensemble*" in table
    payload = json.loads(paths["json"].read_text())
    assert {row["name"] for row in payload["ranking"]} >= {"base", "individual experts", "output ensemble", "ties"}
    assert paths["chart"].stat().st_size > 10_000


def test_two_model_and_per_task_methods_run_under_their_own_protocols(twin_suite, tmp_path):
    result = run_bench(twin_suite, ["passthrough", "slerp", "nearswap", "emr", "tall_mask"], curve_methods=["emr"],
                       negation=False, progress=lambda _: None)
    by_name = {m.method: m for m in result.methods}
    assert by_name["passthrough"].status == "skipped"
    # slerp and nearswap blend expert a (in the base's place) with expert b: identical twins give the expert back.
    assert by_name["slerp"].protocol == by_name["nearswap"].protocol == "pairwise"
    assert [v["params"] for v in by_name["slerp"].validation] == [{"t": 0.3}, {"t": 0.5}, {"t": 0.7}]
    assert by_name["slerp"].test == by_name["nearswap"].test == {"a": 1.0, "b": 1.0}
    # EMR on identical task vectors: the unified vector is that vector, every mask is all ones and
    # every rescaler 1, so each task's rebuilt model is the expert.
    assert by_name["emr"].protocol == by_name["tall_mask"].protocol == "per_task"
    assert by_name["emr"].test == {"a": 1.0, "b": 1.0}
    assert by_name["tall_mask"].status == "ok" and len(by_name["tall_mask"].validation) == 3
    assert "emr" not in result.curve  # the curve is for single multi-task models only
    # Multi-model methods are also run on the same pairs, as the reference for the two-model ones.
    reference = {m.method: m for m in result.pairwise_reference}
    assert set(reference) == {"linear", "task_arithmetic", "ties"}
    assert reference["linear"].protocol == "pairwise" and reference["linear"].test == {"a": 1.0, "b": 1.0}

    table = write_report(result, tmp_path / "out")["markdown"].read_text()
    assert "### One model per task" in table and "### Two experts at a time" in table
    assert "| `emr` | 100.0 | 100.0 |" in table and "| `slerp` | 100.0 | 100.0 |" in table
    assert "`passthrough` (skipped)" in table


def test_a_scale_marked_as_final_is_one(tmp_path):
    """Every parameter marked ``scales_result`` (the bench merges once and rescales for it) gives
    the same merge as rescaling the merge at 1: base + s·(merge at 1 − base)."""
    from mergeforge.bench.grids import plan_method
    from mergeforge.engine.api import merge_state_dicts
    from mergeforge.methods.registry import all_methods

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(24, 16, generator=generator), "b": torch.randn(16, generator=generator)}
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(3)]
    checked = []
    for method in all_methods():
        scale = next((p.name for p in method.params if p.scales_result), None)
        if scale is None:
            continue
        plan = plan_method(method, len(models))
        assert plan.rescaled == scale and all(list(point)[-1] == scale for point in plan.grid)  # varied fastest
        weights = [dict(plan.model_fixed)] * len(models)
        params = {k: v for k, v in plan.grid[0].items() if k != scale}
        unit = merge_state_dicts(method.name, models, base, parameters={**params, scale: 1.0}, model_parameters=weights)
        direct = merge_state_dicts(method.name, models, base, parameters={**params, scale: 0.6}, model_parameters=weights)
        for name in base:
            torch.testing.assert_close(direct[name], base[name] + 0.6 * (unit[name] - base[name]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, method=method.name: f"{method}: {m}")
        checked.append(method.name)
    assert {"task_arithmetic", "ties", "dare_ties", "tsv", "iso_cts", "magmax", "pcb"} <= set(checked)


def test_the_ensembles_answer_logits_are_its_forward_pass_at_the_answer(tmp_path):
    """The evaluator's fast path (each member's head at the answer positions only) gives the
    ensemble's full forward pass's logits there: the same scores as the slow path."""
    from transformers import AutoModelForCausalLM

    from mergeforge.bench.ensemble import OutputEnsemble
    from mergeforge.evaluate.scoring import answer_scores

    base = build_model("llama", tmp_path / "base", seed=0)
    members = [AutoModelForCausalLM.from_pretrained(build_model("llama", tmp_path / f"m{i}", seed=i, base=base, noise=0.3),
                                                    dtype=torch.float32).eval() for i in (1, 2)]
    ensemble = OutputEnsemble(members).eval()

    class FullLogitsOnly(torch.nn.Module):  # the ensemble without its answer_logits: the full-logits path
        def __init__(self):
            super().__init__()
            self.inner, self.config = ensemble, ensemble.config

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (n,), generator=generator).tolist() for n in (3, 7, 5, 9)]
    answers = [torch.randint(3, 90, (n,), generator=generator).tolist() for n in (2, 4, 1, 3)]
    with torch.no_grad():
        fast = answer_scores(ensemble, prompts, answers, pad_token_id=0, batch_size=3)
        slow = answer_scores(FullLogitsOnly(), prompts, answers, pad_token_id=0, batch_size=3)
    for a, b in zip(fast, slow, strict=True):
        assert (a.tokens, a.first_miss, a.predicted) == (b.tokens, b.first_miss, b.predicted)
        assert a.nll == pytest.approx(b.nll, rel=1e-5, abs=1e-5)
    assert len({a.nll for a in fast}) == 4  # the examples differ
