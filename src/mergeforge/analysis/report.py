"""The self-contained HTML page of ``mergeforge analyze`` and ``mergeforge lmc``: tables, and plots
embedded as PNG (no CDN, no script), beside the JSON they come from."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any


def png(draw: Callable[[Any], None], size: tuple[float, float] = (7.0, 4.0)) -> str | None:
    """A matplotlib figure drawn by ``draw(figure)``, as base64 PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure = plt.figure(figsize=size)
    draw(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=90, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def page(title: str, sections: list[str]) -> str:
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}</style></head><body>")
    return head + f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"


def image(data: str | None, alt: str) -> str:
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>" if data else ""


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape(str(value))

    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows]
    return "\n".join(lines) + "</table>"
