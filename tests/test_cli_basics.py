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
