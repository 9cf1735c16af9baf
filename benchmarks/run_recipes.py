"""Run benchmark recipes (one table row each) and append their results as JSON lines.

Recipes on the same model and sampler share one ``Session``, so the FP model's trajectories and
reference samples are computed once per table. ``--fp`` adds the FP row of each model.

    python benchmarks/run_recipes.py benchmarks/recipes/foundation/*.yaml \
        --n-samples 10000 --device cuda --out results.jsonl --fp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from qsearch.cli.main import quiet_libraries
from qsearch.engine import Session
from qsearch.recipe import load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    parser.add_argument("--n-samples", type=int, help="override eval.n_samples")
    parser.add_argument("--batch-size", type=int, help="override eval.batch_size")
    parser.add_argument("--device", help="override eval.device")
    parser.add_argument("--variant", help="override the weights variant (fp16 on the GPU machine)")
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], help="override eval.autocast")
    parser.add_argument("--steps", type=int, help="override sampler.steps")
    parser.add_argument("--fp", action="store_true", help="also evaluate each model in FP")
    args = parser.parse_args(argv)
    quiet_libraries()

    sessions: dict[tuple, Session] = {}
    failures = 0
    for path in args.recipes:
        recipe = load_recipe(path)
        for key, value in (("n_samples", args.n_samples), ("batch_size", args.batch_size),
                           ("device", args.device), ("autocast", args.autocast)):
            if value is not None:
                setattr(recipe.eval, key, value)
        if args.variant is not None:
            recipe.variant = args.variant
        if args.steps is not None:
            recipe.sampler.steps = args.steps
        key = (recipe.model, recipe.variant, recipe.sampler.model_dump_json())
        row: dict = {"recipe": str(path), "name": recipe.name or path.stem, "model": recipe.model,
                     "steps": recipe.sampler.steps}
        try:
            if key not in sessions:
                sessions[key] = Session(recipe)
                if args.fp:
                    started = time.perf_counter()
                    fp = sessions[key].evaluate(None, recipe)
                    _write(args.out, {**row, "name": "FP32", "recipe": "fp", "metrics": fp,
                                      "seconds": time.perf_counter() - started})
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            result = sessions[key].run(recipe)
            row.update(result.as_dict(), seconds=time.perf_counter() - started)
            if torch.cuda.is_available():  # calibration/fine-tuning and sampling, whichever peaks
                row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception as exc:  # a failing row is recorded, the table goes on
            failures += 1
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        _write(args.out, row)
    return 1 if failures == len(args.recipes) else 0


def _write(out: Path, row: dict) -> None:
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    metrics = row.get("metrics", {})
    brief = {k: round(v, 3) for k, v in metrics.items() if k in ("fid", "psnr", "avg_weight_bits", "sample_seconds")}
    if "timings" in row:
        brief["calibrate_s"] = round(row["timings"]["calibrate_seconds"], 1)
    print(f"{row['name']}: {brief or row.get('error')}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
