"""Two mergeforge commands side by side, in the same rounds: a change against the commit before it,
or the Python API against the command line.

Each command is run as ``CMD merge RECIPE OUT --quiet --no-copy-tokenizer`` on the speed
benchmark's checkpoints and recipes (``make_checkpoints.py``, ``recipes.py``), ``--runs`` times
each, the two alternating and swapping which goes first every round (so give an even ``--runs``),
with the I/O floor measured in the same rounds. The table gives medians, the ratio of the second to the first, and whether the
two wrote byte-identical weight files.

Example (the commit before a change, checked out in /tmp/old, against this tree):
    python benchmarks/versus.py --a "new=.venv/bin/mergeforge" \\
        --b "old=env PYTHONPATH=/tmp/old/src .venv/bin/python -m mergeforge" --sizes 0.2B --runs 6
    python benchmarks/versus.py --a "cli=.venv/bin/mergeforge" --b "api=.venv/bin/python benchmarks/python_api.py"
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoints import SHAPES, folder_bytes, make_set  # noqa: E402
from measure import clear_folder, io_floor, load_average, run_process  # noqa: E402
from recipes import input_folders, write_recipe  # noqa: E402
from speed import DEFAULT_METHODS, ROOT, _env, machine_lines, svd_method  # noqa: E402

HEADER = ["size", "method", "{a} s", "CPU s", "RSS GB", "{b} s", "CPU s", "RSS GB", "{b}/{a} wall", "{b}/{a} CPU", "I/O floor s",
          "same bytes"]


def parse_tool(text: str) -> tuple[str, list[str]]:
    name, _, command = text.partition("=")
    if not command:
        raise SystemExit(f"--a/--b take NAME=COMMAND, got {text!r}")
    return name, shlex.split(command)


def same_weights(first: Path, second: Path) -> bool:
    names = sorted(p.name for p in first.glob("*.safetensors*"))
    return names == sorted(p.name for p in second.glob("*.safetensors*")) and all(
        filecmp.cmp(first / name, second / name, shallow=False) for name in names)


def bench(args, size: str, method: str, folders: list[Path], tools: dict[str, list[str]]) -> dict:
    work = Path(args.cache) / "versus" / size / method
    work.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(method, folders, work / "recipe.yml", args.dtype)
    threads = ["--threads", str(args.threads)] if args.threads else []
    runs: dict[str, dict[str, list[float]]] = {name: {"s": [], "cpu": [], "rss": []} for name in tools}
    floors = []
    names = list(tools)
    inputs = [p for f in input_folders(method, folders) for p in sorted(f.glob("*.safetensors"))]
    for round_index in range(args.runs):
        for name in names if round_index % 2 == 0 else names[::-1]:
            out = work / f"out-{name}"
            clear_folder(out)
            run = run_process([*tools[name], "merge", str(recipe), str(out), "--quiet", "--no-copy-tokenizer", *threads], env=_env())
            if run.returncode != 0:
                raise SystemExit(f"{name} failed on {size}/{method}:\n{run.output[-3000:]}")
            runs[name]["s"].append(run.seconds)
            runs[name]["cpu"].append(run.cpu_seconds)
            runs[name]["rss"].append(run.peak_rss)
            print(f"  {size} {method} {name} run {round_index + 1}: {run.seconds:.2f} s ({run.cpu_seconds:.2f} CPU s), "
                  f"{run.peak_rss / 1e9:.2f} GB", flush=True)
        floors.append(io_floor(inputs, folder_bytes(folders[0]), work))
    identical = same_weights(work / f"out-{names[0]}", work / f"out-{names[1]}")
    for name in names:
        clear_folder(work / f"out-{name}")
    return {"size": size, "method": method, "runs": runs, "floor": floors, "identical": identical}


def row_cells(row: dict, names: list[str]) -> list[str]:
    a, b = (row["runs"][name] for name in names)
    med = statistics.median
    return [row["size"], row["method"],
            f"{med(a['s']):.2f}", f"{med(a['cpu']):.2f}", f"{max(a['rss']) / 1e9:.2f}",
            f"{med(b['s']):.2f}", f"{med(b['cpu']):.2f}", f"{max(b['rss']) / 1e9:.2f}",
            f"{med(b['s']) / med(a['s']):.2f}", f"{med(b['cpu']) / med(a['cpu']):.2f}", f"{med(row['floor']):.2f}",
            "yes" if row["identical"] else "NO"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="NAME=COMMAND of the first mergeforge")
    parser.add_argument("--b", required=True, help="NAME=COMMAND of the second mergeforge")
    parser.add_argument("--sizes", default="0.2B", help=f"comma-separated, of {', '.join(SHAPES)} (default 0.2B)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; 'svd' is the first registered SVD method")
    parser.add_argument("--runs", type=int, default=3, help="runs of each command per method (medians reported); even, so each goes first as often")
    parser.add_argument("--threads", type=int, help="--threads for both")
    parser.add_argument("--dtype", default="float32", help="the recipes' compute dtype (default float32)")
    parser.add_argument("--cache", default=str(ROOT / ".cache/bench"), help="where checkpoints and outputs live")
    args = parser.parse_args(argv)

    tools = dict([parse_tool(args.a), parse_tool(args.b)])
    names = list(tools)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "svd" in methods:
        found = svd_method(tools[names[0]])
        methods = [m for m in methods if m != "svd"] + ([found] if found else [])
    lines = [*machine_lines(None), f"- load average at start: {load_average()}"]
    print("\n".join(lines), flush=True)
    rows = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        folders = make_set(SHAPES[size], Path(args.cache) / size)
        for method in methods:
            rows.append(bench(args, size, method, folders, tools))
    header = [cell.format(a=names[0], b=names[1]) for cell in HEADER]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row_cells(row, names)) + " |" for row in rows]
    report = "\n".join([*lines, f"- load average at end: {load_average()}",
                        *(f"- {name}: `{shlex.join(command)}`" for name, command in tools.items()), "", *table])
    print("\n" + report)
    out = Path(args.cache) / f"versus-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"argv": sys.argv, "rows": rows, "report": report}, indent=2))
    print(f"\nall runs: {out}")


if __name__ == "__main__":
    main()
