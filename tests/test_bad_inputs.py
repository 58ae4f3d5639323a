"""Every user error gets one clear message naming the file, field or tensor, a non-zero exit and no
traceback; inputs are never modified and no output appears."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, run_cli


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def fails_cleanly(tmp_path: Path, recipe: dict | str, *expected: str, out: Path | None = None, extra: tuple = ()) -> str:
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    out = out or tmp_path / "out"
    result = run_cli("merge", recipe_path, out, "--quiet", *extra)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    if out != tmp_path / "existing":
        assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.mergeforge-tmp-*"))
    return lines[0]


@pytest.fixture
def pair(llama_family):
    return str(llama_family["base"]), str(llama_family["ft1"])


def test_missing_model_folder(tmp_path, pair):
    fails_cleanly(tmp_path, {"merge_method": "linear", "models": [{"model": str(tmp_path / "nope"), "parameters": {"weight": 1}}]},
                  "nope", "not found")


def test_hub_id_not_in_cache(tmp_path, pair, monkeypatch):
    fails_cleanly(tmp_path, {"merge_method": "linear", "models": [{"model": "someorg/somemodel", "parameters": {"weight": 1}}]},
                  "someorg/somemodel", "local Hugging Face cache")


def test_hub_id_resolves_from_local_cache(tmp_path, pair):
    base, ft = pair
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(ft, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "acme/tiny", "parameters": {"weight": 1}}]}))
    env = {**os.environ, "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "mergeforge", "merge", str(recipe), str(tmp_path / "out"), "-q"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert load_state(tmp_path / "out").keys() == load_state(Path(ft)).keys()


def test_unknown_method_lists_known(tmp_path, pair):
    line = fails_cleanly(tmp_path, {"merge_method": "tiez", "models": [{"model": pair[0]}]}, "unknown method 'tiez'", "Did you mean 'ties'")
    assert "linear" in line


def test_misspelled_parameter_suggests(tmp_path, pair):
    base, ft = pair
    fails_cleanly(tmp_path, {"merge_method": "ties", "base_model": base,
                             "models": [{"model": ft, "parameters": {"weight": 1, "densty": 0.5}}]},
                  "unknown parameter 'densty'", "Did you mean 'density'", ft)


def test_unknown_recipe_field(tmp_path, pair):
    fails_cleanly(tmp_path, {"merge_method": "linear", "base_modle": pair[0], "models": [{"model": pair[1], "parameters": {"weight": 1}}]},
                  "base_modle", "did you mean 'base_model'")


@pytest.mark.parametrize("density", [0, 1.5, -0.2])
def test_density_out_of_range(tmp_path, pair, density):
    base, ft = pair
    fails_cleanly(tmp_path, {"merge_method": "ties", "base_model": base,
                             "models": [{"model": ft, "parameters": {"weight": 1, "density": density}}]},
                  "density", "(0, 1]")


def test_method_needs_base(tmp_path, pair):
    fails_cleanly(tmp_path, {"merge_method": "task_arithmetic", "models": [{"model": pair[1], "parameters": {"weight": 1}}]},
                  "task_arithmetic", "needs a base_model")


def test_required_parameter_missing(tmp_path, pair):
    fails_cleanly(tmp_path, {"merge_method": "linear", "models": [{"model": pair[1]}]}, "weight", "required")


def test_global_parameter_at_model_level(tmp_path, pair):
    base, ft = pair
    fails_cleanly(tmp_path, {"merge_method": "ties", "base_model": base,
                             "models": [{"model": ft, "parameters": {"weight": 1, "normalize": False}}]},
                  "'normalize' is a global parameter")


def test_bad_yaml(tmp_path):
    fails_cleanly(tmp_path, "merge_method: linear\nmodels: [\n", "recipe.yml", "not valid YAML")


def test_shape_mismatch(tmp_path, pair):
    from safetensors.torch import save_file

    state = load_state(Path(pair[1]))
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(65, 32)
    other = tmp_path / "other"
    other.mkdir()
    save_file(state, other / "model.safetensors")
    fails_cleanly(tmp_path, {"merge_method": "linear", "models": [{"model": pair[1], "parameters": {"weight": 1}},
                                                                  {"model": str(other), "parameters": {"weight": 1}}]},
                  "tensor 'model.layers.2.mlp.up_proj.weight'", "shape [65, 32]", "[64, 32]")


def test_layer_count_mismatch(tmp_path, model_factory, pair):
    other = model_factory("mistral", "mistral-other")
    fails_cleanly(tmp_path, {"merge_method": "linear", "models": [{"model": pair[1], "parameters": {"weight": 1}},
                                                                  {"model": str(other), "parameters": {"weight": 1}}]},
                  "3 layers", "4")


def test_tensor_missing_without_base(tmp_path, pair):
    from safetensors.torch import save_file

    state = load_state(Path(pair[1]))
    state.pop("model.layers.1.mlp.up_proj.weight")
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, broken / "model.safetensors")
    fails_cleanly(tmp_path, {"merge_method": "linear", "models": [{"model": pair[1], "parameters": {"weight": 1}},
                                                                  {"model": str(broken), "parameters": {"weight": 1}}]},
                  "model.layers.1.mlp.up_proj.weight", "not found", "broken")


def corrupt_copy(tmp_path: Path, source: str, mutate) -> Path:
    target = tmp_path / "corrupt"
    shutil.copytree(source, target)
    file = target / "model.safetensors"
    data = bytearray(file.read_bytes())
    file.write_bytes(bytes(mutate(data)))
    return target


def _header(data: bytearray) -> tuple[int, dict]:
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8 : 8 + length])


def _with_header(data: bytearray, header: dict) -> bytearray:
    length, _ = _header(data)
    raw = json.dumps(header).encode()
    raw += b" " * (length - len(raw)) if len(raw) <= length else b""
    return bytearray(len(raw).to_bytes(8, "little")) + raw + data[8 + length :]


def _shift_offsets(data: bytearray) -> bytearray:
    _, header = _header(data)
    name = sorted(k for k in header if k != "__metadata__")[1]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 4, end - 4]
    return _with_header(data, header)


def _out_of_range(data: bytearray) -> bytearray:
    _, header = _header(data)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 10**9, end + 10**9]
    return _with_header(data, header)


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: (10**12).to_bytes(8, "little") + d[8:], "exceeds"),
    (lambda d: (len(d)).to_bytes(8, "little") + d[8:], "runs past the end"),
    (lambda d: d[:8] + b"{not json" + d[17:], "not valid JSON"),
    (lambda d: d[: len(d) - 100], "truncated"),
    (_shift_offsets, "overlaps"),
    (_out_of_range, "hole"),
])
def test_corrupt_safetensors(tmp_path, pair, mutate, expected):
    corrupt = corrupt_copy(tmp_path, pair[1], mutate)
    fails_cleanly(tmp_path, {"merge_method": "linear", "models": [{"model": str(corrupt), "parameters": {"weight": 1}}]},
                  "corrupt", "model.safetensors", expected)


def test_out_dir_inside_input(tmp_path, pair, llama_family):
    before = tree_digest(Path(pair[1]))
    for out in (Path(pair[1]), Path(pair[1]) / "merged"):
        recipe = tmp_path / "r.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": pair[1], "parameters": {"weight": 1}}]}))
        result = run_cli("merge", recipe, out, "--quiet", "--overwrite")
        assert result.returncode != 0 and "input model folder" in result.stderr and "Traceback" not in result.stderr
    assert tree_digest(Path(pair[1])) == before


def test_non_empty_out_dir_needs_overwrite(tmp_path, pair):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    recipe = {"merge_method": "linear", "models": [{"model": pair[1], "parameters": {"weight": 1}}]}
    fails_cleanly(tmp_path, recipe, "not empty", "--overwrite", out=existing)
    assert (existing / "keep.txt").read_text() == "precious"
    result = run_cli("merge", tmp_path / "recipe.yml", existing, "--quiet", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 192 KiB tmpfs (needs root, as on our machines and CI); skipped where mount is refused."""
    mount_point = tmp_path / "tinyfs"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


