"""Front geometry: dominance and the 2-D hypervolume."""

from __future__ import annotations

import itertools
import random

import pytest

from qsearch.search.pareto import dominates, hypervolume, non_dominated, reference_point


def test_dominance_and_front():
    assert dominates((1, 2), (1, 3)) and not dominates((1, 3), (1, 3)) and not dominates((0, 4), (1, 3))
    points = [(1, 5), (2, 3), (3, 3), (4, 1), (2, 3)]
    assert non_dominated(points) == [0, 1, 3, 4]  # duplicates both kept, (3, 3) dominated


def test_hypervolume_of_a_staircase():
    # rectangles [1,2]x[5,10] + [2,4]x[3,10] + [4,10]x[1,10] = 5 + 14 + 54
    assert hypervolume([(1, 5), (2, 3), (4, 1), (3, 4)], (10, 10)) == pytest.approx(73.0)
    assert hypervolume([(11, 1)], (10, 10)) == 0.0


def test_hypervolume_matches_a_grid_count():
    rng = random.Random(0)
    points = [(rng.uniform(0, 8), rng.uniform(0, 8)) for _ in range(12)]
    ref = (8.0, 8.0)
    step = 0.02
    cells = sum(
        any(px <= x and py <= y for px, py in points)
        for x, y in itertools.product([step * (i + 0.5) for i in range(400)], repeat=2)
    )
    assert hypervolume(points, ref) == pytest.approx(cells * step * step, rel=0.01)


def test_reference_point():
    assert reference_point([(10.0, 4.0), (20.0, 8.0)], None, 16.0) == pytest.approx((22.0, 16.0))
    assert reference_point([(10.0, 4.0)], 50.0, None) == pytest.approx((50.0, 4.4))
