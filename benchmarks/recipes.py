"""The benchmark's recipes: mergekit YAML that both tools run unchanged.

Every recipe computes in float32 and writes bf16 (``dtype: float32``, ``out_dtype: bfloat16``), so
the two tools do the same arithmetic and their outputs can be compared to bf16 rounding.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# Methods whose output depends only on the inputs (no random draws): their outputs are compared.
DETERMINISTIC = {"linear", "task_arithmetic", "ties", "slerp", "breadcrumbs", "tsv", "iso_c", "iso_cts"}
# Methods mergekit has, under the same name and parameters.
MERGEKIT_METHODS = {"linear", "task_arithmetic", "ties", "dare_ties", "slerp", "breadcrumbs"}
# Methods with an exact top-k, whose ties at the threshold each tool may break its own way.
TOPK_METHODS = {"ties", "breadcrumbs"}
# SVD methods, of which the first registered one is benchmarked.
SVD_CANDIDATES = ("tsv", "iso_c", "iso_cts")

SLERP_GRADIENT = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]


def recipe(method: str, folders: list[Path], dtype: str = "float32") -> dict:
    """The recipe for ``method`` over ``folders`` (base first, then the fine-tunes)."""
    base, *tuned = (str(f) for f in folders)
    head: dict = {"merge_method": method, "dtype": dtype, "out_dtype": "bfloat16"}
    if method == "linear":
        models = [{"model": m, "parameters": {"weight": w}} for m, w in zip(tuned, (0.5, 0.3, 0.2))]
        return {**head, "models": models}
    if method == "slerp":
        return {**head, "base_model": base, "models": [{"model": base}, {"model": tuned[0]}],
                "parameters": {"t": SLERP_GRADIENT}}
    per_model: dict[str, dict] = {
        "task_arithmetic": {"weight": 0.4},
        "ties": {"weight": 0.4, "density": 0.5},
        "dare_ties": {"weight": 0.4, "density": 0.5},
        "breadcrumbs": {"weight": 0.4, "density": 0.5, "gamma": 0.01},
    }
    if method in SVD_CANDIDATES:  # no per-model parameters; the defaults (lambda) apply
        return {**head, "base_model": base, "models": [{"model": m} for m in tuned]}
    parameters = per_model.get(method, {"weight": 1.0})
    models = [{"model": m, "parameters": dict(parameters)} for m in tuned]
    return {**head, "base_model": base, "models": models}


def write_recipe(method: str, folders: list[Path], path: Path, dtype: str = "float32") -> Path:
    path.write_text(yaml.safe_dump(recipe(method, folders, dtype), sort_keys=False))
    return path


def input_folders(method: str, folders: list[Path]) -> list[Path]:
    """The folders a method reads (slerp reads the base and one fine-tune; linear no base)."""
    if method == "slerp":
        return folders[:2]
    if method == "linear":
        return folders[1:]
    return folders


def topk_counts(method: str, n: int) -> list[int]:
    """The k of each exact top-k the recipe's method takes over a task vector of ``n`` entries."""
    if method == "ties":
        return [int(0.5 * n)]
    if method == "breadcrumbs":  # keep the density largest below the top gamma
        return [int(0.5 * n) + int(0.01 * n), int(0.01 * n)]
    return []
