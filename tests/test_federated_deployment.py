"""MergeStrategy on Flower's two runtimes (slow: about a minute each): the deployment runtime (a
SuperLink and two SuperNodes started as subprocesses on localhost) and the simulation runtime
(virtual SuperNodes on Ray; skipped where Ray is not installed).

- ``flwr run`` of examples/flower_app, a small regression, on both;
- the tiny zoo's federation of ``mergeforge federated`` (examples/zoo_flower_app, whose apps are
  ``mergeforge.federated.flower_app``) with ``flwr run`` on the SuperLink and SuperNodes, and with
  ``mergeforge federated --runtime simulation``: its global model must improve every round."""

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
ZOO_APP = ROOT / "examples" / "zoo_flower_app"


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


def flower_env(tmp_path: Path, connection: str, link: int) -> dict[str, str]:
    """The environment of the Flower commands: a FLWR_HOME whose config names the SuperLink at
    ``link`` as ``connection``, the example app importable, Flower's scripts on the PATH."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        [str(APP), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    env["PATH"] = os.pathsep.join([str(Path(flower_command("flwr")[1]).parent), env.get("PATH", "")])
    return env


@pytest.fixture
def federation(tmp_path):
    """SuperLink + 2 SuperNodes; yields (env, connection name); stops them by pid afterwards."""
    link = free_port()  # Flower 1.42 serves the control, fleet and runtime APIs over HTTP on one port
    env = flower_env(tmp_path, "localtest", link)
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


@pytest.fixture
def simulation_link(tmp_path):
    """A SuperLink in simulation mode (its SuperNodes are virtual, on Ray); yields (env,
    connection name); stops it by pid afterwards."""
    pytest.importorskip("ray")
    link = free_port()
    env = flower_env(tmp_path, "localsim", link)
    superlink = subprocess.Popen([*flower_command("flower-superlink"), "--insecure", "--simulation",
                                  "--disable-runtime-dependency-installation", "--port", str(link)],
                                 env=env, stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT)
    try:
        time.sleep(3)
        yield env, "localsim"
    finally:
        superlink.send_signal(signal.SIGTERM)
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            superlink.kill()


# Two virtual SuperNodes, one CPU each: the simulation engine runs their ClientApps on Ray.
TWO_VIRTUAL_NODES = ["--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]


def test_merge_strategy_trains_on_flowers_simulation_runtime(simulation_link, tmp_path):
    env, connection = simulation_link
    run = subprocess.run([*flower_command("flwr"), "run", str(APP), connection, "--stream", *TWO_VIRTUAL_NODES],
                         env=env, capture_output=True, text=True, timeout=400)
    mse = mse_per_round(run, tmp_path)
    print("simulation mse per round:", mse)
    assert mse[max(mse)] < mse[0], mse


def zoo_scenario(tmp_path: Path, zoo: Path) -> Path:
    """Two clients (the fixture's two SuperNodes) sharing three skills, client 0 count and sort,
    client 1 sort and translate; 3 rounds of 40 local steps: the regime in which the in-process
    run learns every round (docs/federated.md), small enough for a minute on 2 cores."""
    path = tmp_path / "zoo_scenario.yml"
    path.write_text(f"zoo: {zoo}\nskills: [count, sort, translate]\nclients: 2\nskills_per_client: 2\n"
                    "examples_per_client: 100\nrounds: 3\nlocal_steps: 40\neval_examples: 32\n"
                    "aggregators:\n  - {method: linear, name: fedavg}\n")
    return path


def assert_improves_every_round(rounds: list[dict]) -> None:
    losses = [r["loss"] for r in rounds]
    accuracies = [r["accuracy"] for r in rounds]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert accuracies[-1] > accuracies[0], accuracies


def test_the_zoo_federation_trains_on_a_superlink_and_two_supernodes(federation, tiny_zoo_dir, tmp_path):
    env, connection = federation
    scenario, out = zoo_scenario(tmp_path, tiny_zoo_dir), tmp_path / "out"
    started = time.perf_counter()
    run = subprocess.run([*flower_command("flwr"), "run", str(ZOO_APP), connection, "--stream", "--run-config",
                          f"scenario='{scenario}' out-dir='{out}'"], env=env, capture_output=True, text=True, timeout=400)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert run.returncode == 0 and (out / "results.json").is_file(), run.stdout + run.stderr + logs
    result = json.loads((out / "results.json").read_text())
    rounds = result["aggregators"]["fedavg"]["rounds"]
    print(f"deployment, zoo: {[(r['accuracy'], r['loss']) for r in rounds]} in {time.perf_counter() - started:.0f} s")
    assert result["shards"] == {"node 101": ["count", "sort"], "node 102": ["sort", "translate"]}
    assert all(r["bytes_up"] == r["bytes_down"] > 0 for r in rounds[1:])  # both nodes replied, every round
    assert_improves_every_round(rounds)


def test_the_zoo_federation_trains_on_flowers_simulation_runtime_from_the_cli(tiny_zoo_dir, tmp_path):
    pytest.importorskip("ray")
    scenario, out = zoo_scenario(tmp_path, tiny_zoo_dir), tmp_path / "out"
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mergeforge", "federated", str(scenario), str(out), "--runtime", "simulation"],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    rounds = json.loads((out / "results.json").read_text())["aggregators"]["fedavg"]["rounds"]
    print(f"simulation, zoo: {[(r['accuracy'], r['loss']) for r in rounds]} in {time.perf_counter() - started:.0f} s")
    assert "| fedavg |" in run.stdout
    assert all(r["bytes_up"] == r["bytes_down"] > 0 for r in rounds[1:])
    assert_improves_every_round(rounds)


def test_the_zoo_federation_trains_with_flwr_run_on_a_simulation_superlink(simulation_link, tiny_zoo_dir, tmp_path):
    env, connection = simulation_link
    scenario, out = zoo_scenario(tmp_path, tiny_zoo_dir), tmp_path / "out"
    started = time.perf_counter()
    run = subprocess.run([*flower_command("flwr"), "run", str(ZOO_APP), connection, "--stream", *TWO_VIRTUAL_NODES,
                          "--run-config", f"scenario='{scenario}' out-dir='{out}'"],
                         env=env, capture_output=True, text=True, timeout=400)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert run.returncode == 0 and (out / "results.json").is_file(), run.stdout + run.stderr + logs
    rounds = json.loads((out / "results.json").read_text())["aggregators"]["fedavg"]["rounds"]
    print(f"simulation SuperLink, zoo: {[(r['accuracy'], r['loss']) for r in rounds]} in {time.perf_counter() - started:.0f} s")
    assert all(r["bytes_up"] == r["bytes_down"] > 0 for r in rounds[1:])
    assert_improves_every_round(rounds)
