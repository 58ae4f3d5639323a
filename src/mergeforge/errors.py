"""User-facing errors.

Every error a user can cause is a :class:`MergeforgeError`. Its message names the file, field or
tensor at fault and says what to do; the CLI prints it on one line and exits non-zero, without a
traceback. Anything else that escapes is a bug in mergeforge.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MergeforgeError(Exception):
    """Base class of every error a user can cause."""

    exit_code = 2


class RecipeError(MergeforgeError):
    """The recipe (YAML or dict) is invalid: unknown field, bad value, unknown method."""


class CheckpointError(MergeforgeError):
    """An input checkpoint is missing, unreadable, corrupt, or incompatible with the others."""


class OutputError(MergeforgeError):
    """The output folder cannot be written (exists, inside an input, disk full)."""


class MethodError(MergeforgeError):
    """A merge method was given inputs it cannot merge (wrong count, bad parameter value)."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice a misspelt ``word`` most likely meant (difflib's closest match), else ``None``:
    the "did you mean" of every message about an unknown name."""
    matches = difflib.get_close_matches(word, list(choices), n=1)
    return matches[0] if matches else None
