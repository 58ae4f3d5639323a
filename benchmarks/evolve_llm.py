"""The searches of docs/evolve.md on the real-LLM zoo (SmolLM2-135M-Instruct experts).

- **all**: Iso-CTS (the bench's best hand-tuned method on this zoo) over the ten experts, its
  scale λ searched per group of five layers (``layer_groups: 6``, plus the embeddings, final norm
  and head: 7 genes in [0.5, 4]), starting from the bench's λ = 2; fitness the sum of the ten
  exact-match scores on the first 10 validation examples per skill (the bench's
  ``--val-examples 10``); test on the first 40 per skill (the bench's ``--max-examples 40``), so
  the rows compare with docs/benchmark.md. λ only scales the merged task vector, so the search
  runs Iso-CTS's SVDs once (at λ = 1) and every candidate is a rescaling.
- **all_ta**: task arithmetic over the ten experts, one weight per model (10 genes), from the
  bench's weight 0.2; same fitness and splits.
- **the composition task** (``addition_fr``: a sum asked and answered in French words; Akiba et
  al., arXiv:2403.13187, in miniature) from the ``addition`` and ``translate`` experts, Sakana-style:
  ``ps`` (TIES weights, densities and λ: 5 genes), ``dfs`` (a layer path over the two experts'
  30 layers, one repeat: 60 slots and 120 genes), and ``ps_dfs`` (a layer path whose first
  source is the ps winner). Fitness: exact match on the validation split plus a tenth of minus
  the answer loss, so that candidates that all score 0 are still ranked.

A search whose folder already has its report.json is read, not run again.

    python benchmarks/evolve_llm.py ZOO OUT [--only all,ps,dfs,ps_dfs,all_ta] [--evaluations 60] [--seed 0]

Writes OUT/NAME/ (each a full ``mergeforge evolve`` output folder, with its search file beside
it as OUT/NAME.yml), OUT/summary.json, and prints one test table per experiment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mergeforge.zoo.presets import SMOLLM2_SKILLS

COMPOSITION_TASK = "addition_fr"
COMPOSITION_EXPERTS = ("addition", "translate")


def searches(zoo: Path, evaluations: int, seed: int, out: Path) -> dict[str, dict[str, Any]]:
    def expert(name: str) -> str:
        return str(zoo / "models" / f"expert_{name}")

    base = str(zoo / "models" / "base")
    composition = {
        "base_model": base,
        "fitness": [{"task": str(zoo / "tasks" / COMPOSITION_TASK)},
                    {"task": str(zoo / "tasks" / COMPOSITION_TASK), "metric": "loss", "weight": -0.1}],
        "budget": {"evaluations": evaluations}, "seed": seed, "batch_size": 40,
    }
    pair = [expert(name) for name in COMPOSITION_EXPERTS]
    every_skill = {
        "base_model": base, "models": [expert(s) for s in SMOLLM2_SKILLS],
        "fitness": [{"task": str(zoo / "tasks" / skill)} for skill in SMOLLM2_SKILLS],
        "splits": {"search": "val", "test": "test", "search_examples": 10, "test_examples": 40},
        "budget": {"evaluations": evaluations}, "seed": seed, "batch_size": 40,
        "baselines": [  # the bench's hand-tuned settings (docs/benchmark.md), and the plain average
            {"name": "bench-tuned iso_cts (λ 2)", "merge_method": "iso_cts", "parameters": {"lambda": 2.0}},
            {"name": "bench-tuned iso_c (λ 2)", "merge_method": "iso_c", "parameters": {"lambda": 2.0}},
            {"name": "bench-tuned tsv (λ 1.5)", "merge_method": "tsv", "parameters": {"lambda": 1.5}},
            {"name": "bench-tuned task_arithmetic (weight 0.2)", "merge_method": "task_arithmetic",
             "model_parameters": {"weight": 0.2}},
            {"name": "bench-tuned ties (density 0.8, λ 0.7)", "merge_method": "ties",
             "parameters": {"lambda": 0.7}, "model_parameters": {"weight": 1.0, "density": 0.8}},
            {"name": "linear (equal weights)", "merge_method": "linear", "model_parameters": {"weight": 1.0}},
        ],
    }
    return {
        "all": {**every_skill, "merge_method": "iso_cts", "layer_groups": 6,
                "search": {"lambda": {"low": 0.5, "high": 4.0, "start": 2.0}}},
        "all_ta": {**every_skill, "merge_method": "task_arithmetic",
                   "search": {"weight": {"low": 0.0, "high": 1.0, "start": 0.2}}},
        "ps": {**composition, "merge_method": "ties", "models": pair, "search": {
            "weight": {"low": 0.0, "high": 2.0}, "density": {"low": 0.1, "high": 1.0}, "lambda": {"low": 0.5, "high": 2.5}}},
        "dfs": {**composition, "layer_path": {"models": pair, "repeats": 1}},
        "ps_dfs": {**composition, "baselines": [],
                   "layer_path": {"models": [str(out / "ps" / "winner.yml"), *pair], "repeats": 1}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path, help="a folder built by `mergeforge zoo build DIR --size smollm2`")
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default="all,ps,dfs,ps_dfs", help="comma-separated searches to run, in this order")
    parser.add_argument("--evaluations", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import yaml

    from mergeforge.evolve.api import run_search

    zoo, out = args.zoo.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = searches(zoo, args.evaluations, args.seed, out)
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    reports: dict[str, dict[str, Any]] = {}
    for name in args.only.split(","):
        done = out / name / "report.json"
        if done.is_file():  # finished by an earlier run of this script: read, not searched again
            reports[name] = json.loads(done.read_text(encoding="utf-8"))
            reports[name]["wall_seconds"] = summary.get(name, {}).get("wall_seconds")
            continue
        path = out / f"{name}.yml"
        path.write_text(yaml.safe_dump(plan[name], sort_keys=False, allow_unicode=True), encoding="utf-8")
        started = time.perf_counter()
        reports[name] = run_search(path, out / name, progress=print)
        reports[name]["wall_seconds"] = time.perf_counter() - started
        summary[name] = {key: reports[name].get(key) for key in (
            "test", "best", "seconds", "wall_seconds", "candidates_per_minute", "reproduction", "dimensions")}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for name, report in reports.items():
        print(f"\n{name}:\n" + table(report))


def table(report: dict[str, Any]) -> str:
    """One search's test rows: each exact-match term in %, and their mean."""
    rows = report["test"]
    tasks = list(dict.fromkeys(key for row in rows if "scores" in row for key in row["scores"] if not key.endswith(":loss")))
    lines = ["| model (test split) | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | " + " | ".join("-" for _ in tasks) + f" | failed: {row['error']} |")
            continue
        cells = [100 * row["scores"][task] for task in tasks]
        lines.append(f"| {row['name']} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells) / len(cells):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
