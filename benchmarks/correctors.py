"""Compare a recipe's error correctors on one quantized model: how each moves the samples.

Why: in the U-Net table (BENCHMARKS, issue 3) PTQD and D^2-DPM score a worse FID than the model they
correct at DDIM-100 while their PSNR to the FP samples is as good or better. A corrector that pulls
each noise estimate toward its conditional mean (a least-squares correction) brings a sample closer to
the FP model's and can still shrink the set's contrast, which FID penalises and PSNR barely sees; on
DDIM with eta = 0 there is no sampler noise for the correction's variance term to act on.

The recipe's non-corrector stages quantize the model once; then the samples of the uncorrected model
and of each corrector alone (same seeds) are compared with the FP model's: PSNR, and the ratio of
their contrast (mean per-image pixel std) and of their brightness spread (std of the per-image means)
to the FP samples'. A ratio below 1 is a set that is flatter or less varied than the FP model's.

    python benchmarks/correctors.py benchmarks/recipes/cpu_check/correctors_w4a8.yaml --steps 100 \\
        --out correctors.jsonl     # 2 CPU cores: ~35 minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qsearch.cli.main import quiet_libraries
from qsearch.engine import AUTOCAST, Session
from qsearch.metrics.fidelity import fidelity
from qsearch.recipe import load_recipe, stage_instances


def spread(samples: torch.Tensor) -> tuple[float, float]:
    """Contrast (mean per-image pixel std) and brightness spread (std of per-image means)."""
    flat = samples.flatten(1).double()
    return float(flat.std(dim=1).mean()), float(flat.mean(dim=1).std())


def compare(samples: torch.Tensor, fp: torch.Tensor) -> dict[str, float]:
    """PSNR to the FP samples and the two spread ratios against theirs."""
    contrast, brightness = spread(samples)
    fp_contrast, fp_brightness = spread(fp)
    return {"psnr": fidelity(samples, fp)["psnr"], "contrast_ratio": contrast / fp_contrast,
            "brightness_spread_ratio": brightness / fp_brightness}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    parser.add_argument("--steps", type=int, help="override sampler.steps")
    parser.add_argument("--n-samples", type=int, help="override eval.n_samples")
    parser.add_argument("--device", help="override eval.device")
    args = parser.parse_args(argv)
    quiet_libraries()
    recipe = load_recipe(args.recipe)
    if args.steps is not None:
        recipe.sampler.steps = args.steps
    if args.n_samples is not None:
        recipe.eval.n_samples = recipe.eval.batch_size = args.n_samples
    if args.device is not None:
        recipe.eval.device = args.device
    stages = stage_instances(recipe)
    correctors = [(cfg, stage) for cfg, stage in zip(recipe.stages, stages) if stage.kind == "correct"]
    if not correctors:
        raise SystemExit(f"{args.recipe}: the recipe has no error-corrector stage to compare")
    base = recipe.model_copy(update={"stages": [cfg for cfg, s in zip(recipe.stages, stages) if s.kind != "correct"]})

    session = Session(recipe)
    started = time.perf_counter()
    ctx = session.quantize(base)
    ev = recipe.eval
    fp = session.fp_samples(ev.n_samples, ev.seed)
    row = {"recipe": str(args.recipe), "steps": recipe.sampler.steps, "n_samples": ev.n_samples,
           "calibrate_seconds": time.perf_counter() - started, "fp": compare(fp, fp)}
    for cfg, stage in [(None, None), *correctors]:
        ctx.correctors.clear()
        if stage is not None:
            stage.apply(ctx)
        samples = session.sampler.sample(ctx.denoiser, ev.n_samples, seed=ev.seed, batch_size=ev.batch_size,
                                         correctors=ctx.correctors, autocast=AUTOCAST[ev.autocast])
        label = "uncorrected" if cfg is None else " ".join(
            [cfg.method, *(f"{k}={v}" for k, v in cfg.model_dump(exclude={"method"}, exclude_defaults=True).items())])
        row[label] = compare(samples, fp)
        print(label, row[label], flush=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