EXECUTORS = ["numpy", "torch"]


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("fill", [0, 150_000, 20_000])
def test_disk_full(tmp_path, pair, tiny_filesystem, fill, executor):
    # 0 and 150 kB: the weights do not fit (found before anything is written); 20 kB: the weights fit,
    # the files written after them (tokenizer, config, card) do not.
    filler = tiny_filesystem / "filler.bin"
    filler.write_bytes(b"x" * fill)
    out = tiny_filesystem / "out"
    line = fails_cleanly(tmp_path, {"merge_method": "linear", "models": [{"model": pair[1], "parameters": {"weight": 1}}]},
                         "disk full", out=out, extra=("--executor", executor))
    assert str(tiny_filesystem) in line
    assert sorted(p.name for p in tiny_filesystem.iterdir()) == ["filler.bin"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_inputs_never_modified(tmp_path, llama_family, executor):
    digests = {name: tree_digest(path) for name, path in llama_family.items()}
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(llama_family["base"]), "models": [
        {"model": str(llama_family[f"ft{i}"]), "parameters": {"weight": 1, "density": 0.5}} for i in (1, 2, 3)]}))
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet", "--executor", executor).returncode == 0
    assert {name: tree_digest(path) for name, path in llama_family.items()} == digests


@pytest.mark.parametrize("executor", EXECUTORS)
def test_killed_merge_leaves_no_output_and_keeps_existing(tmp_path, model_factory, executor):
    """SIGKILL and SIGTERM mid-merge: OUT_DIR is either absent or the previous complete model."""
    from safetensors.torch import save_file

    big = tmp_path / "big"
    big.mkdir()
    generator = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.mlp.weight": torch.randn(1024, 1024, generator=generator) for i in range(24)}, big / "model.safetensors")
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "model.safetensors").symlink_to(big / "model.safetensors")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(big),
                                      "models": [{"model": str(twin), "parameters": {"weight": 1, "density": 0.3}}]}))
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "previous.txt").write_text("complete model")
    for sig, out, args in ((signal.SIGKILL, tmp_path / "fresh", ()), (signal.SIGTERM, existing, ("--overwrite",))):
        process = subprocess.Popen([sys.executable, "-m", "mergeforge", "merge", str(recipe), str(out), "--threads", "1",
                                    "--executor", executor, *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(f".{out.name}.mergeforge-tmp-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert process.poll() is None, "merge finished before it could be interrupted"
        process.send_signal(sig)
        process.wait(timeout=60)
        assert process.returncode != 0
        if sig == signal.SIGTERM:
            assert not list(tmp_path.glob(f".{out.name}.mergeforge-tmp-*")), "temporary folder left after SIGTERM"
            assert "Traceback" not in process.stderr.read()
    assert not (tmp_path / "fresh").exists()
    assert (existing / "previous.txt").read_text() == "complete model"
    # The next run removes what SIGKILL left behind and completes.
    result = run_cli("merge", recipe, tmp_path / "fresh", "--quiet", "--executor", executor)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob(".fresh.mergeforge-tmp-*"))
