"""The merge progress bar: bytes written, tensors done, ETA. Torch-free, for both executors."""

from __future__ import annotations

import sys
import threading
from typing import Any


class ProgressReporter:
    """A tqdm bar in bytes written, with tensors done and an ETA; silent when disabled."""

    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool):
        self._bar: Any = None
        self._lock = threading.Lock()
        self._tensors = 0
        self._total_tensors = total_tensors
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", dynamic_ncols=True)

    def __call__(self, job: Any) -> None:
        with self._lock:
            self._tensors += 1
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self._tensors}/{self._total_tensors} tensors", refresh=False)
                self._bar.update(getattr(job, "output", job).nbytes)  # a TensorJob, or anything with nbytes

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def announce(line: str, enabled: bool) -> None:
    """One line on stderr between progress bars (a multi-stage merge's stage headers)."""
    if enabled:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
