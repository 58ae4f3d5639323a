"""``mergeforge analyze``: the pre-merge report of a set of fine-tunes of one base.

The models come from a merge recipe (its ``base_model`` and ``models``, or slice sources) or from
a base and a list; the statistics are :mod:`mergeforge.analysis.stats`'s. The output folder holds
``analysis.json``, ``report.html`` (self-contained) and, when the predictor makes a
recommendation (:mod:`mergeforge.analysis.recommend`), ``recommended.yml``, the recommended merge as
a recipe; all are written in a temporary folder and renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mergeforge.errors import RecipeError

JSON_FILE = "analysis.json"
HTML_FILE = "report.html"
RECIPE_FILE = "recommended.yml"


def models_of_recipe(path: Path) -> tuple[str, list[str]]:
    """The base and the other models a recipe merges (its references, relative to its folder)."""
    from mergeforge.engine.recipe import load_recipe

    recipe = load_recipe(path)
    if recipe.base_model is None:
        raise RecipeError(f"{path}: field 'base_model': analyze compares task vectors, so the recipe needs a base model")
    refs = [entry.model for entry in recipe.models or []]
    for slice_ in recipe.slices or []:
        refs += [source.model for source in slice_.sources]
    models = [ref for ref in dict.fromkeys(refs) if ref != recipe.base_model]
    if not models:
        raise RecipeError(f"{path}: no models besides the base to analyze")
    return recipe.base_model, models


def analyze(base: str | os.PathLike[str], models: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None,
            *, density: float = 0.2, seed: int = 0, spectral: bool = True, threads: int | None = None, overwrite: bool = False,
            relative_to: Path | None = None, progress: Callable[[str], None] = lambda line: None,
            recommend: bool = True) -> dict[str, Any]:
    """Compute the report of ``models`` against ``base`` (see :mod:`mergeforge.analysis.stats`) and,
    with ``out_dir``, write ``analysis.json``, ``report.html`` and the recommended recipe there.
    Returns the report. ``recommend=False`` leaves the recommendation out (the predictor's own
    training data is made so)."""
    from mergeforge.analysis.stats import analyze_checkpoints
    from mergeforge.checkpoint import folder as folder_files
    from mergeforge.checkpoint.reader import open_checkpoint

    if not models:
        raise RecipeError("analyze: give at least one model besides the base")
    opened = []
    try:
        for ref in [base, *models]:
            opened.append(open_checkpoint(ref, relative_to))
        if out_dir is not None:
            inputs = [Path(c.folder) for c in opened if getattr(c, "folder", None) is not None]
            folder_files.check_output_location(Path(out_dir), inputs, overwrite)
        result = analyze_checkpoints(opened[0], opened[1:], opened[0].names(), density=density, seed=seed, spectral=spectral,
                                     workers=threads, progress=progress)
    finally:
        for checkpoint in opened:
            checkpoint.close()
    result["base"] = str(base)
    result["model_refs"] = [str(m) for m in models]
    result["recommendation"] = (recommendation(result["overall"], density) if recommend
                                else {"skipped": "not asked for"})
    if out_dir is not None:
        with folder_files.atomic_output_folder(Path(out_dir)) as temp:
            (temp / JSON_FILE).write_text(json.dumps(result, indent=1) + "\n")
            (temp / HTML_FILE).write_text(render(result), encoding="utf-8")
            if "skipped" not in result["recommendation"]:
                refs = [_portable(ref, relative_to) for ref in (base, *models)]
                (temp / RECIPE_FILE).write_text(recommended_recipe(result["recommendation"], refs[0], refs[1:]))
    return result


def recommendation(overall: dict[str, Any], density: float) -> dict[str, Any]:
    """The predicted best merge setting (:mod:`mergeforge.analysis.recommend`), or why there is none."""
    from mergeforge.analysis.recommend import recommend

    if len(overall["relative_norm"]) < 2:
        return {"skipped": "one model: there is nothing to merge"}
    return recommend(overall, density)


def recommended_recipe(rec: dict[str, Any], base: str, models: Sequence[str]) -> str:
    """The recommended setting as a merge recipe of ``models`` onto ``base``, for ``mergeforge merge``:
    per-model parameters as the predictor's training merges had them (the bench's: weight 1 where
    the method takes one), the setting's parameters global."""
    import yaml

    from mergeforge.bench.grids import plan_method
    from mergeforge.methods.registry import get_method

    fixed = plan_method(get_method(rec["method"]), len(models)).model_fixed
    recipe: dict[str, Any] = {"merge_method": rec["method"], "base_model": base,
                              "models": [{"model": ref, **({"parameters": dict(fixed)} if fixed else {})} for ref in models]}
    if rec["parameters"]:
        recipe["parameters"] = dict(rec["parameters"])
    recipe["dtype"] = "bfloat16"
    return f"# {describe_recommendation(rec)}\n" + yaml.safe_dump(recipe, sort_keys=False)


