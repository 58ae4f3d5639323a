"""Peak memory stays bounded by a few tensors, whatever the model size (measured, not timed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# VmHWM is this process's own high-water mark; ru_maxrss would not do: Linux carries it across
# exec, so a child of this (large) test process would report the parent's size as its peak.
MEASURE = """
import sys
from mergeforge.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    status = open("/proc/self/status").read()
    peak = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    print("MAXRSS", int(peak) * 1024, file=sys.stderr)
"""


def peak_rss(recipe: Path, out: Path, *flags: str) -> int:
    result = subprocess.run([sys.executable, "-c", MEASURE, "merge", str(recipe), str(out), "--quiet", "--threads", "2", *flags],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("MAXRSS")))


def write_model(folder: Path, tensors: int, rows: int, seed: int) -> int:
    from safetensors.torch import save_file

    folder.mkdir()
    generator = torch.Generator().manual_seed(seed)
    state = {f"model.layers.{i}.mlp.weight": torch.randn(rows, 1024, generator=generator) for i in range(tensors)}
    save_file(state, folder / "model.safetensors")
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("executor", ["numpy", "torch"])
def test_peak_memory_is_bounded_by_tensors_not_model(tmp_path, executor):
    small = [tmp_path / f"small{i}" for i in range(3)]
    large = [tmp_path / f"large{i}" for i in range(3)]
    for i, folder in enumerate(small):
        write_model(folder, 2, 1024, i)
    largest_tensor = 1024 * 1024 * 4
    input_bytes = sum(write_model(folder, 40, 1024, i) for i, folder in enumerate(large))
    rss = {}
    for name, folders in (("small", small), ("large", large)):
        recipe = tmp_path / f"{name}.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(folders[0]),
                                          "models": [{"model": str(f), "parameters": {"weight": 1, "density": 0.5}} for f in folders[1:]]}))
        rss[name] = peak_rss(recipe, tmp_path / f"{name}-out", "--executor", executor)
    growth = rss["large"] - rss["small"]
    print(f"{executor}: peak RSS: {rss}, growth {growth / 1e6:.0f} MB for {input_bytes / 1e6:.0f} MB of inputs")
    # 20x more tensors (480 MB of inputs) may cost only the jobs in flight: 2 threads x (3 inputs + temporaries).
    assert growth < 24 * largest_tensor, (rss, input_bytes)
    assert growth < input_bytes / 5, (rss, input_bytes)
