"""The README's merge examples run as written: its recipe, its shell commands and its Python, on
tiny bf16 models put where the README's paths point."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_state

README = Path(__file__).resolve().parents[1] / "README.md"


def merge_section_blocks() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Merge models")
    section = text[start:text.index("\n## ", start)]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    return {language: body for language, body in blocks}


@pytest.fixture(scope="module")
def readme_folder(model_factory, tmp_path_factory) -> Path:
    """A working folder where the README's model paths exist."""
    folder = tmp_path_factory.mktemp("readme")
    base = model_factory("llama", "readme-base", seed=0, dtype=torch.bfloat16)
    experts = {"math-expert": model_factory("llama", "readme-math", seed=1, base=base, dtype=torch.bfloat16),
               "code-expert": model_factory("llama", "readme-code", seed=2, base=base, dtype=torch.bfloat16)}
    (folder / "path" / "to").mkdir(parents=True)
    for name, path in {"base": base, **experts}.items():
        (folder / "path" / "to" / name).symlink_to(path, target_is_directory=True)
    blocks = merge_section_blocks()
    (folder / "ties.yml").write_text(blocks["yaml"], encoding="utf-8")
    return folder


def test_the_readme_recipe_and_commands_run(readme_folder):
    commands = [line.split("#")[0].split() for line in merge_section_blocks()["bash"].splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["mergeforge", "merge"], ["mergeforge", "merge"], ["mergeforge", "methods"]]
    outputs = []
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "mergeforge", *command[1:]], cwd=readme_folder, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr)
        outputs.append(result.stdout)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(readme_folder / "merged")
    assert model.config.num_hidden_layers == 4
    assert "executor: numpy" in outputs[1] and "ties  [needs base_model]" in outputs[2]


def test_the_readme_python_runs(readme_folder, monkeypatch, capsys):
    monkeypatch.chdir(readme_folder)
    states = {name: load_state(readme_folder / "path" / "to" / name) for name in ("base", "math-expert", "code-expert")}
    name = "model.layers.0.mlp.up_proj.weight"
    namespace = {"sd_0": states["base"], "sd_a": states["math-expert"], "sd_b": states["code-expert"],
                 "a": states["base"][name], "b": states["math-expert"][name]}
    exec(compile(merge_section_blocks()["python"], str(README), "exec"), namespace)
    assert capsys.readouterr().out.split()[0] == "numpy"
    assert (readme_folder / "merged-api" / "model.safetensors").is_file()
    assert load_state(readme_folder / "merged-api")[name].dtype == torch.float16
    assert set(namespace["merged"]) == set(states["base"])
    assert namespace["tensor"].shape == states["base"][name].shape
