"""JSON Lines input (task splits, calibration sets): one object per line, errors naming file and line.

Torch-free, so task and calibration files are checked before any model loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergeforge.errors import MergeforgeError


def json_records(path: Path, error: type[MergeforgeError], what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("<path>:<line>", record)`` for every non-blank line of ``path``.

    ``what`` names the file's role in the messages (e.g. "calibration data"); every problem (an
    unreadable file, a line that is not JSON, not an object, or not UTF-8) raises ``error`` with
    a one-line message. Stop iterating early to read only the first records.
    """
    try:
        handle = path.open("rb")  # bytes, decoded line by line, so a bad byte's line is known
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise error(f"{where}: not UTF-8 text; save {what} as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from None
            if not isinstance(record, dict):
                raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
