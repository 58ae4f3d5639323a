"""``mergeforge analyze``'s recommendation: the shipped predictor names a setting the bench can run,
the fit recovers a known rule, its leave-one-out residuals are the refits', and the report carries it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from conftest import load_state, run_cli

from mergeforge.analysis.recommend import (
    DENSITY,
    FEATURES,
    SETTINGS,
    features,
    fit,
    label,
    load_model,
    recommend,
)


def _overall(experts: int, cosine: float, norm: float, conflicts: float) -> dict:
    return {"relative_norm": [norm] * experts, "mean_pairwise_cosine": cosine, "sign_conflict_rate": conflicts}


def _points(count: int, seed: int = 0) -> list[dict]:
    """Points where task arithmetic at λ = 1 wins with few experts and averaging with many."""
    rng = random.Random(seed)
    points = []
    for _ in range(count):
        overall = _overall(rng.randint(2, 10), rng.uniform(0, 0.3), 10 ** rng.uniform(-3.5, -0.5), rng.uniform(0.3, 0.5))
        k = len(overall["relative_norm"])
        scores = {label(m, p): 0.3 + 0.01 * rng.random() for m, p in SETTINGS}
        scores[label("task_arithmetic", {"lambda": 1.0})] = 1.0 - 0.08 * k + 0.01 * rng.random()
        scores["linear"] = 0.2 + 0.05 * k + 0.01 * rng.random()
        points.append({"features": features(overall), "overall": overall, "scores": scores})
    return points


def test_the_fit_learns_a_rule_that_depends_on_the_number_of_experts():
    model = fit(_points(40))
    few = recommend(_overall(2, 0.1, 1e-3, 0.4), DENSITY, model)
    many = recommend(_overall(10, 0.1, 1e-3, 0.4), DENSITY, model)
    assert few["setting"] == "task_arithmetic lambda=1" and few["parameters"] == {"lambda": 1.0}
    assert many["setting"] == "linear" and many["parameters"] == {}
    assert few["confidence"] > 0.9 and many["confidence"] > 0.9 and not few["extrapolating"]
    outside = recommend(_overall(40, 0.1, 1e-3, 0.4), DENSITY, model)
    assert outside["extrapolating"] == ["experts"] and outside["confidence"] is None


def test_leave_one_out_residuals_are_those_of_refits_without_the_point():
    from mergeforge.analysis.recommend import _ridge

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, len(FEATURES))), rng.normal(size=12)
    _, residuals = _ridge(x, y)
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        coefficients, _ = _ridge(x[keep], y[keep])
        assert residuals[i] == pytest.approx(y[i] - np.concatenate([[1.0], x[i]]) @ coefficients, rel=1e-9, abs=1e-12)


def test_too_few_points_and_another_density_are_refused():
    with pytest.raises(ValueError, match="at least 3"):
        fit(_points(2))
    skipped = recommend(_overall(3, 0.1, 1e-3, 0.4), 0.3, fit(_points(10)))
    assert "density 0.2" in skipped["skipped"] and "0.3" in skipped["skipped"]


def test_the_shipped_predictor_names_settings_the_bench_runs():
    from mergeforge.bench.grids import plan_method
    from mergeforge.methods.registry import get_method

    model = load_model()
    assert model["features"] == list(FEATURES) and model["density"] == DENSITY
    assert set(model["settings"]) == {label(m, p) for m, p in SETTINGS}
    assert sum(model["fitted_on"]["zoos"].values()) == model["points"] >= 20
    for method, params in SETTINGS:
        plan = plan_method(get_method(method), 4)
        assert plan.skip_reason is None and set(params) <= {p.name for p in get_method(method).params}, method
        entry = model["settings"][label(method, params)]
        assert entry["loo_rmse"] > 0 and len(entry["loo_residuals"]) == model["points"]


def test_the_report_carries_the_recommendation(llama_family, tmp_path):
    out = tmp_path / "report"
    models = [llama_family[f"ft{i}"] for i in (1, 2, 3)]
    result = run_cli("analyze", "--base", llama_family["base"], *models, "--out", out, "--no-spectral", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "analysis.json").read_text())
    rec = report["recommendation"]
    assert rec == json.loads(json.dumps(recommend(report["overall"], DENSITY)))
    assert f"recommended: {rec['setting']}" in result.stdout
    assert "<h2>Recommendation</h2>" in (out / "report.html").read_text()
    recipe = yaml.safe_load((out / "recommended.yml").read_text())
    assert recipe["merge_method"] == rec["method"] and recipe.get("parameters", {}) == rec["parameters"]
    assert recipe["base_model"] == str(llama_family["base"].absolute())
    assert [m["model"] for m in recipe["models"]] == [str(m.absolute()) for m in models]
    merge = run_cli("merge", out / "recommended.yml", tmp_path / "merged")
    assert merge.returncode == 0, merge.stderr
    single = run_cli("analyze", "--base", llama_family["base"], models[0], "--out", tmp_path / "one", "--no-spectral", "--quiet")
    assert single.returncode == 0 and "nothing to merge" in single.stdout


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.2, "lambda": 1.0}), ("linear", {}),
                                                ("dare_ties", {"density": 0.5, "lambda": 1.5})])
def test_a_recommended_recipe_merges_the_setting_the_predictor_scored(llama_family, tmp_path, method, params):
    """The recipe's global parameters and per-model weights give the merge the bench's merger made."""
    from mergeforge import merge_state_dicts
    from mergeforge.analysis.analyze import recommended_recipe
    from mergeforge.bench.grids import plan_method
    from mergeforge.methods.registry import get_method

    models = [llama_family[f"ft{i}"] for i in (1, 2, 3)]
    rec = {"method": method, "parameters": params, "setting": method, "predicted_normalised": 0.5, "loo_rmse": 0.1,
           "confidence": 0.5, "runner_up": "linear", "extrapolating": []}
    (tmp_path / "recipe.yml").write_text(recommended_recipe(rec, str(llama_family["base"]), [str(m) for m in models]))
    assert run_cli("merge", tmp_path / "recipe.yml", tmp_path / "merged").returncode == 0
    fixed = plan_method(get_method(method), len(models)).model_fixed
    expected = merge_state_dicts(method, [load_state(m) for m in models], load_state(llama_family["base"]),
                                 parameters=params, model_parameters=[dict(fixed)] * len(models))
    written = load_state(tmp_path / "merged")
    # The engine's float32 task vectors and the in-memory bf16 route can break TIES' magnitude ties
    # differently at the threshold: a few entries in a thousand, where a wrong density moves most.
    close = [torch.isclose(written[name].float(), tensor.to(torch.bfloat16).float(), atol=8e-3, rtol=8e-3).reshape(-1)
             for name, tensor in expected.items()]
    assert torch.cat(close).float().mean() > 0.995
