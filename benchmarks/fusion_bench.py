"""What quantizing an activation costs once ``torch.compile`` fuses it into the op that produces it.

In a compiled W8A8 FP8 DiT the activation quantization (``x / s``, clamp, cast to E4M3) is fused by
Inductor into the kernel before each GEMM: the GELU after the first MLP projection and the
residual-add + LayerNorm + adaLN modulation before the attention and the MLP. Those kernels read
the same input and write half the bytes (E4M3 instead of BF16), yet the session-14 profile of
DiT-XL/2 had them ~30% slower than their BF16 twins. This bench times each producer compiled three
ways on one ``M x N`` input, the median of ``--repeats`` calls after warm-up:

* ``bf16``: the producer alone, writing BF16 (what the BF16 model runs);
* ``fp8_div``: the producer, then ``x / s``, clamp, cast (what ``Fp8MMLinear`` asks for);
* ``fp8_mul``: the same with ``x * (1 / s)``, the reciprocal computed once (a multiply instead of a
  correctly rounded division per element);

and reports each one's effective bandwidth (bytes read and written over time), so a kernel that is
bound by arithmetic instead of memory shows as a bandwidth well below the BF16 twin's.

    python benchmarks/fusion_bench.py --out fusion.jsonl                     # H100/H200, ~1 min
    python benchmarks/fusion_bench.py --device cpu --shapes 64x32 --out /tmp/fusion.jsonl  # tiny check
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: its sibling modules

from benchmarks.timing import Timer, median_seconds  # noqa: E402

FP8_MAX = 448.0
DIT_XL_B256 = ["65536x1152", "65536x4608"]  # DiT-XL/2-256 at batch 256: the width, the MLP's hidden


def producers(m: int, n: int, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """The two producers of a DiT block's GEMM inputs, on random BF16 operands of shape ``(m, n)``."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, n, generator=g, device=device).to(torch.bfloat16)
    residual = torch.randn(m, n, generator=g, device=device).to(torch.bfloat16)
    shift = torch.randn(n, generator=g, device=device).to(torch.bfloat16)
    scale = torch.randn(n, generator=g, device=device).to(torch.bfloat16)
    return {
        "gelu": lambda: F.gelu(x, approximate="tanh"),
        "add_layernorm_modulate": lambda: F.layer_norm(x + residual, (n,)) * (1 + scale) + shift,
    }


def variants(produce: Callable[[], torch.Tensor], device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """``produce`` compiled alone and with the activation quantization after it, two ways."""
    s = torch.tensor(0.05, device=device)
    inv_s = 1 / s

    def div() -> torch.Tensor:
        return (produce() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    def mul() -> torch.Tensor:
        return (produce() * inv_s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    return {"bf16": torch.compile(produce), "fp8_div": torch.compile(div), "fp8_mul": torch.compile(mul)}


def bench_shape(shape: str, repeats: int, device: torch.device) -> list[dict]:
    m, n = (int(v) for v in shape.split("x"))
    rows = []
    for producer, produce in producers(m, n, device).items():
        inputs = 2 if producer == "add_layernorm_modulate" else 1
        for name, fn in variants(produce, device).items():
            seconds = median_seconds(fn, repeats, Timer(device), warmup=3)
            out_bytes = 2 if name == "bf16" else 1
            moved = m * n * (2 * inputs + out_bytes)
            rows.append({"shape": shape, "producer": producer, "variant": name, "seconds": seconds,
                         "gb_per_s": moved / seconds / 1e9})
        reference = next(r["seconds"] for r in rows if r["producer"] == producer and r["variant"] == "bf16")
        for r in rows:
            if r["producer"] == producer:
                r["time_vs_bf16"] = r["seconds"] / reference
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DIT_XL_B256, help="activations as MxN")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"### Producer kernels on {name}, compiled (median of {args.repeats})\n")
    print("| M x N | producer | writes | ms | GB/s | time x BF16 |\n|---|---|---|---:|---:|---:|")
    with args.out.open("a") as f:
        for shape in args.shapes:
            for r in bench_shape(shape, args.repeats, device):
                f.write(json.dumps({**r, "device": name}) + "\n")
                print(f"| {shape} | {r['producer']} | {r['variant']} | {r['seconds'] * 1000:.3f} | "
                      f"{r['gb_per_s']:.0f} | {r['time_vs_bf16']:.2f} |")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
