"""MergeStrategy on Flower's two runtimes, with ``flwr run`` of examples/flower_app (slow: about a
minute each): the deployment runtime (a SuperLink and two SuperNodes started as subprocesses on
localhost) and the simulation runtime (a SuperLink in simulation mode, whose SuperNodes are
virtual clients on Ray; skipped where Ray is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_command(name: str) -> list[str]:
    """A Flower console script, run by this interpreter (its shebang may name another)."""
    script = shutil.which(name) or str(Path(sys.executable).parent / name)
    for folder in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        candidate = Path(folder) / "bin" / name
        if folder and candidate.is_file():
            script = str(candidate)
    return [sys.executable, script]


@pytest.fixture
def federation(tmp_path):
    """SuperLink + 2 SuperNodes; yields (env, connection name); stops them by pid afterwards."""
    link = free_port()  # Flower 1.42 serves the control, fleet and runtime APIs over HTTP on one port
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "localtest"\n\n[superlink.localtest]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        [str(APP), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    env["PATH"] = os.pathsep.join([str(Path(flower_command("flwr")[1]).parent), env.get("PATH", "")])
    processes = [subprocess.Popen([*flower_command("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                                   "--port", str(link)],
                                  env=env, stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT)]
    time.sleep(3)
    for partition in (0, 1):
        processes.append(subprocess.Popen([*flower_command("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                                           "--port", str(free_port()), "--node-config", f"partition-id={partition}"],
                                          env=env, stdout=open(tmp_path / f"supernode{partition}.log", "w"),
                                          stderr=subprocess.STDOUT))
    try:
        yield env, "localtest"
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def mse_per_round(run: subprocess.CompletedProcess[str], tmp_path: Path) -> dict[int, float]:
    """The server app's printed curve, or a failure with every log."""
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert run.returncode == 0, run.stdout + run.stderr + logs
    output = run.stdout + run.stderr
    line = next((line for line in output.splitlines() if "mse per round" in line), None)
    assert line is not None, output + logs
    return {int(r): value for r, value in json.loads(line.split("mse per round", 1)[1]).items()}


def test_merge_strategy_trains_on_a_superlink_and_two_supernodes(federation, tmp_path):
    env, connection = federation
    run = subprocess.run([*flower_command("flwr"), "run", str(APP), connection, "--stream"], env=env, capture_output=True,
                         text=True, timeout=300)
    mse = mse_per_round(run, tmp_path)
    print("deployment mse per round:", mse)  # shown with pytest -s (docs/federated.md quotes it)
    assert mse[max(mse)] < mse[0], mse


def test_merge_strategy_trains_on_flowers_simulation_runtime(tmp_path):
    pytest.importorskip("ray")
    link = free_port()
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "localsim"\n\n[superlink.localsim]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        [str(APP), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    env["PATH"] = os.pathsep.join([str(Path(flower_command("flwr")[1]).parent), env.get("PATH", "")])
    superlink = subprocess.Popen([*flower_command("flower-superlink"), "--insecure", "--simulation",
                                  "--disable-runtime-dependency-installation", "--port", str(link)],
                                 env=env, stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT)
    try:
        time.sleep(3)
        # Two virtual SuperNodes, one CPU each: the simulation engine runs their ClientApps on Ray.
        run = subprocess.run([*flower_command("flwr"), "run", str(APP), "localsim", "--stream", "--federation-config",
                              "num-supernodes=2 client-resources-num-cpus=1"],
                             env=env, capture_output=True, text=True, timeout=400)
    finally:
        superlink.send_signal(signal.SIGTERM)
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            superlink.kill()
    mse = mse_per_round(run, tmp_path)
    print("simulation mse per round:", mse)
    assert mse[max(mse)] < mse[0], mse
