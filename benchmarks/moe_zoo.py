"""An MoE of a zoo's experts, with mergekit's ``hidden`` gates and with the calibrated router,
against the experts themselves and oracle routing.

    python benchmarks/moe_zoo.py ZOO_DIR WORK_DIR [--prompts 32] [--examples 40] [--experts a,b,...]
        [--modes hidden,calibrated] [--bench-results results.json]

For each gate mode the script writes a mergekit-moe YAML over the zoo's experts (each expert's
``positive_prompts``: the first N training prompts of its task, rendered with the chat template
the tasks are asked in), builds the MoE with ``mergeforge.moe.build_moe`` (self-tests included),
and scores it on every expert's task (test split, forced scoring). It also reports:

- routing accuracy (from the build's routing report, :mod:`mergeforge.moe.report`): the share of
  held-out prompt tokens (the test prompts, as ``held_out_prompts``) whose top-1 expert, at each
  layer, is the expert of the prompt's task, averaged over layers;
- oracle routing: the base with task t's expert MLPs at every layer (what an MoE computes when
  every token goes to the right expert), scored on task t;
- with ``--bench-results`` (a ``mergeforge bench`` results.json on the same zoo, test split and
  example count), its multi-task model and its best static merge, for comparison.

Prints a Markdown table. Heavy: one MoE of E experts is (1 + E·MLP share) times the base.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from mergeforge.evaluate.api import evaluate_model
from mergeforge.moe.build import build_moe
from mergeforge.moe.config import load_moe_config
from mergeforge.tasks.folders import load_task
from mergeforge.zoo import load_zoo


def rendered(tokenizer, task, prompts: list[str]) -> list[str]:
    """The prompts as the model sees them (chat template, system message), without the leading
    beginning token, which mergekit's encoding adds back."""
    if not task.spec.chat:
        return list(prompts)
    out = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": task.spec.system}] if task.spec.system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(text.removeprefix(tokenizer.bos_token or ""))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("zoo")
    parser.add_argument("work")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--experts", default=None)
    parser.add_argument("--modes", default="hidden,calibrated")
    parser.add_argument("--bench-results", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = load_zoo(args.zoo)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    experts = {m.task: m.path for m in zoo.experts if m.task is not None}
    if args.experts:
        experts = {name: experts[name] for name in args.experts.split(",")}
    tasks = {name: load_task(zoo.task_dir(name)) for name in experts}
    tokenizer = AutoTokenizer.from_pretrained(zoo.base.path)
    train = {n: rendered(tokenizer, t, [e.prompt for e in t.examples("train", args.prompts)]) for n, t in tasks.items()}
    held_out = {n: rendered(tokenizer, t, [e.prompt for e in t.examples("test", args.examples)]) for n, t in tasks.items()}

    def score(model, names) -> dict[str, float]:
        result = evaluate_model(model, [tasks[n] for n in names], split="test", max_examples=args.examples, tokenizer=tokenizer,
                                with_loss=False, scoring="forced", batch_size=64)
        return {n: result["tasks"][n]["score"] for n in names}

    rows: dict[str, dict[str, float]] = {}
    extra: dict[str, str] = {}
    names = list(experts)
    base = AutoModelForCausalLM.from_pretrained(zoo.base.path, dtype=torch.float32).eval()
    dense = f"{sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters"
    for name, path in experts.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        rows.setdefault("individual experts", {}).update(score(model, [name]))
    extra["individual experts"] = f"{dense} each, one per task"
    rows["base"] = score(base, names)
    extra["base"] = dense
    if args.bench_results:
        ranking = json.loads(args.bench_results.read_text())["ranking"]
        merges = [r for r in ranking if r["kind"] == "method" and r["protocol"] == "multitask"]
        for label, row in [("multi-task model (bench)", next(r for r in ranking if r["name"] == "multi-task model")),
                           (f"best static merge (bench: {merges[0]['name']} {merges[0]['settings']})", merges[0])]:
            rows[label] = {n: row["scores"][n] for n in names}
            extra[label] = dense
    for name, path in experts.items():  # oracle routing: base attention, the task's expert MLPs
        expert = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        oracle = AutoModelForCausalLM.from_pretrained(zoo.base.path, dtype=torch.float32).eval()
        with torch.no_grad():
            for mine, theirs in zip(oracle.model.layers, expert.model.layers, strict=True):
                mine.mlp.load_state_dict(theirs.mlp.state_dict())
        rows.setdefault("oracle routing (base + the task's expert MLPs)", {}).update(score(oracle, [name]))
    extra["oracle routing (base + the task's expert MLPs)"] = f"{dense} active (knows each prompt's task)"
    for mode in args.modes.split(","):
        config = {"base_model": str(zoo.base.path), "gate_mode": mode, "dtype": "bfloat16", "experts_per_token": 2,
                  "experts": [{"source_model": str(experts[n]), "positive_prompts": train[n], "held_out_prompts": held_out[n]}
                              for n in names]}
        (work / f"moe-{mode}.yml").write_text(yaml.safe_dump(config, allow_unicode=True))
        started = time.perf_counter()
        result = build_moe(load_moe_config(config), work / f"moe-{mode}", overwrite=True)
        built = time.perf_counter() - started
        model = AutoModelForCausalLM.from_pretrained(work / f"moe-{mode}", dtype=torch.float32).eval()
        label = f"MoE, gate_mode {mode}"
        rows[label] = score(model, names)
        routing = result.routing or {}
        extra[label] = (f"routing accuracy {100 * routing.get('calibration', 0):.0f}% on its prompts, "
                        f"{100 * routing.get('held-out', 0):.0f}% held out; "
                        f"{result.total_parameters / 1e6:.0f}M parameters, {result.active_parameters / 1e6:.0f}M active; "
                        f"built, calibrated and self-tested in {built:.0f} s")
        del model
    print("| model | " + " | ".join(names) + " | mean | notes |")
    print("|---|" + "---:|" * (len(names) + 1) + "---|")
    for label, scores in rows.items():
        mean = sum(scores.values()) / len(scores)
        cells = " | ".join(f"{100 * scores[n]:.1f}" if n in scores else "" for n in names)
        print(f"| {label} | {cells} | {100 * mean:.1f} | {extra.get(label, '')} |")
    (work / "moe_zoo.json").write_text(json.dumps({"rows": rows, "notes": extra}, indent=2))


if __name__ == "__main__":
    main()
