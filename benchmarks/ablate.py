"""Split a quantized model's error into the part its weights and the part its activations cause.

For each recipe: quantize, then measure PSNR against the FP model's samples on the same seeds three
times: as quantized, with the activation quantizers removed (weights alone) and with the weight
quantizers removed (activations alone). Rotations, smoothing and low-rank branches stay in place
(they are exact), so each figure is the error of one kind of rounding. Results go to ``--out`` as
JSON lines. The HQ-DiT check of BENCHMARKS.md (2 CPU cores, about 20 minutes)::

    python benchmarks/ablate.py benchmarks/recipes/cpu_check/hq_dit_w4a8_fp_p64.yaml \\
        --n-samples 16 --device cpu --out hq_dit_ablation.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qsearch.cli.main import quiet_libraries
from qsearch.engine import Session
from qsearch.quant.modules import activations_off, weights_off
from qsearch.recipe import load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    parser.add_argument("--n-samples", type=int, default=16, help="samples compared with FP's")
    parser.add_argument("--device", help="override eval.device")
    args = parser.parse_args(argv)
    quiet_libraries()
    for path in args.recipes:
        recipe = load_recipe(path)
        recipe.eval.n_samples = recipe.eval.batch_size = recipe.eval.fidelity_samples = args.n_samples
        recipe.eval.fid = False  # PSNR to the FP samples is what separates the parts; FID needs thousands
        if args.device is not None:
            recipe.eval.device = args.device
        session = Session(recipe)
        ctx = session.quantize(recipe)
        layers = ctx.layers()
        row = {"recipe": str(path), "name": recipe.name or path.stem,
               "psnr": session.evaluate(ctx, recipe)["psnr"]}
        with activations_off(layers):
            row["psnr_weights_only"] = session.evaluate(ctx, recipe)["psnr"]
        with weights_off(layers):
            row["psnr_activations_only"] = session.evaluate(ctx, recipe)["psnr"]
        row["formats"] = {name: {"w_exponent_bits": layer.spec.weight_exponent_bits,
                                 "a_exponent_bits": layer.spec.act_exponent_bits}
                          for name, layer in layers.items() if layer.spec.w_format == "fp"}
        print({k: v for k, v in row.items() if k != "formats"}, flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
