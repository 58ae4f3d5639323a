"""One parameter-space search on the tiny zoo run three ways: serially, with ``--workers 2``
(processes) and with ``--ray-address`` on a 2-CPU Ray cluster this script starts (``ray start
--head --block``, its own temporary folder and ports) and stops (by signalling that process, not
``ray stop``, which would end every Ray process on the machine).

    PYTHONPATH=src python benchmarks/evolve_executors.py runs/executors [--evaluations 66] [--minibatch 0]

Prints, per run: the wall time of the whole command, the mean seconds per candidate (its own
merge and scoring, on its worker), the load average after it, the best fitness on the search
split and the test mean; and whether the Ray journal equals the process pool's (the pipeline's
guarantee) and the serial one (not expected: the pipeline tells each generation one update late).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXPERTS = ("reverse", "sort", "shift", "count", "translate", "brackets")


def search(zoo: Path, evaluations: int, minibatch: int) -> dict[str, Any]:
    """TIES over the six experts: weight and density per model, a global λ (13 genes)."""
    config: dict[str, Any] = {
        "merge_method": "ties", "base_model": str(zoo / "models" / "base"),
        "models": [str(zoo / "models" / f"expert_{name}") for name in EXPERTS],
        "search": {"weight": {"low": 0.0, "high": 2.0}, "density": {"low": 0.1, "high": 1.0},
                   "lambda": {"low": 0.5, "high": 2.5}},
        "fitness": [{"task": str(zoo / "tasks" / name)} for name in EXPERTS],
        "budget": {"evaluations": evaluations}, "seed": 0, "baselines": [],
        "splits": {"test_examples": 100},
    }
    if minibatch:
        config["splits"]["minibatch"] = minibatch
    return config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_ray(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, str]:
    temp_dir = tempfile.mkdtemp(prefix="mfray", dir="/tmp")
    port = free_port()
    flags = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port", "--dashboard-port")
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
               "--temp-dir", temp_dir, "--include-dashboard", "false", "--disable-usage-stats",
               *[part for flag in flags for part in (flag, str(free_port()))]]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    time.sleep(2)
    return process, f"127.0.0.1:{port}", temp_dir


def journal(folder: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (folder / "journal.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in e.items() if k != "timing"} for e in lines), key=lambda e: (e["generation"], e["candidate"]))


def run(name: str, out: Path, path: Path, env: dict[str, str], *extra: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mergeforge", "evolve", str(path), str(out / name), "--quiet", *extra],
                            env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name}: {result.stderr.strip()}")
    report = json.loads((out / name / "report.json").read_text())
    winner = report["test"][-1]
    return {"name": name, "wall_s": wall, "load_after": os.getloadavg()[0], "executor": report["executor"],
            "s_per_candidate": report["seconds"] / report["evaluations"], "best": report["best"]["fitness"],
            "test_mean": sum(winner["scores"].values()) / len(winner["scores"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--evaluations", type=int, default=66)
    parser.add_argument("--minibatch", type=int, default=0)
    args = parser.parse_args()
    from mergeforge.zoo import build_zoo
    from mergeforge.zoo.build import default_zoo_dir

    build_zoo(None, size="tiny", seed=0)
    zoo = default_zoo_dir("tiny", 0)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "search.yml"
    import yaml

    path.write_text(yaml.safe_dump(search(zoo, args.evaluations, args.minibatch)), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    rows = [run("serial", args.out, path, env), run("workers2", args.out, path, env, "--workers", "2")]
    process, address, temp_dir = start_ray(env)
    try:
        rows.append(run("ray2", args.out, path, env, "--ray-address", address))
    finally:
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
    for row in rows:
        print(json.dumps(row))
    print("ray journal == workers2 journal:", journal(args.out / "ray2") == journal(args.out / "workers2"))
    print("ray journal == serial journal:", journal(args.out / "ray2") == journal(args.out / "serial"))


if __name__ == "__main__":
    main()
