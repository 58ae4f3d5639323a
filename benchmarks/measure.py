"""Measuring one whole process (wall time and peak RSS) and the machine's I/O floor.

Peak RSS is the kernel's high-water mark of the command's resident set, read by GNU ``time``
(``/usr/bin/time``), which forks the command from its own tiny process. (Reading it with ``wait4``
from here would be wrong: Linux carries the high-water mark across ``exec``, so a child forked or
vforked from this Python process would inherit this process's own resident set as its peak.)
The I/O floor is the time to read every input byte a merge reads (``read`` into one reused
buffer, as ``cat`` does) and write and ``fsync`` the bytes it writes, in the same state of the
page cache as the merges around it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 16 * 1024**2
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


@dataclass
class ProcessRun:
    seconds: float
    peak_rss: int  # bytes
    returncode: int
    output: str
    cpu_seconds: float = 0.0  # user + system time of the process: less sensitive to a busy machine


def run_process(command: list[str], env: dict[str, str] | None = None) -> ProcessRun:
    """Run ``command`` to completion; wall time, peak resident set size and CPU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        wrapped = [GNU_TIME, "-f", "%M %U %S", "-o", report.name, *command] if GNU_TIME else command
        started = time.perf_counter()
        process = subprocess.Popen(wrapped, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert process.stdout is not None
        output = process.stdout.read()  # drained while it runs, so a chatty tool never blocks
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if GNU_TIME:
            fields = report.read().split()[-3:]
            peak, cpu = int(fields[0]) * 1024, float(fields[1]) + float(fields[2])
        else:  # inflated by this process's own size (see the module docstring)
            peak, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
    return ProcessRun(seconds, peak, process.returncode, output.decode(errors="replace"), cpu)


def read_files(paths: list[Path]) -> int:
    """Read every byte of ``paths``; returns the byte count."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while True:
                count = handle.readinto(view)
                if not count:
                    break
                total += count
    return total


def write_bytes(path: Path, count: int) -> None:
    """Write ``count`` bytes to ``path`` and fsync (the merge writers sync too)."""
    block = os.urandom(min(CHUNK, max(count, 1)))
    with open(path, "wb", buffering=0) as handle:
        left = count
        while left > 0:
            left -= handle.write(block[: min(left, len(block))])
        os.fsync(handle.fileno())


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Seconds to read ``inputs`` and write ``out_bytes`` (the least any merge can take)."""
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "floor.bin"
    started = time.perf_counter()
    read_files(inputs)
    write_bytes(target, out_bytes)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def clear_folder(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"
