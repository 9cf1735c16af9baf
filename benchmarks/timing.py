"""Wall time of GPU or CPU work, shared by the benches: CUDA events on the GPU, perf_counter on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class Timer:
    """Seconds of one call: CUDA events around it on the GPU (no host overhead), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            started = time.perf_counter()
            fn()
            return time.perf_counter() - started
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000


def median_seconds(fn: Callable[[], Any], repeats: int, timer: Timer, warmup: int = 1) -> float:
    """Median of ``repeats`` timed calls, after ``warmup`` untimed ones (kernel selection, lazy
    initialisation, autotuning)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn) for _ in range(repeats))