def _portable(ref: str | os.PathLike[str], relative_to: Path | None) -> str:
    """A model reference that works from any folder: an existing path made absolute, else as given."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path
    return str(path.absolute()) if path.exists() else str(ref)


def describe_recommendation(rec: dict[str, Any]) -> str:
    """One line for the terminal and the report."""
    if "skipped" in rec:
        return f"no recommendation: {rec['skipped']}"
    line = (f"recommended: {rec['setting']} (predicted normalised accuracy {100 * rec['predicted_normalised']:.0f}% "
            f"± {100 * rec['loo_rmse']:.0f}; ")
    if rec["extrapolating"]:
        return line + f"no confidence: {', '.join(rec['extrapolating'])} outside the range the predictor was fitted on)"
    return line + f"{100 * rec['confidence']:.0f}% confident it beats {rec['runner_up']})"


def _label(ref: str) -> str:
    return Path(ref).name or ref


def render(result: dict[str, Any]) -> str:
    """The HTML page of a report."""
    from mergeforge.analysis.report import image, page, png, table

    names = [_label(r) for r in result["model_refs"]]
    overall, layers = result["overall"], result["layers"]
    n = len(names)
    sections = [f"<p>Base <code>{result['base']}</code>; {n} models; TIES/DARE density {result['density']}. "
                "Definitions: docs/foundations.md.</p>",
                "<h2>Overall</h2>",
                table(["model", "relative norm ‖τ‖/‖θ_base‖", "DARE noise (expected)", "DARE noise (measured)"]
                      + (["subspace alignment (SAR)"] if "subspace_alignment" in overall else []),
                      [[names[i], overall["relative_norm"][i], overall["dare_noise_expected"][i], overall["dare_noise_measured"][i]]
                       + ([overall["subspace_alignment"][i]] if "subspace_alignment" in overall else []) for i in range(n)]),
                f"<p>Mean pairwise cosine {_fmt(overall['mean_pairwise_cosine'])}; TIES sign-conflict rate "
                f"{100 * overall['sign_conflict_rate']:.1f}% of the entries kept by two or more models "
                f"({100 * overall['kept_by_two_share']:.1f}% of all entries).</p>",
                "<h2>Recommendation</h2>", _recommendation_section(result["recommendation"]),
                "<h3>Cosine between task vectors</h3>",
                table(["", *names], [[names[i], *overall["cosine"][i]] for i in range(n)])]

    def heatmap(figure: Any) -> None:
        axes = figure.add_subplot(1, 1, 1)
        shown = axes.imshow(overall["cosine"], cmap="RdBu_r", vmin=-1, vmax=1)
        axes.set_xticks(range(n), names, rotation=90)
        axes.set_yticks(range(n), names)
        figure.colorbar(shown, ax=axes)
        axes.set_title("cosine between task vectors (whole model)")

    sections.append(image(png(heatmap, (6.5, 5.5)), "cosine heatmap"))
    if layers:
        def curves(figure: Any) -> None:
            index = [layer["layer"] for layer in layers]
            panels = [("relative norm", lambda layer, i: layer["relative_norm"][i]),
                      ("mean pairwise cosine", None), ("TIES sign-conflict rate", None)]
            if "subspace_alignment" in layers[0]:
                panels.append(("subspace alignment ratio", lambda layer, i: layer["subspace_alignment"][i]))
            for position, (title, per_model) in enumerate(panels, start=1):
                axes = figure.add_subplot(2, 2, position)
                if per_model is None:
                    key = "mean_pairwise_cosine" if "cosine" in title else "sign_conflict_rate"
                    axes.plot(index, [layer[key] or 0.0 for layer in layers], marker="o")
                else:
                    for i in range(n):
                        axes.plot(index, [per_model(layer, i) or 0.0 for layer in layers], label=names[i])
                    if n <= 12:
                        axes.legend(fontsize=6)
                axes.set(title=title, xlabel="layer")

        sections += ["<h2>Per layer</h2>", image(png(curves, (12, 7.5)), "per-layer curves"),
                     table(["layer", "mean cosine", "sign conflicts", "relative norm (mean)"],
                           [[layer["layer"], layer["mean_pairwise_cosine"], layer["sign_conflict_rate"],
                             sum(v or 0.0 for v in layer["relative_norm"]) / n] for layer in layers])]
    spectral = [t for t in result["tensors"] if "spectral" in t]
    if spectral:
        sections += ["<h2>Spectra (2-D tensors of the layers)</h2>",
                     table(["tensor", "task-arithmetic effective rank", "SAR rank k", "effective rank (mean over models)"],
                           [[t["name"], t["spectral"]["task_arithmetic_effective_rank"], t["spectral"]["sar_rank"],
                             sum(t["spectral"]["effective_rank"]) / n] for t in spectral])]
    if result["skipped"]:
        sections.append(f"<p>Skipped (not in every model with the base's shape): {', '.join(result['skipped'])}</p>")
    return page("Task-vector report", sections)


def _recommendation_section(rec: dict[str, Any]) -> str:
    import html

    from mergeforge.analysis.report import table

    text = f"<p>{html.escape(describe_recommendation(rec))}. How it is made, and its leave-one-out error: docs/foundations.md.</p>"
    if "skipped" in rec:
        return text
    fitted = ", ".join(f"{zoo} zoo: {count} subsets" for zoo, count in rec["fitted_on"].get("zoos", {}).items())
    return text + (f"<p>Fitted on {fitted}.</p>" if fitted else "") + table(
        ["setting", "predicted normalised accuracy"], [[name, value] for name, value in rec["predicted"].items()])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
