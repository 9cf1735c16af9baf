"""The GEMMs of a DiT alone: how much faster can an 8-bit kernel be than BF16 at these shapes?

The whole-model W8A8 figures of ``export_bench.py`` mix three things: the GEMM kernels, the
activation-quantization pass in front of each, and everything that stays in BF16 (attention,
norms, modulation). This bench takes the first apart. For each GEMM shape ``M x K x N``
(``M`` tokens, ``K`` input and ``N`` output features; the defaults are DiT-XL/2-256's at batch 256:
65,536 tokens, the attention projections 1,152 -> 1,152 and the MLP 1,152 -> 4,608 -> 1,152) it
times, with CUDA events, the median of ``--repeats`` calls after warm-up, of:

* ``bf16``: ``F.linear`` with bias (cuBLAS), the reference;
* ``fp8_rowwise`` (and ``+fast_accum``): ``torch._scaled_mm`` with a scale per token and per output
  channel and the bias in the epilogue, what ``Fp8MMLinear`` runs;
* ``fp8_tensorwise`` (and ``+fast_accum``): one scale per operand (cuBLASLt), the fastest FP8 form,
  which a per-channel weight grid cannot use without a separate rescaling pass;
* ``int8``: ``torch._int_mm`` (int8 x int8 -> int32), what ``Int8MMLinear`` runs, without its
  epilogue;
* ``fp8_quantize``: the activation pass alone (``x / s``, clamp, cast to E4M3), the price of
  quantizing the input when it cannot be fused into the op before.

Each GEMM's output is also compared with the exact (float64) product of its own operands: the
relative error is its rounding and accumulation error alone (the quantization of the operands is
not in it), which is what ``fast_accum`` trades for speed.

    python benchmarks/gemm_bench.py --out gemm.jsonl                 # H100/H200, a few seconds
    python benchmarks/gemm_bench.py --device cpu --shapes 64x32x48 --out /tmp/gemm.jsonl   # tiny check
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
DIT_XL_B256 = ["65536x1152x1152", "65536x1152x4608", "65536x4608x1152"]


Kernel = tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor] | None]


def kernels(m: int, k: int, n: int, device: torch.device) -> dict[str, Kernel]:
    """The calls to time at one shape, on random operands of the right dtypes, each with the exact
    (float64) product of its own operands, against which its accumulation error is measured."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g, device=device).to(torch.bfloat16) / k**0.5
    bias = torch.randn(n, generator=g, device=device).to(torch.bfloat16)
    x8 = x.to(torch.float8_e4m3fn)
    w8t = w.mul(k**0.5).to(torch.float8_e4m3fn).t()  # column-major B, as _scaled_mm wants
    row_scale = torch.full((m, 1), 0.01, device=device)
    col_scale = torch.full((1, n), 0.01, device=device)
    one = torch.tensor(0.01, device=device)
    xi = torch.randint(-128, 128, (m, k), generator=g, device=device, dtype=torch.int8)
    wit = torch.randint(-128, 128, (n, k), generator=g, device=device, dtype=torch.int8).t()

    def exact(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, add_bias: bool = True) -> Callable[[], torch.Tensor]:
        return lambda: a.double() @ b.double() * scale + (bias.double() if add_bias else 0)

    def scaled(row: bool, fast: bool) -> Kernel:
        sa, sb = (row_scale, col_scale) if row else (one, one)
        return (lambda: torch._scaled_mm(x8, w8t, scale_a=sa, scale_b=sb, bias=bias,
                                         out_dtype=torch.bfloat16, use_fast_accum=fast),
                exact(x8, w8t, 1e-4))

    return {
        "bf16": (lambda: F.linear(x, w, bias), exact(x, w.t())),
        "fp8_rowwise": scaled(True, False),
        "fp8_rowwise+fast_accum": scaled(True, True),
        "fp8_tensorwise": scaled(False, False),
        "fp8_tensorwise+fast_accum": scaled(False, True),
        "int8": (lambda: torch._int_mm(xi, wit), exact(xi, wit, add_bias=False)),
        "fp8_quantize": (lambda: (x / one).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), None),
    }


def relative_error(y: torch.Tensor, exact: torch.Tensor) -> float:
    """||y - exact|| / ||exact|| (Frobenius): the kernel's rounding and accumulation error."""
    return float((y.double() - exact).norm() / exact.norm())


def bench_shape(shape: str, repeats: int, device: torch.device) -> list[dict]:
    m, k, n = (int(v) for v in shape.split("x"))
    rows = []
    for name, (fn, exact) in kernels(m, k, n, device).items():
        try:
            seconds = median_seconds(fn, repeats, Timer(device), warmup=2)
        except RuntimeError as err:  # a kernel this device or build lacks: said, not fatal
            rows.append({"shape": shape, "kernel": name, "error": str(err).splitlines()[0]})
            continue
        row = {"shape": shape, "kernel": name, "seconds": seconds}
        if exact is not None:
            row["tflops"] = 2 * m * k * n / seconds / 1e12
            row["relative_error"] = relative_error(fn(), exact())
        rows.append(row)
    reference = next(r["seconds"] for r in rows if r["kernel"] == "bf16")
    for r in rows:
        if "seconds" in r:
            r["speed_vs_bf16"] = reference / r["seconds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DIT_XL_B256, help="GEMMs as MxKxN")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"### GEMMs on {name} (median of {args.repeats})\n")
    print("| M x K x N | kernel | ms | TFLOP/s | x BF16 | relative error |\n|---|---|---:|---:|---:|---:|")
    with args.out.open("a") as f:
        for shape in args.shapes:
            for r in bench_shape(shape, args.repeats, device):
                f.write(json.dumps({**r, "device": name}) + "\n")
                if "error" in r:
                    print(f"| {shape} | {r['kernel']} | {r['error']} | | | |")
                    continue
                tflops = f"{r['tflops']:.0f}" if "tflops" in r else "-"
                error = f"{r['relative_error']:.2e}" if "relative_error" in r else "-"
                print(f"| {shape} | {r['kernel']} | {r['seconds'] * 1000:.3f} | {tflops} | "
                      f"{r['speed_vs_bf16']:.2f} | {error} |")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
