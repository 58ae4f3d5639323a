"""How fast ``mergeforge analyze`` is against the I/O floor of its inputs (docs/foundations.md).

    python benchmarks/analyze_speed.py --base zoo/models/base zoo/models/expert_* [--repeats 3]
    python benchmarks/analyze_speed.py --synthetic DIR [--repeats 3]   # no zoo at hand

``--synthetic DIR`` times ten stand-in experts written once into DIR: the SmolLM2-135M-Instruct
base of the real zoo (fetched with pip and converted, as the zoo does) and ten copies whose every
weight moved by Gaussian noise of 0.3% of its tensor's RMS, stored in bf16: the real zoo's shapes,
bytes and relative norms, with random directions.

Three timings, each the median of ``--repeats`` runs, in one process:

- **disk floor**: reading every input checkpoint's bytes with O_DIRECT (past the page cache), the
  time a first analysis of checkpoints fresh from a download cannot beat;
- **cached floor**: reading every tensor the analysis reads through mergeforge's reader, from the
  page cache (the inputs are read once before timing);
- **analyze**: the non-spectral statistics (``analyze(..., spectral=False)``: cosines, norms, TIES
  conflicts, DARE's noise) on one thread and on the default threads (one per core, at most 2),
  and, with ``--spectral``, the whole report.

The ratio of each to the floors is printed with the load average, which on a shared machine moves
every number.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from pathlib import Path

from mergeforge.analysis.analyze import analyze
from mergeforge.checkpoint.reader import open_checkpoint

CHUNK = 16 << 20


def disk_read(files: list[Path]) -> float:
    """Seconds to read ``files`` with O_DIRECT, into one aligned buffer."""
    buffer = mmap.mmap(-1, CHUNK)
    started = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            while os.readv(fd, [buffer]) == CHUNK:
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - started


def cached_read(refs: list[str]) -> float:
    """Seconds to read every tensor of ``refs`` through mergeforge's reader."""
    started = time.perf_counter()
    for ref in refs:
        with open_checkpoint(ref) as checkpoint:
            for name in checkpoint.names():
                checkpoint.read(name)
    return time.perf_counter() - started


def synthetic_experts(folder: Path, count: int = 10) -> tuple[str, list[str]]:
    """The base and ``count`` perturbed copies (see the module's docstring), written once."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mergeforge.zoo.pretrained import prepare_base

    base = folder / "base"
    if not base.exists():
        source = prepare_base("smollm2-135m-instruct", print)
        shutil.copytree(source, folder / ".base", dirs_exist_ok=True)
        (folder / ".base").rename(base)
    state = {}
    for path in sorted(base.glob("*.safetensors")):
        state.update(load_file(str(path)))
    generator = torch.Generator().manual_seed(0)
    experts = []
    for index in range(count):
        expert = folder / f"expert_{index}"
        experts.append(str(expert))
        if expert.exists():
            continue
        partial = folder / f".expert_{index}"
        shutil.copytree(base, partial, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
        moved = {}
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                moved[name] = tensor
                continue
            weights = tensor.float()
            noise = torch.randn(weights.shape, generator=generator) * (0.003 * float(weights.pow(2).mean().sqrt()))
            moved[name] = (weights + noise).to(tensor.dtype)
        save_file(moved, str(partial / "model.safetensors"), metadata={"format": "pt"})
        partial.rename(expert)
    return str(base), experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base")
    parser.add_argument("models", nargs="*")
    parser.add_argument("--synthetic", type=Path, help="time ten stand-in experts written once into this folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spectral", action="store_true", help="also time the whole report, spectra included")
    parser.add_argument("--json", type=Path, help="write the timings here")
    args = parser.parse_args()
    if args.synthetic:
        args.base, args.models = synthetic_experts(args.synthetic)
    elif not args.base or not args.models:
        parser.error("give --base BASE MODELS..., or --synthetic DIR")
    refs = [args.base, *args.models]
    files = sorted(p for ref in refs for p in Path(ref).glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    cached_read(refs)  # into the page cache
    load = [os.getloadavg()[0]]
    runs: dict[str, list[float]] = {"disk floor": [], "cached floor": [], "analyze (non-spectral, 1 thread)": [],
                                    "analyze (non-spectral)": []}
    if args.spectral:
        runs["analyze (with spectra)"] = []
    for _ in range(args.repeats):
        runs["disk floor"].append(disk_read(files))
        runs["cached floor"].append(cached_read(refs))
        started = time.perf_counter()
        analyze(args.base, args.models, spectral=False, threads=1)
        runs["analyze (non-spectral, 1 thread)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        report = analyze(args.base, args.models, spectral=False)
        runs["analyze (non-spectral)"].append(time.perf_counter() - started)
        if args.spectral:
            started = time.perf_counter()
            analyze(args.base, args.models)
            runs["analyze (with spectra)"].append(time.perf_counter() - started)
        load.append(os.getloadavg()[0])
    medians = {name: statistics.median(times) for name, times in runs.items()}
    disk, cached = medians["disk floor"], medians["cached floor"]
    print(f"{len(refs)} checkpoints, {size / 1e9:.2f} GB, {report['models']} models, {len(report['tensors'])} tensors; "
          f"load average {min(load):.1f}-{max(load):.1f} (1 min), {os.cpu_count()} cores")
    print("| step | median s | × disk floor | × cached floor |")
    print("|---|---:|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.1f} | {seconds / disk:.2f} | {seconds / cached:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians, "bytes": size, "load": load}, indent=1) + "\n")


if __name__ == "__main__":
    main()
