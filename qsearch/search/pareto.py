"""Pareto fronts of two minimized objectives (quality, size) and their hypervolume.

The study's front itself is Optuna's ``best_trials`` (feasible COMPLETE trials only); this module
holds the geometry that the multi-fidelity rule, the stored front snapshots and the plots need.
"""

from __future__ import annotations

from collections.abc import Sequence

Point = tuple[float, float]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (all minimized)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points that no other point dominates (duplicates all kept, as Optuna does)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` (2 minimized objectives).

    The standard sweep: sort the front by the first objective; each point adds the rectangle up to
    the next point's first objective (or the reference) below the reference's second objective.
    """
    inside = [p for p in points if p[0] < reference[0] and p[1] < reference[1]]
    front = sorted({inside[i] for i in non_dominated(inside)})
    area = 0.0
    for k, (x, y) in enumerate(front):
        x_next = front[k + 1][0] if k + 1 < len(front) else reference[0]
        area += (x_next - x) * (reference[1] - y)
    return area


def reference_point(points: Sequence[Point], quality: float | None, size: float | None) -> Point:
    """Hypervolume reference: the given values, else 10% beyond the worst measured value.

    A reference taken from the trials moves as worse trials arrive, so hypervolumes are only
    comparable between snapshots with the same reference (each snapshot stores its own); fix
    ``hypervolume_reference`` in the space to compare studies.
    """
    worst_q = max((p[0] for p in points), default=1.0)
    worst_s = max((p[1] for p in points), default=1.0)
    return (quality if quality is not None else worst_q * 1.1 + 1e-12,
            size if size is not None else worst_s * 1.1 + 1e-12)
