"""Throughput of GGUF reading and writing against the safetensors path, on one real model.

    python benchmarks/gguf_io.py MODEL.gguf [--rounds 3] [--work DIR]

MODEL.gguf is converted once to a float32 Hugging Face folder and to F32 and Q8_0 GGUF files
(with mergeforge itself). Then, in rounds (each round runs every case once, in the same order):

- open: ``open_checkpoint`` (for GGUF, ``gguf.GGUFReader`` parses every metadata field, tokens
  and merges included);
- read: every tensor, through ``.read`` (the torch executor's path), from the safetensors folder
  and from each GGUF file (dequantized, Q/K un-permuted);
- write: ``convert`` of the safetensors folder into safetensors (the peer) and into GGUF
  F32, F16, Q8_0 and Q4_0.

Inputs are in the page cache after the first round, so reads measure decoding, not the disk.
Prints a Markdown table of medians and ratios against the safetensors case of the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from mergeforge.checkpoint.convert import convert
from mergeforge.checkpoint.reader import open_checkpoint


def read_all(reference: Path) -> tuple[int, float, float]:
    """Parameters read, seconds to open (header and metadata), seconds to read every tensor."""
    count = 0
    started = time.perf_counter()
    with open_checkpoint(reference) as checkpoint:
        opened = time.perf_counter()
        for name in checkpoint.names():
            count += checkpoint.read(name).numel()
        return count, opened - started, time.perf_counter() - opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="/tmp/mergeforge-gguf-bench")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf-f32"
    if not hf.exists():
        convert(args.gguf, hf, "hf")
    sources = {"safetensors F32": hf, f"GGUF {Path(args.gguf).stem.rsplit('.', 1)[-1]}": Path(args.gguf)}
    for kind in ("f32", "q8_0"):
        path = work / f"model-{kind}.gguf"
        if not path.exists():
            convert(hf, path, "gguf", kind)
        sources[f"GGUF {kind.upper()}"] = path
    writes = {"safetensors F32": ("hf", None), **{f"GGUF {k.upper()}": ("gguf", k) for k in ("f32", "f16", "q8_0", "q4_0")}}
    params = read_all(hf)[0]  # also imports torch, outside the timings
    opens: dict[str, list[float]] = {name: [] for name in sources}
    reads: dict[str, list[float]] = {name: [] for name in sources}
    written: dict[str, list[float]] = {name: [] for name in writes}
    for _ in range(args.rounds):
        for name, path in sources.items():
            _, open_s, read_s = read_all(path)
            opens[name].append(open_s)
            reads[name].append(read_s)
        for name, (fmt, kind) in writes.items():
            out = work / "out" if fmt == "hf" else work / "out.gguf"
            started = time.perf_counter()
            convert(hf, out, fmt, kind, overwrite=True)
            written[name].append(time.perf_counter() - started)
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    print(f"model: {args.gguf} ({params / 1e6:.1f}M parameters); {os.cpu_count()} cores; medians of {args.rounds} rounds\n")
    print("| open (header, metadata) | median s |\n|---|---|")
    for name, times in opens.items():
        print(f"| {name} | {statistics.median(times):.2f} |")
    print()
    for title, table in (("read every tensor (after opening)", reads), ("write (convert from the safetensors folder)", written)):
        peer = statistics.median(next(iter(table.values())))
        print(f"| {title} | median s | M params/s | time vs safetensors |\n|---|---|---|---|")
        for name, times in table.items():
            median = statistics.median(times)
            print(f"| {name} | {median:.2f} | {params / median / 1e6:.0f} | {median / peer:.2f}x |")
        print()


if __name__ == "__main__":
    main()
