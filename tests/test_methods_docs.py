"""docs/methods.md documents every registered method with the registry's own parameters, defaults
and ranges, so the reference cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mergeforge.methods import MethodSpec, Param, all_methods

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
BUILT_IN = [method for method in all_methods() if method.plugin is None]


def section(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.find(f'<a id="{name}"></a>')
    assert start >= 0, f"docs/methods.md has no section for '{name}'"
    following = re.search(r'<a id="|^## ', text[start + 1:], flags=re.MULTILINE)
    return text[start: start + 1 + following.start()] if following else text[start:]


def default_text(param: Param) -> str:
    if param.required:
        return "required"
    if param.kind == "bool":
        return str(param.default).lower()
    return f"{param.default:g}" if isinstance(param.default, float) else str(param.default)


def expected_row(param: Param) -> str:
    """The table row docs/methods.md should have for ``param`` (printed when it does not)."""
    scope = "per model" if param.per_model else "global"
    return f"| `{param.name}` | {scope} | {default_text(param)} | {param.range_text()} | {param.help} |"


@pytest.mark.parametrize("method", BUILT_IN, ids=[method.name for method in BUILT_IN])
def test_every_method_has_a_section_with_its_parameters_defaults_and_ranges(method: MethodSpec):
    text = section(method.name)
    assert method.citation in text, f"{method.name}: the section should name its reference: {method.citation}"
    for param in method.params:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{param.name}` |")), None)
        assert row is not None, f"{method.name}: parameter '{param.name}' is not documented; add {expected_row(param)}"
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1:4] == expected_row(param).strip("|").split(" | ")[1:4], (
            f"{method.name}.{param.name}: the docs say {row}; the registry says {expected_row(param)}"
        )
    assert "When to prefer it:" in text
