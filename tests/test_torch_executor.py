"""The torch executor on its own: row blocks bound the memory of a large element-wise tensor and
give the same bytes, the byte budget admits jobs, float64 and GPU-only paths compute, and copies
of integer tensors that disagree are refused. (Disk full, kills and untouched inputs are tested
for both executors in test_bad_inputs.py; the memory bound over many tensors in test_memory.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_state
from safetensors.torch import save_file

import mergeforge
from mergeforge.engine.api import plan_merge
from mergeforge.engine.options import MergeOptions
from mergeforge.engine.output import write_merge
from mergeforge.engine.torch_executor import TorchExecutor, block_rows, job_memory
from mergeforge.errors import MethodError

ROWS, COLUMNS = 4096, 2048  # one 32 MB float32 tensor per model


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("big")
    folders = []
    for index in range(3):
        folder = root / f"m{index}"
        folder.mkdir()
        generator = torch.Generator().manual_seed(index)
        save_file({"model.layers.0.mlp.weight": torch.randn(ROWS, COLUMNS, generator=generator),
                   "model.ids": torch.arange(5)}, folder / "model.safetensors")
        folders.append(folder)
    return folders


def linear(folders: list[Path]) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(folders, (0.5, 0.3, 0.2))]}


MEASURE = """
import sys
from mergeforge.engine.api import plan_merge
from mergeforge.engine.options import MergeOptions
from mergeforge.engine.output import write_merge
from mergeforge.engine.torch_executor import TorchExecutor
from pathlib import Path
recipe, out, block_bytes = eval(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
options = MergeOptions(quiet=True, threads=1)
with plan_merge(recipe) as plan:
    write_merge(plan, out, TorchExecutor(options, block_bytes=block_bytes), options)
status = open("/proc/self/status").read()
print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)
"""


def peak_with_blocks(recipe: dict, out: Path, block_bytes: int) -> int:
    result = subprocess.run([sys.executable, "-c", MEASURE, repr(recipe), str(out), str(block_bytes)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_row_blocks_bound_the_memory_of_a_large_tensor_and_give_the_same_bytes(big_models, tmp_path):
    recipe = linear(big_models)
    with plan_merge(recipe) as plan:
        job = next(job for job in plan.jobs if job.method is not None)
        assert job_memory(job, 4) > 300 * 1024**2  # inputs, temporaries and output, whole
        rows = block_rows(job, 4, 8 * 1024**2)
        assert rows is not None and rows < ROWS // 32
    whole = peak_with_blocks(recipe, tmp_path / "whole", 1 << 40)
    blocked = peak_with_blocks(recipe, tmp_path / "blocked", 8 * 1024**2)
    print(f"peak RSS: whole {whole / 1e6:.0f} MB, in 8 MB row blocks {blocked / 1e6:.0f} MB")
    assert whole - blocked > 3 * ROWS * COLUMNS * 4  # at least the three inputs are never held whole
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "blocked" / "model.safetensors").read_bytes()


def test_the_byte_budget_and_the_estimate(big_models):
    from mergeforge.engine.torch_executor import PROCESS_BASELINE_BYTES

    with plan_merge(linear(big_models)) as plan:
        tight = TorchExecutor(MergeOptions(memory_budget="64MB", threads=2))
        roomy = TorchExecutor(MergeOptions(threads=2))
        assert (tight.budget(), roomy.budget()) == (64 * 1000**2, 512 * 1024**2)
        costs = sorted((job_memory(job, 4, block_rows(job, 4, roomy.block_bytes)) for job in plan.jobs), reverse=True)
        assert costs[0] > 64 * 1000**2  # the large tensor is over the tight budget: it runs alone
        assert tight.estimate_peak(plan) == PROCESS_BASELINE_BYTES + costs[0]
        assert roomy.estimate_peak(plan) == PROCESS_BASELINE_BYTES + min(costs[0] + costs[1], roomy.budget())


def test_float64_recipes_compute_in_float64(llama_family, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]), "dtype": "float64", "out_dtype": "float32",
              "models": [{"model": str(llama_family[f"ft{i}"]), "parameters": {"weight": 0.7}} for i in (1, 2)]}
    result = mergeforge.merge(recipe, tmp_path / "out", quiet=True)
    assert result.executor == "torch"
    merged, base = load_state(tmp_path / "out"), load_state(llama_family["base"])
    fts = [load_state(llama_family[f"ft{i}"]) for i in (1, 2)]
    for name, tensor in merged.items():
        merged_delta = torch.zeros_like(base[name], dtype=torch.float64)
        for ft in fts:
            merged_delta += (ft[name].double() - base[name].double()) * 0.7
        expected = merged_delta + base[name].double()
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected.float()), name  # computed in float64, rounded once


def test_integer_tensors_that_differ_without_a_base_are_refused(tmp_path):
    folders = []
    for index in range(2):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        save_file({"w": torch.ones(3) * index, "ids": torch.arange(4) + index}, folder / "model.safetensors")
        folders.append(folder)
    recipe = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 1}} for f in folders]}
    for executor in ("numpy", "torch"):
        with pytest.raises(MethodError, match=r"tensor 'ids' \(torch.int64, not mergeable\) differs between models"):
            mergeforge.merge(recipe, tmp_path / f"out-{executor}", quiet=True, executor=executor)
        assert not (tmp_path / f"out-{executor}").exists()


def test_a_missing_gpu_is_one_clear_error(llama_family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = linear([llama_family["ft1"]])
    with pytest.raises(mergeforge.MergeforgeError, match="--device cuda: CUDA is not available on this machine"):
        mergeforge.merge(recipe, tmp_path / "out", device="cuda", quiet=True)
    assert not (tmp_path / "out").exists()
    options = MergeOptions(device="cuda", quiet=True)
    with plan_merge(recipe) as plan, pytest.raises(mergeforge.MergeforgeError, match="CUDA is not available"):
        write_merge(plan, tmp_path / "out", TorchExecutor(options), options)
