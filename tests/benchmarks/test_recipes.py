"""Every benchmark recipe is a valid recipe whose name is its file's: table rows are keyed by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsearch.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "recipes").rglob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) > 50


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmark_recipe_validates_and_is_named_after_its_file(path: Path) -> None:
    assert load_recipe(path).name == path.stem
