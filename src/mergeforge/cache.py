"""Where mergeforge keeps what it derives and can rebuild: zoos, demo runs, the Hugging Face files
derived from GGUF metadata."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MERGEFORGE_CACHE``, else ``$XDG_CACHE_HOME/mergeforge``, else ``~/.cache/mergeforge``."""
    if os.environ.get("MERGEFORGE_CACHE"):
        return Path(os.environ["MERGEFORGE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mergeforge"
