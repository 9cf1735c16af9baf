"""``benchmarks/timing.py``: warm-up calls untimed, the median of the timed ones."""

from __future__ import annotations

import torch

from benchmarks.timing import Timer, median_seconds


def test_median_after_untimed_warmup(monkeypatch) -> None:
    calls: list[int] = []
    timer = Timer(torch.device("cpu"))
    durations = iter([5.0, 1.0, 3.0])
    monkeypatch.setattr(Timer, "__call__", lambda self, fn: (fn(), next(durations))[1])
    assert median_seconds(lambda: calls.append(1), 3, timer, warmup=2) == 3.0
    assert len(calls) == 5  # two warm-up calls, three timed


def test_cpu_timer_measures_the_call() -> None:
    seconds = Timer(torch.device("cpu"))(lambda: sum(range(200_000)))
    assert 0 < seconds < 5
