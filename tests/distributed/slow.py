"""The synthetic objective of tests/search with a real duration per trial, so that workers overlap.

Each trial sleeps ``delay`` seconds in ``quantize`` (where a real trial spends its time): long
enough for two workers to run trials at the same time and for a test to kill one mid-trial.
"""

from __future__ import annotations

import time
from typing import Any

from tests.search.synthetic import SyntheticEvaluator

from qsearch.recipe import RecipeBase


class SlowSyntheticEvaluator(SyntheticEvaluator):
    """``SyntheticEvaluator`` whose ``quantize`` takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def quantize(self, recipe: RecipeBase, seed: int) -> Any:
        time.sleep(self.delay)
        return super().quantize(recipe, seed)


class SlowFactory:
    """A picklable ``evaluator_factory`` for ``launch`` (built in each worker process)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, space: Any) -> SlowSyntheticEvaluator:
        return SlowSyntheticEvaluator(self.delay)
