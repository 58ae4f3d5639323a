"""Does permutation alignment lower the loss barrier between two models trained from different
initialisations, and improve their average? Measured on a zoo's scratch pair.

    python benchmarks/align_scratch.py [--zoo ZOO_DIR] [--points 11] [--json results.json]

The tiny zoo's ``scratch_shift_a`` and ``scratch_shift_b`` learn the ``shift`` task from two
random initialisations. For B as it is and for B aligned to A by each matching variant
(``mergeforge.analysis.align``, self-test included), along the straight line
θ(α) = (1 − α)·θ_A + α·θ_B on the ``shift`` test split (forced scoring: one teacher-forced pass,
same verdicts as greedy generation):

- the loss barrier: loss(½) − (loss(0) + loss(1)) / 2 (and the largest excess over the chord,
  over every α);
- the accuracy along the line;
- the accuracy of their ``linear`` merge (λ = 0.5, through ``merge_state_dicts``), which is the
  midpoint; the script checks that the two agree.

Prints a Markdown table; ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from mergeforge import merge_state_dicts
from mergeforge.analysis.align import align
from mergeforge.checkpoint.reader import open_checkpoint
from mergeforge.evaluate.api import evaluate_model, load_model_and_tokenizer
from mergeforge.zoo import build_zoo, load_zoo

# Permutations only (Git Re-Basin's group) and with the exact sign flips; within the layers only
# (the residual basis left as it is) and with the residual stream.
VARIANTS: dict[str, dict[str, Any]] = {
    f"{match}, {'layers + residual' if residual else 'layers'}, {'signed' if signs else 'permutations'}":
        {"match": match, "residual": residual, "signs": signs}
    for match in ("weights", "activations") for signs in (False, True) for residual in (False, True)
}
DEFAULT = "weights, layers, permutations"  # align's defaults


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as checkpoint:
        return {name: checkpoint.read(name).float() for name in checkpoint.names()}


def scores(model: Any, tokenizer: Any, state: dict[str, torch.Tensor], task: Path) -> tuple[float, float]:
    model.load_state_dict(state, strict=False)
    result = evaluate_model(model, task, tokenizer=tokenizer, scoring="forced")["tasks"]["shift"]
    return result["score"], result["loss"]


def line(model: Any, tokenizer: Any, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], task: Path,
         points: int) -> dict[str, Any]:
    alphas = [i / (points - 1) for i in range(points)]
    curve = [scores(model, tokenizer, {n: (1 - t) * a[n] + t * b[n] for n in a}, task) for t in alphas]
    accuracy, loss = [c[0] for c in curve], [c[1] for c in curve]
    middle = alphas.index(0.5)
    chord = [(1 - t) * loss[0] + t * loss[-1] for t in alphas]
    merged = merge_state_dicts("linear", [a, b], model_parameters=[{"weight": 0.5}, {"weight": 0.5}])
    merged_accuracy, merged_loss = scores(model, tokenizer, merged, task)
    assert abs(merged_loss - loss[middle]) < 1e-4, (merged_loss, loss[middle])
    return {"alphas": alphas, "accuracy": accuracy, "loss": loss,
            "barrier": loss[middle] - (loss[0] + loss[-1]) / 2,
            "max_barrier": max(value - c for value, c in zip(loss, chord)),
            "accuracy_barrier": (accuracy[0] + accuracy[-1]) / 2 - accuracy[middle],
            "merged_accuracy": merged_accuracy, "merged_loss": merged_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="a built zoo (default: the cached tiny zoo)")
    parser.add_argument("--points", type=int, default=11, help="points along the line (odd, so that 0.5 is one)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    zoo = load_zoo(args.zoo) if args.zoo else build_zoo(size="tiny")
    first, second = zoo.scratch_pair
    task = zoo.task_dir("shift")
    model, tokenizer = load_model_and_tokenizer(first.path)
    a = read_state(first.path)
    results: dict[str, Any] = {"zoo": str(zoo.root), "a": first.name, "b": second.name,
                               "unaligned": line(model, tokenizer, a, read_state(second.path), task, args.points)}
    with tempfile.TemporaryDirectory() as scratch:
        for variant, settings in VARIANTS.items():
            out = Path(scratch) / variant.replace(" ", "_").replace(",", "")
            data = {"data": zoo.task_dir("shift")} if settings["match"] == "activations" else {}
            report = align(first.path, second.path, out, **settings, **data).report
            results[variant] = line(model, tokenizer, a, read_state(out), task, args.points)
            results[variant]["weight_distance"] = report["weight_distance"]
            results[variant]["self_test"] = {key: value for key, value in report["self_test"].items() if "error" in key or "recovered" in key}
    print(f"{first.name} ({100 * results['unaligned']['accuracy'][0]:.1f}%) and {second.name} "
          f"({100 * results['unaligned']['accuracy'][-1]:.1f}%) on shift (test, {args.points} points)\n")
    print("| B | weight distance (relative) | loss barrier | largest barrier | midpoint accuracy | linear merge accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in ["unaligned", *VARIANTS]:
        row = results[variant]
        distance = row.get("weight_distance", {}).get("relative_after", None)
        if distance is None:
            distance = results[DEFAULT]["weight_distance"]["relative_before"]
        print(f"| {variant} | {distance:.3f} | {row['barrier']:.3f} | {row['max_barrier']:.3f} | {100 * row['accuracy'][len(row['accuracy']) // 2]:.1f}% | "
              f"{100 * row['merged_accuracy']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
