"""The Pareto front of a search: the candidates that no other candidate beats on every fitness term.

CMA-ES optimises the scalar fitness (Σ weight × metric), so a merge that trades one task for
another is only as good as its weighted sum. The front keeps the trade-offs: among the candidates
scored on the whole search split (every scored candidate; with a minibatch, the raced ones, as
minibatch scores of different generations are not comparable), those not dominated, i.e. with no
other candidate at least as good on every term and better on one. A term's direction is its
weight's sign (a negative weight: lower is better, as for a loss); a zero-weight term is ignored.
Equal score vectors are one point (the earliest candidate). This is the front of what the scalar
search visited, not a multi-objective optimiser's front.
"""

from __future__ import annotations

from typing import Any


def objectives(config: Any, scores: dict[str, float]) -> tuple[float, ...]:
    """The candidate's terms, each signed so that higher is better."""
    values = []
    for term in config.fitness:
        if term.weight != 0:
            value = scores[term.key]
            values.append(value if term.weight > 0 else -value)
    return tuple(values)


def dominates(left: tuple[float, ...], right: tuple[float, ...]) -> bool:
    return all(a >= b for a, b in zip(left, right, strict=True)) and left != right


def pareto_front(config: Any, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated candidates (journal or race lines with ``scores``), in their order, the
    first of equal score vectors only."""
    points = [(candidate, objectives(config, candidate["scores"])) for candidate in candidates if candidate["fitness"] is not None]
    front, seen = [], set()
    for candidate, point in points:
        if point in seen or any(dominates(other, point) for _, other in points):
            continue
        seen.add(point)
        front.append(candidate)
    return front
