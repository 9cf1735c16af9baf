"""Sampling time of fake-quantized models relative to the FP model, in the same run.

    python benchmarks/overhead.py --model zoo:ddpm-cifar10 --variant fp16 --n 2000 --batch 1000

Each configuration samples ``--n`` images with DDIM-``--steps`` after a warm-up batch; times are
wall-clock with the device synchronised, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qsearch.cli.main import quiet_libraries
from qsearch.engine import AUTOCAST, Session
from qsearch.recipe import parse_recipe

CONFIGS = {
    "W8A8": {"quant": {"w_bits": 8, "a_bits": 8}},
    "W4A8": {"quant": {"w_bits": 4, "a_bits": 8}},
    "W4A16": {"quant": {"w_bits": 4, "a_bits": None}},
    "W8A8-dynamic-token": {"quant": {"w_bits": 8, "a_bits": 8, "a_dynamic": True, "a_granularity": "token"}},
}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="zoo:ddpm-cifar10")
    parser.add_argument("--variant")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--autocast", nargs="+", default=["none", "bf16"])
    parser.add_argument("--out")
    args = parser.parse_args()
    quiet_libraries()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rows = []
    for autocast in args.autocast:
        base = {"model": args.model, "variant": args.variant, "sampler": {"steps": args.steps},
                "calibration_pool": {"samples": 64},
                "eval": {"n_samples": args.n, "batch_size": args.batch, "fid": False,
                         "fidelity_samples": 0, "autocast": autocast}}
        recipe = parse_recipe(base)
        session = Session(recipe)

        def run(den, correctors=()):
            session.sampler.sample(den, args.n, batch_size=args.batch, correctors=correctors,
                                   autocast=AUTOCAST[autocast])

        run(session.fp)  # warm-up
        fp_seconds = timed(lambda: run(session.fp), args.repeats)
        rows.append({"config": "FP", "autocast": autocast, "seconds": fp_seconds, "ratio": 1.0})
        for name, cfg in CONFIGS.items():
            r = parse_recipe({**base, **cfg})
            ctx = session.quantize(r)
            run(ctx.denoiser)
            seconds = timed(lambda: run(ctx.denoiser), args.repeats)
            rows.append({"config": name, "autocast": autocast, "seconds": seconds,
                         "ratio": seconds / fp_seconds})
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'config':22s} {'autocast':8s} {'seconds':>8s} {'x FP':>6s}")
    for r in rows:
        print(f"{r['config']:22s} {r['autocast']:8s} {r['seconds']:8.2f} {r['ratio']:6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
