import os
import subprocess
import sys

from mergeforge import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergeforge", *args], capture_output=True, text=True)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_methods_lists_every_builtin():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    for name in ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "passthrough"]:
        assert name in result.stdout


def test_unknown_method_suggests():
    result = run_cli("methods", "tiez")
    assert result.returncode == 2
    assert "Did you mean 'ties'" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_commands_without_loading_torch():
    # --help must stay instant: torch alone costs seconds to import, so no command module may pull it in.
    script = (
        "import sys\n"
        "from mergeforge.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "merge " in result.stdout and "methods" in result.stdout and "demo" in result.stdout
    assert "HEAVY []" in result.stdout


def test_unknown_command_is_one_line():
    result = run_cli("mergee")
    assert result.returncode == 2
    assert "No such command" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_optional_package_gets_an_install_hint(tmp_path):
    # A transformers that cannot be imported, as on an install without the [hf] extra.
    blocked = tmp_path / "blocked" / "transformers"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'transformers'\", name='transformers')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "mergeforge", "demo", "--workdir", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: this needs transformers, which is not installed: pip install 'mergeforge[hf]'"
