"""Linear mode connectivity: loss and accuracy along the line between two models.

θ(α) = (1 − α)·θ_A + α·θ_B for ``points`` values of α in [0, 1]; with a base, also the path
A → base → B (for fine-tunes, the path that task arithmetic's λ sweeps: θ_base + (1 − α)·τ_A on
the first half, θ_base + α·τ_B on the second). The model is loaded once and its weights are set
in place at each point; each point is scored by the evaluator (forced scoring, answer loss).

The **barrier** of a path (Frankle et al. 2020, arXiv:1912.05671) is the largest excess of the
loss over the straight interpolation of its end points' losses, max_α [L(θ(α)) − ((1 − α)L(0) + αL(1))]
(the end points count, so it is at least 0; near 0: the two models sit in one basin); the accuracy barrier is the largest shortfall of
accuracy under the interpolation of the end points' accuracies. Both are given for the means over
the tasks and for each task alone: for two experts of different tasks, each task's own curve is
the one that says whether they share a basin (the mean mixes a falling loss with a rising one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mergeforge.errors import CheckpointError, RecipeError

JSON_FILE = "lmc.json"
PNG_FILE = "lmc.png"
HTML_FILE = "report.html"


def barrier(alphas: Sequence[float], values: Sequence[float], higher_is_better: bool = False) -> float:
    """The largest excess of ``values`` over the chord between the end points (for accuracies,
    ``higher_is_better``: the largest shortfall under it)."""
    start, end = values[0], values[-1]
    excess = [(v - ((1 - a) * start + a * end)) for a, v in zip(alphas, values, strict=True)]
    return (max(-e for e in excess) if higher_is_better else max(excess)) + 0.0  # + 0.0: never -0.0


def _states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone().float() for name, tensor in model.state_dict().items()}


def _set(model: torch.nn.Module, first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], alpha: float) -> None:
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.lerp(first[name], second[name], alpha))


def lmc(a: str | os.PathLike[str], b: str | os.PathLike[str], tasks: Sequence[Any], *, base: str | os.PathLike[str] | None = None,
        points: int = 11, split: str = "test", max_examples: int | None = None, out_dir: str | os.PathLike[str] | None = None,
        overwrite: bool = False, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The curves between models ``a`` and ``b`` (HF folders of one architecture) on ``tasks``;
    with ``out_dir``, ``lmc.json``, ``lmc.png`` and ``report.html`` are written there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeforge.evaluate.api import evaluate_model

    if points < 2:
        raise RecipeError(f"--points: give at least 2 points (the two end points), got {points}")
    folders = {"a": Path(a), "b": Path(b), **({"base": Path(base)} if base is not None else {})}
    for role, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: no config.json; {role} must be a Hugging Face model folder")
    if out_dir is not None:
        from mergeforge.checkpoint.folder import check_output_location

        check_output_location(Path(out_dir), list(folders.values()), overwrite)
    model = AutoModelForCausalLM.from_pretrained(folders["a"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders["a"])
    states = {"a": _states(model)}
    for role in ("b", "base"):
        if role in folders:
            other = AutoModelForCausalLM.from_pretrained(folders[role], dtype=torch.float32)
            states[role] = _states(other)
            mismatch = next((n for n, t in states["a"].items() if n not in states[role] or states[role][n].shape != t.shape), None)
            if mismatch is not None:
                raise CheckpointError(f"{folders[role]}: tensor '{mismatch}' is missing or of another shape than in {folders['a']}")
            del other
    alphas = [i / (points - 1) for i in range(points)]

    def curve(first: str, second: str, label: str) -> list[dict[str, Any]]:
        rows = []
        for alpha in alphas:
            _set(model, states[first], states[second], alpha)
            scored = evaluate_model(model, list(tasks), split=split, max_examples=max_examples, tokenizer=tokenizer,
                                    with_loss=True, scoring="forced")
            per_task = {name: {"accuracy": r["score"], "loss": r["loss"]} for name, r in scored["tasks"].items()}
            rows.append({"alpha": alpha, "tasks": per_task,
                         "accuracy": sum(t["accuracy"] for t in per_task.values()) / len(per_task),
                         "loss": sum(t["loss"] for t in per_task.values()) / len(per_task)})
            progress(f"{label} α={alpha:.2f}: loss {rows[-1]['loss']:.4f}, accuracy {100 * rows[-1]['accuracy']:.1f}%")
        return rows

    result: dict[str, Any] = {"a": str(a), "b": str(b), "base": str(base) if base is not None else None, "split": split,
                              "points": points, "paths": {}}
    paths = {"linear": curve("a", "b", "A→B")}
    if "base" in states:
        through = curve("a", "base", "A→base") + curve("base", "b", "base→B")[1:]
        for index, row in enumerate(through):
            row["alpha"] = index / (len(through) - 1)
        paths["through_base"] = through
    for name, rows in paths.items():
        xs = [r["alpha"] for r in rows]
        result["paths"][name] = {"curve": rows, **_barriers(xs, rows),
                                 "tasks": {task: _barriers(xs, [r["tasks"][task] for r in rows]) for task in rows[0]["tasks"]}}
    if out_dir is not None:
        _write(result, Path(out_dir))
    return result


def _barriers(alphas: list[float], rows: list[dict[str, Any]]) -> dict[str, float]:
    return {"loss_barrier": barrier(alphas, [r["loss"] for r in rows]),
            "accuracy_barrier": barrier(alphas, [r["accuracy"] for r in rows], higher_is_better=True)}


def _draw(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(figure: Any) -> None:
        for position, key in enumerate(("loss", "accuracy"), start=1):
            axes = figure.add_subplot(1, 2, position)
            for name, path in result["paths"].items():
                rows = path["curve"]
                axes.plot([r["alpha"] for r in rows], [r[key] for r in rows], marker="o",
                          label=f"{name} (barrier {path[key + '_barrier']:.3g})")
            axes.set(xlabel="α (0: A, 1: B)", ylabel=f"mean {key}", title=key)
            axes.legend(fontsize=8)

    return draw


def _write(result: dict[str, Any], out_dir: Path) -> None:
    import base64

    from mergeforge.analysis.report import image, page, png, table
    from mergeforge.checkpoint.folder import atomic_output_folder

    picture = png(_draw(result), (11, 4))
    rows = [[name, scope, values["loss_barrier"], values["accuracy_barrier"]] for name, path in result["paths"].items()
            for scope, values in [("mean over tasks", path), *path["tasks"].items()]]
    html = page("Linear mode connectivity", [f"<p>A <code>{result['a']}</code>, B <code>{result['b']}</code>"
                                              + (f", base <code>{result['base']}</code>" if result["base"] else "") + ".</p>",
                                              table(["path", "task", "loss barrier", "accuracy barrier"], rows), image(picture, "curves")])
    with atomic_output_folder(out_dir) as temp:
        (temp / JSON_FILE).write_text(json.dumps(result, indent=1) + "\n")
        (temp / HTML_FILE).write_text(html, encoding="utf-8")
        if picture:
            (temp / PNG_FILE).write_bytes(base64.b64decode(picture))
