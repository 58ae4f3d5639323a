"""MergeStrategy on Flower's deployment runtime: a SuperLink and two SuperNodes started as
subprocesses on localhost, and ``flwr run`` of examples/flower_app on them (slow: about a minute)."""

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


def test_merge_strategy_trains_on_a_superlink_and_two_supernodes(federation, tmp_path):
    env, connection = federation
    run = subprocess.run([*flower_command("flwr"), "run", str(APP), connection, "--stream"], env=env, capture_output=True,
                         text=True, timeout=300)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert run.returncode == 0, run.stdout + run.stderr + logs
    output = run.stdout + run.stderr
    line = next((line for line in output.splitlines() if "mse per round" in line), None)
    assert line is not None, output + logs
    mse = {int(r): value for r, value in json.loads(line.split("mse per round", 1)[1]).items()}
    print("deployment mse per round:", mse)  # shown with pytest -s (docs/federated.md quotes it)
    assert mse[max(mse)] < mse[0], mse
