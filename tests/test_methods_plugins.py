"""Third-party merge methods: the entry-point plugin in examples/plugin_method, discovered from a
PYTHONPATH folder with a generated ``*.dist-info`` (what ``pip install`` would write, without
touching the venv), and the in-process decorator path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import load_state
from methods_support import resolve_params, seeded

from mergeforge.errors import RecipeError
from mergeforge.methods import BaseUse, Param, all_methods, get_method, register_method

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_method"


def install_without_pip(site: Path, package_dir: Path, pyproject: Path) -> None:
    """Copy the package into ``site`` and write the dist-info that importlib.metadata reads."""
    project = tomllib.loads(pyproject.read_text())["project"]
    shutil.copytree(package_dir, site / package_dir.name)
    dist_info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    groups = project["entry-points"]
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def run_with_site(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)


def write_broken_plugin(root: Path) -> tuple[Path, Path]:
    """A plugin whose import fails, as one with a missing dependency would."""
    package = root / "broken_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('missing dependency xyz')\n")
    pyproject = root / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "broken-plugin"\nversion = "0.0.1"\n'
        '[project.entry-points."mergeforge.methods"]\nbroken = "broken_plugin"\n'
    )
    return package, pyproject


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    install_without_pip(site, EXAMPLE / "mergeforge_winsorized_mean", EXAMPLE / "pyproject.toml")
    return site


def test_the_example_declares_its_module_in_the_mergeforge_methods_group():
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["mergeforge.methods"] == {"winsorized_mean": "mergeforge_winsorized_mean"}


def test_the_cli_lists_the_plugin_with_its_parameters_and_survives_a_broken_one(plugin_site, tmp_path):
    # A fresh interpreter, as a user would run it; the broken plugin sits next to the good one.
    site = tmp_path / "site"
    shutil.copytree(plugin_site, site)
    install_without_pip(site, *write_broken_plugin(tmp_path / "broken_src"))
    listing = run_with_site(site, "-m", "mergeforge", "methods")
    assert listing.returncode == 0, listing.stderr
    assert "winsorized_mean  (plugin: mergeforge_winsorized_mean)" in listing.stdout
    assert "- trim (global, default 0.2, range [0, 0.5)): fraction of models clamped at each end" in listing.stdout
    assert "ref: Tukey 1962, winsorized mean (Ann. Math. Statist. 33(1))" in listing.stdout
    assert "ties  [needs base_model]" in listing.stdout  # built-ins are still there
    assert "plugin 'broken' (broken_plugin) failed to load: missing dependency xyz" in listing.stderr


@pytest.fixture
def plugin_on_path(plugin_site, scratch_methods, monkeypatch):
    """The example plugin discoverable in this process, as if pip-installed; undone afterwards."""
    monkeypatch.syspath_prepend(str(plugin_site))
    yield
    sys.modules.pop("mergeforge_winsorized_mean", None)


def test_the_plugin_is_found_by_name_and_computes_a_winsorized_mean(plugin_on_path):
    method = get_method("winsorized_mean")  # an unknown name triggers the entry-point scan
    assert method.plugin == "mergeforge_winsorized_mean" and method.elementwise
    assert method.base is BaseUse.NONE
    values = [[1.0, 10.0], [2.0, -50.0], [3.0, 11.0], [100.0, 12.0], [4.0, 13.0]]
    params = resolve_params(method, 5, {"trim": 0.2})
    out = method.run([torch.tensor(v) for v in values], None, params)
    # 5 models, trim 0.2: clamp one value at each end -> means of [2, 2, 3, 4, 4] and [10, 10, 11, 12, 12].
    torch.testing.assert_close(out, torch.tensor([3.0, 11.0]))
    with pytest.raises(RecipeError, match=r"'trim' = 0.5 is outside its valid range \[0, 0.5\)"):
        resolve_params(method, 5, {"trim": 0.5})


def test_a_merge_uses_the_plugin_with_the_engines_validation(plugin_on_path, llama_family, tmp_path):
    import mergeforge

    models = [llama_family[name] for name in ("base", "ft1", "ft2", "ft3")]
    recipe = {
        "merge_method": "winsorized_mean",
        "models": [{"model": str(path)} for path in models],
        "parameters": {"trim": 0.25},
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    mergeforge.merge(recipe, out, quiet=True)

    merged = load_state(out)
    states = [load_state(path) for path in models]
    assert merged.keys() == states[0].keys()
    for name, tensor in merged.items():
        # 4 models, trim 0.25: clamp the smallest and the largest to the middle two, whose mean it is.
        ordered = torch.stack([state[name] for state in states]).sort(dim=0).values
        torch.testing.assert_close(tensor, (ordered[1] + ordered[2]) / 2)

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)

    with pytest.raises(RecipeError, match="'trim'"):
        mergeforge.merge({**recipe, "parameters": {"trim": 0.7}}, tmp_path / "never", quiet=True)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- decorator, in-process


def test_the_decorator_registers_a_method_with_validation(scratch_methods):
    @register_method(
        "scaled_sum_for_test",
        params=[
            Param("weight", 1.0, per_model=True, help="the model's weight"),
            Param("gain", 1.0, low=0.0, low_open=True, help="overall scale"),
        ],
        base=BaseUse.REQUIRED,
        math="θ_base + gain·Σ wᵢ(θᵢ − θ_base)",
        citation="test",
        aliases=["scaled_sum_alias"],
    )
    def scaled_sum(tensors, base, *, weight, gain):
        return base + gain * sum(w * (t - base) for w, t in zip(weight, tensors, strict=True))

    method = get_method("scaled_sum_for_test")
    assert get_method("scaled_sum_alias") is method
    assert method in all_methods()
    assert method.plugin == __name__  # registered outside mergeforge, so shown as a plugin

    base, first, second = seeded(3, seed=1), seeded(3, seed=2), seeded(3, seed=3)
    params = resolve_params(method, 2, {"weight": [0.5, 2.0], "gain": 3.0})
    out = method.run([first, second], base, params)
    torch.testing.assert_close(out, base + 3.0 * (0.5 * (first - base) + 2.0 * (second - base)))

    with pytest.raises(RecipeError, match="'gain' = 0 is outside its valid range"):
        resolve_params(method, 2, {"gain": 0.0})


def test_scratch_registrations_do_not_leak():
    with pytest.raises(RecipeError, match="unknown method 'scaled_sum_for_test'"):
        get_method("scaled_sum_for_test")
