"""How far each fine-tune of a zoo moved from its base: the size and overlap of its task vector.

    python benchmarks/zoo_task_vectors.py ZOO_DIR

For every full fine-tune of the zoo (experts, multi-task model, behaviour expert), with
τ = θ_model − θ_base over all tensors (float64 sums, one tensor at a time):

- ‖τ‖ / ‖θ_base‖, the task vector's size relative to the base (the literature's "well under 1%");
- the share of weights left exactly equal to the base's (bf16 checkpoints round small updates away);
- the largest cosine between this expert's τ and any other expert's.

Prints a Markdown table.
"""

from __future__ import annotations

import sys

import numpy as np

from mergeforge.checkpoint.reader import open_checkpoint
from mergeforge.zoo import load_zoo


def main(zoo_dir: str) -> None:
    zoo = load_zoo(zoo_dir)
    models = [*zoo.experts, *zoo.by_role("multitask"), *zoo.by_role("behavior")]
    base = open_checkpoint(zoo.base.path)
    inputs = {model.name: open_checkpoint(model.path) for model in models}
    names = [name for name in base.names() if all(checkpoint.has(name) for checkpoint in inputs.values())]
    base_norm = 0.0
    norms = dict.fromkeys(inputs, 0.0)
    unchanged = dict.fromkeys(inputs, 0)
    dots = np.zeros((len(models), len(models)))
    total = 0
    for name in names:
        theta = base.read(name).double().numpy().ravel()
        base_norm += float(theta @ theta)
        total += theta.size
        deltas = []
        for model in models:
            delta = inputs[model.name].read(name).double().numpy().ravel() - theta
            unchanged[model.name] += int(np.count_nonzero(delta == 0))
            deltas.append(delta)
        stacked = np.stack(deltas)
        dots += stacked @ stacked.T
    for i, model in enumerate(models):
        norms[model.name] = float(np.sqrt(dots[i, i]))
    experts = len(zoo.experts)
    print(f"zoo {zoo.root} ({total / 1e6:.1f}M weights in {len(names)} tensors)\n")
    print("| model | ‖τ‖ / ‖θ_base‖ | weights unchanged | largest cosine with another expert |")
    print("|---|---:|---:|---|")
    for i, model in enumerate(models):
        cosines = [(dots[i, j] / (norms[model.name] * norms[other.name]), other.task or other.name)
                   for j, other in enumerate(models[:experts]) if j != i]
        best = max(cosines) if cosines else (float("nan"), "")
        print(f"| {model.name} | {100 * norms[model.name] / np.sqrt(base_norm):.3f}% | "
              f"{100 * unchanged[model.name] / total:.1f}% | {best[0]:.3f} ({best[1]}) |")


if __name__ == "__main__":
    main(sys.argv[1])
