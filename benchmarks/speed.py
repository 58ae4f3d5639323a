"""Merge speed and memory, mergeforge beside mergekit, against the machine's I/O floor.

Run ``python benchmarks/speed.py`` (``make bench``): it makes random-weight Llama-shaped bf16
checkpoints (a base and three fine-tunes) under ``.cache/bench/``, then, for each size and method,
runs the whole ``mergeforge merge`` process and (when available) the whole ``mergekit-yaml``
process on the same YAML, alternating the two, ``--runs`` times each, with an I/O floor
measurement (read every input byte, write the output's bytes) in the same rounds. It prints a
Markdown table of medians and writes every run to ``.cache/bench/results-<time>.json``.

mergekit is looked for in ``.cache/mergekit-venv`` (keep it out of the project's venv: it pins
its own torch and transformers), or give ``--mergekit-python``.

Example:
    python benchmarks/speed.py --sizes 0.2B --methods linear,ties --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import compare_folders  # noqa: E402
from make_checkpoints import SHAPES, folder_bytes, make_set  # noqa: E402
from measure import clear_folder, io_floor, load_average, run_process  # noqa: E402
from recipes import (  # noqa: E402
    DETERMINISTIC,
    MERGEKIT_METHODS,
    SVD_CANDIDATES,
    TOPK_METHODS,
    input_folders,
    topk_counts,
    write_recipe,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "breadcrumbs", "svd"]


@dataclass
class Row:
    size: str
    method: str
    mergeforge_s: list[float] = field(default_factory=list)
    mergeforge_rss: list[int] = field(default_factory=list)
    mergeforge_cpu: list[float] = field(default_factory=list)
    mergekit_s: list[float] = field(default_factory=list)
    mergekit_rss: list[int] = field(default_factory=list)
    mergekit_cpu: list[float] = field(default_factory=list)
    floor_s: list[float] = field(default_factory=list)
    agreement: str = ""
    predicted_peak: int | None = None
    note: str = ""

    @staticmethod
    def _median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def cells(self) -> list[str]:
        mf, mk, floor = self._median(self.mergeforge_s), self._median(self.mergekit_s), self._median(self.floor_s)
        mf_rss = max(self.mergeforge_rss) if self.mergeforge_rss else None
        mk_rss = max(self.mergekit_rss) if self.mergekit_rss else None
        predicted = f"{self.predicted_peak / 1e9:.2f}" if self.predicted_peak else "–"
        mf_cpu, mk_cpu = self._median(self.mergeforge_cpu), self._median(self.mergekit_cpu)
        return [
            self.size,
            self.method,
            _fmt(mf, "{:.2f}"),
            _fmt(mf_cpu, "{:.2f}"),
            _fmt(mf_rss and mf_rss / 1e9, "{:.2f}"),
            predicted,
            _fmt(mk, "{:.2f}"),
            _fmt(mk_cpu, "{:.2f}"),
            _fmt(mk_rss and mk_rss / 1e9, "{:.2f}"),
            _fmt(mk / mf if mk and mf else None, "{:.1f}x"),
            _fmt(mk_cpu / mf_cpu if mk_cpu and mf_cpu else None, "{:.1f}x"),
            _fmt(floor, "{:.2f}"),
            _fmt(mf / floor if mf and floor else None, "{:.1f}x"),
            self.agreement or self.note or "–",
        ]


HEADER = [
    "size", "method", "mergeforge s", "CPU s", "peak RSS GB", "predicted GB", "mergekit s", "CPU s", "mergekit RSS GB",
    "speed-up (wall)", "speed-up (CPU)", "I/O floor s", "mergeforge / floor", "outputs",
]


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def find_mergekit(explicit: str | None) -> list[str] | None:
    """The command that runs ``mergekit-yaml``, or None when mergekit is not installed."""
    candidates = [Path(explicit)] if explicit else [ROOT / ".cache/mergekit-venv/bin/python"]
    for python in candidates:
        if python.is_file():
            check = subprocess.run([str(python), "-c", "import mergekit"], capture_output=True)
            if check.returncode == 0:
                script = python.parent / "mergekit-yaml"
                return [str(script)] if script.is_file() else [str(python), "-m", "mergekit.scripts.run_yaml"]
    return None


def svd_method(mergeforge: list[str]) -> str | None:
    listing = subprocess.run([*mergeforge, "methods"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in listing.splitlines() if line and not line[0].isspace()}
    return next((name for name in SVD_CANDIDATES if name in names), None)


def help_seconds(command: list[str], runs: int) -> float:
    return statistics.median(run_process([*command, "--help"]).seconds for _ in range(runs))


def dry_run_peak(mergeforge: list[str], recipe: Path, threads: int | None) -> int | None:
    extra = ["--threads", str(threads)] if threads else []
    result = subprocess.run([*mergeforge, "merge", str(recipe), "--dry-run", *extra], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("estimated peak memory:"):
            number, unit = line.split(":", 1)[1].split()[:2]
            scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}[unit]
            return int(float(number) * scale)
    return None


def bench_method(args, size: str, method: str, folders: list[Path], mergeforge: list[str], mergekit: list[str] | None) -> Row:
    work = Path(args.cache) / "runs" / size / method
    work.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(method, folders, work / "recipe.yml", args.dtype)
    row = Row(size, method)
    out_mf, out_mk = work / "out-mergeforge", work / "out-mergekit"
    threads = ["--threads", str(args.threads)] if args.threads else []
    mf_command = [*mergeforge, "merge", str(recipe), str(out_mf), "--quiet", "--no-copy-tokenizer", *threads]
    use_mergekit = mergekit is not None and method in MERGEKIT_METHODS
    mk_command = [*(mergekit or []), str(recipe), str(out_mk), "--no-copy-tokenizer"]
    if not use_mergekit:
        row.note = "mergekit: not installed" if mergekit is None else "mergekit: no such method"
    row.predicted_peak = dry_run_peak(mergeforge, recipe, args.threads)
    inputs = [p for f in input_folders(method, folders) for p in sorted(f.glob("*.safetensors"))]
    out_bytes = folder_bytes(folders[0])
    for round_index in range(args.runs):
        # Alternate which tool goes first, so neither always inherits the other's page cache.
        order = ["mergeforge", "mergekit"] if round_index % 2 == 0 else ["mergekit", "mergeforge"]
        for tool in order:
            if tool == "mergekit" and not use_mergekit:
                continue
            out, command = (out_mf, mf_command) if tool == "mergeforge" else (out_mk, mk_command)
            clear_folder(out)
            run = run_process(command, env=_env())
            if run.returncode != 0:
                raise SystemExit(f"{tool} failed on {size}/{method}:\n{run.output[-3000:]}")
            if tool == "mergeforge":
                times, rss, cpu = row.mergeforge_s, row.mergeforge_rss, row.mergeforge_cpu
            else:
                times, rss, cpu = row.mergekit_s, row.mergekit_rss, row.mergekit_cpu
            times.append(run.seconds)
            rss.append(run.peak_rss)
            cpu.append(run.cpu_seconds)
            print(f"  {size} {method} {tool} run {round_index + 1}: {run.seconds:.2f} s ({run.cpu_seconds:.2f} CPU s), "
                  f"{run.peak_rss / 1e9:.2f} GB", flush=True)
        row.floor_s.append(io_floor(inputs, out_bytes, work))
    if use_mergekit and method in DETERMINISTIC:
        counts = (lambda n: topk_counts(method, n)) if method in TOPK_METHODS else None
        row.agreement = compare_folders(out_mf, out_mk, folders if counts else None, counts).summary()
    if not args.keep_outputs:
        clear_folder(out_mf)
        clear_folder(out_mk)
    return row


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def machine_lines(mergekit: list[str] | None) -> list[str]:
    import numpy

    lines = [
        f"- machine: {platform.machine()}, {os.cpu_count()} cores ({_cpu_name()}), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB RAM, {platform.platform()}",
        f"- Python {platform.python_version()}, NumPy {numpy.__version__}, torch {_version(sys.executable, 'torch')}, "
        f"mergeforge {_version(sys.executable, 'mergeforge')}",
    ]
    if mergekit:
        python = Path(mergekit[0]).parent / "python"
        lines.append(f"- mergekit {_version(str(python), 'mergekit')} (torch {_version(str(python), 'torch')}) in its own venv")
    return lines


def _version(python: str, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version('{package}'))"
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return result.stdout.strip() or "?"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.2B,1B", help=f"comma-separated, of {', '.join(SHAPES)} (default 0.2B,1B)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; 'svd' is the first registered SVD method")
    parser.add_argument("--runs", type=int, default=3, help="runs of each tool per method (median reported)")
    parser.add_argument("--mergekit-python", help="python of a venv with mergekit (default .cache/mergekit-venv)")
    parser.add_argument("--no-mergekit", action="store_true", help="run mergeforge only")
    parser.add_argument("--threads", type=int, help="mergeforge --threads")
    parser.add_argument("--dtype", default="float32", help="the recipes' compute dtype (default float32)")
    parser.add_argument("--cache", default=str(ROOT / ".cache/bench"), help="where checkpoints and outputs live")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged folders")
    parser.add_argument("--mergeforge", help="command that runs mergeforge (default: this venv's `mergeforge`)")
    args = parser.parse_args(argv)

    mergeforge = shlex.split(args.mergeforge) if args.mergeforge else [str(Path(sys.executable).parent / "mergeforge")]
    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit_python)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "svd" in methods:
        found = svd_method(mergeforge)
        methods = [m for m in methods if m != "svd"] + ([found] if found else [])
        if not found:
            print("no SVD method registered yet; skipping 'svd'", flush=True)
    started = time.time()
    print("\n".join(machine_lines(mergekit)), flush=True)
    print(f"- load average at start: {load_average()}", flush=True)
    help_times = {"mergeforge --help": help_seconds(mergeforge, args.runs)}
    if mergekit:
        help_times["mergekit-yaml --help"] = help_seconds(mergekit, args.runs)
    rows: list[Row] = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        folders = make_set(SHAPES[size], Path(args.cache) / size)
        print(f"{size}: {sum(folder_bytes(f) for f in folders) / 1e9:.2f} GB of inputs", flush=True)
        for method in methods:
            rows.append(bench_method(args, size, method, folders, mergeforge, mergekit))
    table = markdown_table(rows)
    helps = ", ".join(f"`{k}` {v:.2f} s" for k, v in help_times.items())
    report = "\n".join([*machine_lines(mergekit), f"- load average at end: {load_average()}", f"- {helps}", "", table])
    print("\n" + report)
    record = {
        "started": started,
        "argv": sys.argv,
        "help_seconds": help_times,
        "rows": [row.__dict__ for row in rows],
        "report": report,
    }
    out = Path(args.cache) / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"\nall runs: {out}")


if __name__ == "__main__":
    main()
