"""Which merge to run: a method and its hyperparameters predicted from ``analyze``'s statistics.

The predictor is fitted on measured merges of our zoos (``benchmarks/recommend_data.py`` scores
every setting of :data:`SETTINGS` on random subsets of a zoo's experts; ``benchmarks/recommend_fit.py``
fits it and writes :data:`MODEL_FILE`, shipped with the package). For each setting it is a ridge
regression of the merge's normalised accuracy (its accuracy on the merged experts' tasks divided
by the experts' own) on the features of :func:`features`; the recommendation is the setting with
the highest prediction, and its confidence the probability that it really beats the runner-up,
with the difference of the two regressions' paired leave-one-out residuals taken as Gaussian. docs/foundations.md gives the
predictor's leave-one-out error and where it should not be trusted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

MODEL_FILE = "recommend_model.json"
DENSITY = 0.2  # the TIES density of the sign-conflict feature (analyze's default)
RIDGE = 1.0  # the ridge penalty, on standardised features

# The settings the predictor chooses among: the data-free families a user reaches for first, at
# the bench grids' values (bench/grids.py). Spectral methods beyond Iso-C are slower than the
# rest by 5-20x at ten experts, so they are not in the candidate set.
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("linear", {}),
    *(("task_arithmetic", {"lambda": v}) for v in (0.3, 0.5, 0.8, 1.0)),
    *(("ties", {"density": d, "lambda": v}) for d in (0.2, 0.8) for v in (0.7, 1.0, 1.5)),
    *(("dare_ties", {"density": 0.5, "lambda": v}) for v in (1.0, 1.5)),
    *(("iso_c", {"lambda": v}) for v in (1.0, 1.5, 2.0)),
)

FEATURES = ("experts", "mean_pairwise_cosine", "log10_relative_norm", "sign_conflict_rate")


def label(method: str, params: dict[str, Any]) -> str:
    """``ties density=0.2 lambda=1`` for a setting."""
    return " ".join([method, *(f"{k}={v:g}" for k, v in params.items())])


def features(overall: dict[str, Any]) -> dict[str, float]:
    """The predictor's inputs from ``analyze``'s overall statistics: the number of models, their
    mean pairwise cosine, log10 of the mean relative norm ‖τ‖/‖θ_base‖, and the TIES
    sign-conflict rate (at :data:`DENSITY`)."""
    norms = [v for v in overall["relative_norm"] if v is not None and v > 0]
    return {
        "experts": float(len(overall["relative_norm"])),
        "mean_pairwise_cosine": float(overall["mean_pairwise_cosine"] or 0.0),
        "log10_relative_norm": math.log10(sum(norms) / len(norms)) if norms else -12.0,
        "sign_conflict_rate": float(overall["sign_conflict_rate"]),
    }


def _matrix(rows: Sequence[dict[str, float]]) -> np.ndarray:
    return np.array([[row[name] for name in FEATURES] for row in rows], dtype=np.float64)


def _ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge coefficients (intercept first) on standardised ``x``, and the leave-one-out residuals
    (exact, from the hat matrix)."""
    design = np.hstack([np.ones((len(x), 1)), x])
    penalty = RIDGE * np.eye(design.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    inverse = np.linalg.inv(design.T @ design + penalty)
    coefficients = inverse @ design.T @ y
    hat = np.einsum("ij,jk,ik->i", design, inverse, design)
    residuals = (y - design @ coefficients) / np.clip(1.0 - hat, 1e-6, None)
    return coefficients, residuals


def fit(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The predictor fitted on ``points``: each ``{"features": features(...), "scores": {label: normalised}}``.
    Only the settings every point scored are kept."""
    if len(points) < 3:
        raise ValueError(f"recommendation predictor: {len(points)} points; fit it on at least 3")
    labels = [label(m, p) for m, p in SETTINGS if all(label(m, p) in point["scores"] for point in points)]
    x = _matrix([point["features"] for point in points])
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    standard = (x - mean) / scale
    settings = {}
    for name in labels:
        y = np.array([point["scores"][name] for point in points], dtype=np.float64)
        coefficients, residuals = _ridge(standard, y)
        settings[name] = {"coefficients": coefficients.tolist(), "loo_rmse": float(np.sqrt(np.mean(residuals ** 2))),
                          "loo_residuals": [round(float(r), 6) for r in residuals]}
    return {"features": list(FEATURES), "mean": mean.tolist(), "scale": scale.tolist(), "ridge": RIDGE, "density": DENSITY,
            "points": len(points), "range": [x.min(axis=0).tolist(), x.max(axis=0).tolist()], "settings": settings}


def predict(model: dict[str, Any], row: dict[str, float]) -> dict[str, float]:
    """Predicted normalised accuracy of every setting of ``model`` for one feature row."""
    x = (np.array([row[name] for name in model["features"]]) - np.array(model["mean"])) / np.array(model["scale"])
    design = np.concatenate([[1.0], x])
    return {name: float(design @ np.array(entry["coefficients"])) for name, entry in model["settings"].items()}


def load_model() -> dict[str, Any]:
    """The predictor shipped with the package."""
    return json.loads(resources.files("mergeforge.analysis").joinpath(MODEL_FILE).read_text())


def recommend(overall: dict[str, Any], density: float, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recommended setting for models with ``overall`` statistics (``analyze``'s), its predicted
    normalised accuracy, the confidence that it beats the runner-up, and every setting's prediction.

    The predictor knows only the regime it was fitted on: when a feature falls outside the fitted
    range, ``extrapolating`` names it and the confidence is None."""
    model = model or load_model()
    if abs(density - model["density"]) > 1e-9:
        return {"skipped": f"the predictor's sign-conflict feature is measured at density {model['density']:g}; "
                           f"this report used {density:g} (run analyze with --density {model['density']:g} for one)"}
    row = features(overall)
    predicted = predict(model, row)
    ranking = sorted(predicted, key=predicted.__getitem__, reverse=True)
    best, runner_up = ranking[0], ranking[1]
    # The two predictions' errors are correlated (a hard subset is hard for every setting): the
    # spread of their difference comes from the paired leave-one-out residuals.
    difference = np.subtract(model["settings"][best]["loo_residuals"], model["settings"][runner_up]["loo_residuals"])
    spread = float(np.sqrt(np.mean(difference ** 2)))
    margin = predicted[best] - predicted[runner_up]
    confidence = 0.5 * (1.0 + math.erf(margin / (spread * math.sqrt(2.0)))) if spread > 0 else 1.0
    method, params = next((m, dict(p)) for m, p in SETTINGS if label(m, p) == best)
    x = np.array([row[name] for name in model["features"]])
    low, high = np.array(model["range"][0]), np.array(model["range"][1])
    outside = [name for name, v, lo, hi in zip(model["features"], x, low, high, strict=True) if not lo <= v <= hi]
    # Outside the fitted range the regressions extrapolate and their residuals say nothing: no confidence.
    return {"method": method, "parameters": params, "setting": best, "predicted_normalised": predicted[best],
            "runner_up": runner_up, "confidence": None if outside else confidence, "loo_rmse": model["settings"][best]["loo_rmse"],
            "features": row, "extrapolating": outside,
            "predicted": {name: predicted[name] for name in ranking}, "fitted_on": model.get("fitted_on", {})}
