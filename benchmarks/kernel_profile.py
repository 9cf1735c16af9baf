"""Where a sampling run's device time goes: matrix products, attention, and everything else.

The W8A8 goal (issue 8) asks quantized GEMMs to make a whole sampling run 1.3x faster than BF16,
which they can only do if the GEMMs are most of the run. This splits one profiled run's kernel time
into classes by kernel name, so a benchmark row says how much time was GEMM-bound (what int8/FP8
can speed up) and how much was not (attention, norms, activations, the quantizers' own passes).

On CUDA the classes sum the kernels' device time; on the CPU they sum the ATen operators' self
time (the operators are the kernels there).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# checked in this order: the fused attention kernels of cuDNN/CUTLASS carry GEMM-like names too
CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|softmax", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|cutlass|cublas|nvjet|xmma|wgmma|matmul|conv|triton_tem|_mm\b|aten::(add|b)?mm\b",
                          re.IGNORECASE)),
)


def kernel_class(name: str) -> str:
    """``attention``, ``matmul`` (GEMMs and convolutions) or ``other``, from a kernel or operator name."""
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other"


def profile_split(run: Callable[[], Any], device: torch.device, top: int = 8) -> dict[str, Any]:
    """Profile one call of ``run``: milliseconds per kernel class and the ``top`` kernels by time."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize(device)
    kernels: list[tuple[str, float]] = []
    for event in prof.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            micros = event.self_cpu_time_total
        if micros > 0:
            kernels.append((event.key, micros / 1000))
    split = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms in kernels:
        split[kernel_class(name)] += ms
    total = sum(split.values())
    kernels.sort(key=lambda pair: pair[1], reverse=True)
    return {
        "kernel_ms": split,
        "matmul_share": split["matmul"] / total if total else None,
        "top_kernels": [{"name": name[:120], "ms": ms, "class": kernel_class(name)} for name, ms in kernels[:top]],
    }
