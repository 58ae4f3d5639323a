"""Plain-text tables of evaluation results, for the terminal and for Markdown files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def format_table(
    rows: Sequence[tuple[str, Mapping[str, float | None]]],
    columns: Sequence[str],
    *,
    first_header: str = "model",
    mean: bool = True,
    percent: bool = True,
) -> str:
    """A Markdown table: one row per ``(label, {column: value})``, values as percentages.

    A missing value prints as ``-``; ``mean`` adds the mean over the row's present values.

    Example:
        >>> print(format_table([("base", {"reverse": 0.05})], ["reverse"]))
    """

    def cell(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"

    header = [first_header, *columns] + (["mean"] if mean else [])
    body: list[list[str]] = []
    for label, values in rows:
        present = [values[c] for c in columns if values.get(c) is not None]
        line = [label, *(cell(values.get(c)) for c in columns)]
        if mean:
            line.append(cell(sum(present) / len(present)) if present else "-")  # type: ignore[arg-type]
        body.append(line)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0]), *(text.rjust(width) for text, width in zip(row[1:], widths[1:]))]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([render(header), rule, *(render(row) for row in body)])


def format_result(result: Mapping[str, Any]) -> str:
    """One model's :func:`~mergeforge.evaluate.evaluate_model` result, one line per task."""
    lines = [f"{result['model']} on the {result['split']} split:"]
    width = max(len(name) for name in result["tasks"])
    for name, entry in result["tasks"].items():
        text = f"  {name.ljust(width)}  {entry['metric']} {100 * entry['score']:5.1f}%  ({entry['correct']}/{entry['n']})"
        if "loss" in entry:
            text += f"  loss {entry['loss']:.4f}  perplexity {entry['perplexity']:.3f}"
        lines.append(text)
    lines.append(f"  mean score {100 * result['mean_score']:.1f}%  ({result['seconds']:.1f} s)")
    return "\n".join(lines)
