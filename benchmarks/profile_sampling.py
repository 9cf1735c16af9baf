"""Where a sampling step's time goes: one denoiser call at table batch size, FP and quantized.

The survey tables spend most of their GPU time sampling 10,000 images; this times one denoiser call
(the unit of that cost) for the FP model and a recipe's quantized model, in the tables' NCHW layout
and in channels-last, and prints the profiler's top kernels, so a slow path shows before a session's
device budget is spent on it.

    python benchmarks/profile_sampling.py benchmarks/recipes/unet_ptq/w4a8_rtn.yaml --variant fp16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qsearch.cli.main import quiet_libraries
from qsearch.engine import AUTOCAST, Session
from qsearch.models import Denoiser
from qsearch.recipe import load_recipe


def time_call(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, autocast: torch.dtype | None,
              repeats: int) -> float:
    """Median seconds of one denoiser call (after two warm-up calls)."""
    times = []
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        for i in range(repeats + 2):
            if x.is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            denoiser(x, t, {})
            if x.is_cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def top_kernels(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, autocast: torch.dtype | None, k: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof, torch.no_grad(), \
            torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        denoiser(x, t, {})
    sort = "cuda_time_total" if x.is_cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=k)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--variant")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's eval.batch_size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=15, help="kernels to print per model (0: none)")
    parser.add_argument("--out", type=Path, help="JSON file for the timings")
    args = parser.parse_args(argv)
    quiet_libraries()
    recipe = load_recipe(args.recipe)
    if args.variant:
        recipe.variant = args.variant
    session = Session(recipe)
    ctx = session.quantize(recipe)
    batch = args.batch_size or recipe.eval.batch_size
    autocast = AUTOCAST[recipe.eval.autocast]
    x = torch.randn(batch, session.fp.in_channels, *_sample_size(session.fp), device=session.device)
    t = torch.tensor(500, device=session.device)
    timings = {}
    for name, denoiser in (("fp", session.fp), ("quantized", ctx.denoiser)):
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            denoiser.model.to(memory_format=fmt)
            timings[f"{name}_{layout}_ms"] = 1e3 * time_call(denoiser, x.contiguous(memory_format=fmt), t,
                                                             autocast, args.repeats)
        denoiser.model.to(memory_format=torch.contiguous_format)
        if args.top:
            print(f"== {name} (NCHW), batch {batch}\n{top_kernels(denoiser, x, t, autocast, args.top)}")
    report = {"recipe": str(args.recipe), "batch_size": batch, "autocast": recipe.eval.autocast,
              "device": torch.cuda.get_device_name() if x.is_cuda else "cpu", **timings}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report) + "\n")


def _sample_size(denoiser: Denoiser) -> tuple[int, int]:
    size = denoiser.model.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


if __name__ == "__main__":
    main()
