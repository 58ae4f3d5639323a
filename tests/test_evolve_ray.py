"""``mergeforge evolve --ray-address``: the refusals (Ray missing, nothing at the address), and the
pipelined search on a local Ray cluster that the test starts itself, against the process pool's
journal, stopped and resumed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run_cli
from evolve_support import path_search, pooled_journal, write_search

pytest.importorskip("cma")

SRC = Path(__file__).resolve().parents[1] / "src"
RAY_BUDGET = {"evaluations": 14}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ray_missing_is_one_line_with_the_install_hint(tmp_path):
    path = write_search(tmp_path / "search.yml", path_search(tmp_path))
    script = ("import sys\nsys.modules['ray'] = None  # as if Ray were not installed\n"
              "from mergeforge.cli import main\n"
              f"main(['evolve', {str(path)!r}, {str(tmp_path / 'out')!r}, '--ray-address', 'auto'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --ray-address auto: Ray is not installed; pip install 'mergeforge[ray]'"
    assert not (tmp_path / "out").exists()


def test_an_address_where_nothing_answers_is_refused_at_once(tmp_path):
    pytest.importorskip("ray")
    path = write_search(tmp_path / "search.yml", path_search(tmp_path))
    started = time.perf_counter()
    result = run_cli("evolve", path, tmp_path / "out", "--ray-address", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nothing answers there" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - started < 30  # ray.init itself waits minutes on a dead address
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster of 2 CPUs, started here (``ray start --head --block``) and stopped
    by signalling that process, which ends the processes it started (``ray stop`` would end every
    Ray process on the machine, other users' clusters included). Its own temporary folder (short:
    Ray's socket paths are limited) and its own free ports, so that it never meets another cluster."""
    pytest.importorskip("ray")
    ray = Path(sys.executable).with_name("ray")
    if not ray.is_file():
        pytest.skip("the ray command is not installed beside this Python")
    temp_dir = tempfile.mkdtemp(prefix="mfray", dir="/tmp")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])  # the actors import mergeforge
    ports = {flag: str(free_port()) for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                                                 "--metrics-export-port", "--dashboard-port")}
    command = [str(ray), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port), "--temp-dir", temp_dir,
               "--include-dashboard", "false", "--disable-usage-stats", *[x for pair in ports.items() for x in pair]]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, "ray start --head exited"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)  # the raylet registers after the GCS answers
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow  # a Ray cluster (about 5 s and 360 MB), a process-pool run and two Ray runs: about 60 s on 2 cores
def test_a_search_on_a_local_ray_cluster_is_the_pooled_search_and_resumes_exactly(tiny_zoo_dir, tmp_path, ray_cluster):
    from mergeforge.evolve.api import run_search

    reference = run_search(path_search(tiny_zoo_dir, budget=RAY_BUDGET), tmp_path / "processes", workers=2)
    path = write_search(tmp_path / "search.yml", path_search(tiny_zoo_dir, budget={"evaluations": 6}))
    stopped = run_cli("evolve", path, tmp_path / "ray", "--ray-address", ray_cluster)
    assert stopped.returncode == 0, stopped.stderr
    assert "scoring on 2 Ray actors at" in stopped.stderr and len(pooled_journal(tmp_path / "ray")) == 6
    refused = run_cli("evolve", path, tmp_path / "refused", "--ray-address", ray_cluster, "--workers", "3", "--quiet")
    assert refused.returncode == 2 and "--workers 3 needs one free CPU each, and the cluster has 2 free" in refused.stderr
    write_search(path, path_search(tiny_zoo_dir, budget=RAY_BUDGET))
    resumed = run_cli("evolve", path, tmp_path / "ray", "--ray-address", ray_cluster, "--workers", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "scoring on 1 Ray actor at" in resumed.stderr
    assert pooled_journal(tmp_path / "ray") == pooled_journal(tmp_path / "processes") and len(pooled_journal(tmp_path / "processes")) == 14
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert report["best"] == reference["best"] and report["reproduction"]["difference"] == 0.0
    assert report["executor"] == f"1 Ray actor at {ray_cluster}"
    assert (tmp_path / "ray" / "winner.yml").read_text() == (tmp_path / "processes" / "winner.yml").read_text()


@pytest.mark.slow  # shares the cluster above; one actor that fails to start: about 10 s
def test_a_ray_worker_that_cannot_load_the_sources_is_one_error(tiny_zoo_dir, tmp_path, ray_cluster):
    from mergeforge.errors import MergeforgeError
    from mergeforge.evolve.config import load_search_config
    from mergeforge.evolve.ray_workers import RayExecutor

    config, folder = load_search_config(path_search(tiny_zoo_dir, budget=RAY_BUDGET))
    data = config.model_dump(mode="json")
    data["layer_path"]["models"][0] = str(tmp_path / "missing_on_this_node")
    with pytest.raises(MergeforgeError, match="a Ray worker could not load the search's sources: .*missing_on_this_node") as caught:
        RayExecutor(ray_cluster, 1, data, folder, tmp_path)
    assert "\n" not in str(caught.value), str(caught.value)
