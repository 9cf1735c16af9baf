"""Exported models: bytes on disk and in GPU memory, and sampling speed, against FP16 and BF16.

For each model, the FP model is quantized with four recipes (round-to-nearest, calibrated on a few
trajectories), exported with ``qsearch.export.export_model`` and loaded back with each backend:

* ``W8A8-int8``: int8 weights (per channel) and activations (static, per tensor): ``fake``,
  ``int_mm`` (``torch._int_mm``) and ``torchao`` (when installed);
* ``W8A8-fp8``: FP8 E4M3 weights (per channel) and activations (static): ``fake``, ``scaled_mm``,
  and ``scaled_mm+fast_accum`` (Hopper's fast FP8 accumulation, ``fp8_fast_accum=True``);
* ``W4``: int4 weight-only (per channel): dequantized at load, or on the fly from the packed codes;
* ``W4-W8qkv``: a mixed model, int4 weight-only with the attention q/k/v projections at 8 bits.

Every variant samples the same DDIM trajectory (``--steps`` steps) at each batch size; the time is
the median of ``--repeats`` runs (CUDA events), after a warm-up run. Ratios are taken within the
run: size and memory against the FP16 model, speed against the BF16 (and FP16) model; the dense
references (``--references``) run first. Each row goes to ``--out`` as a JSON line as soon as it is
measured, and the run ends with a Markdown table on stdout. ``--profile`` adds, for the largest
batch, the kernel time of one run split into matmul, attention and other (``kernel_profile.py``):
how much of the run a faster GEMM can speed up.

On the H100 (the lead's run, about 3 minutes)::

    python benchmarks/export_bench.py --out export_results.jsonl --variant fp16

Compiled W8A8 on the DiT only (whole-model torch.compile fuses the activation quantization into
the preceding ops; about 4 minutes)::

    python benchmarks/export_bench.py --out export_results.jsonl --variant fp16 --compile \
        --models zoo:dit-cifar10 --configs W8A8-int8 W8A8-fp8 --backends int_mm scaled_mm

Tiny CPU check::

    python benchmarks/export_bench.py --models PATH/transformer --device cpu --batch-sizes 1 4 \\
        --steps 2 --repeats 1 --calib-samples 4 --out /tmp/export.jsonl
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: its sibling modules

from benchmarks.kernel_profile import profile_split  # noqa: E402
from benchmarks.timing import Timer, median_seconds  # noqa: E402
from qsearch.cli.main import quiet_libraries  # noqa: E402
from qsearch.engine import Session  # noqa: E402
from qsearch.export import BackendFallbackWarning, export_model, load  # noqa: E402
from qsearch.export.fusion import fuse_qkv_projections  # noqa: E402
from qsearch.models import Denoiser  # noqa: E402
from qsearch.recipe import parse_recipe  # noqa: E402

# name -> (default spec, overrides, [(backend, dequantize, extra load options)])
CONFIGS: dict[str, tuple[dict, dict, list[tuple[str, str, dict[str, Any]]]]] = {
    "W8A8-int8": ({"w_bits": 8, "a_bits": 8}, {},
                  [("fake", "load", {}), ("int_mm", "load", {}), ("torchao", "load", {})]),
    "W8A8-fp8": ({"w_bits": 8, "w_format": "fp", "a_bits": 8, "a_format": "fp"}, {},
                 [("fake", "load", {}), ("scaled_mm", "load", {}), ("scaled_mm", "load", {"fp8_fast_accum": True})]),
    "W4": ({"w_bits": 4, "a_bits": None}, {}, [("fake", "load", {}), ("fake", "on_the_fly", {})]),
    "W4-W8qkv": ({"w_bits": 4, "a_bits": None}, {"*to_[qkv]": {"w_bits": 8}}, [("auto", "on_the_fly", {})]),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def denoiser_of(loaded: Any) -> torch.nn.Module:
    """The denoiser of a loaded export (``load`` returns a pipeline for a pipeline folder)."""
    for attr in ("unet", "transformer"):
        if isinstance(getattr(loaded, attr, None), torch.nn.Module):
            return getattr(loaded, attr)
    return loaded


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors (tensor subclasses counted by their inner tensors)."""
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names if getattr(t, n) is not None)
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    return sum(size(t) for t in (*model.parameters(), *model.buffers()))


def measure_memory(build: Callable[[], torch.nn.Module], device: torch.device) -> tuple[torch.nn.Module, int]:
    """The built model and its memory: allocated GPU bytes on CUDA, tensor bytes on CPU."""
    if device.type != "cuda":
        model = build()
        return model, resident_bytes(model)
    torch._dynamo.reset()  # compiled graphs of earlier models hold their tensors: release them first
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    model = build()
    torch.cuda.synchronize()
    return model, torch.cuda.memory_allocated(device) - before


def sampling_run(model: torch.nn.Module, session: Session, batch: int, dtype: torch.dtype,
                 device: torch.device) -> Callable[[], None]:
    """One full DDIM sampling run (all steps) at ``batch``, from fixed noise, as a callable."""
    denoiser = Denoiser(model)
    sampler = session.sampler
    cfg = model.config
    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g,
                        device=device, dtype=dtype)
    cond, _ = sampler.conditioning(model, torch.arange(batch))
    cond = {k: v.to(device) for k, v in cond.items()}
    sampler.scheduler.set_timesteps(sampler.config.steps)

    @torch.no_grad()
    def run() -> None:
        x = noise
        for t in sampler.scheduler.timesteps:
            eps = denoiser(x, t.to(device), cond)
            x = sampler.scheduler.step(eps, t, x).prev_sample

    return run


def bench_model(ref: str, args: argparse.Namespace, workdir: Path, emit: Callable[[dict], None]) -> None:
    device = torch.device(args.device)
    data = {
        "model": ref, "variant": args.variant,
        "sampler": {"scheduler": "ddim", "steps": args.steps},
        "calibration_pool": {"samples": args.calib_samples},
        "stages": [{"method": "uniform", "n_samples": args.calib_samples}, {"method": "rtn"}],
        "eval": {"device": str(device), "batch_size": max(args.batch_sizes), "fid": False},
    }
    session = Session(parse_recipe({**data, "quant": {"w_bits": 8}}))
    timer = Timer(device)
    fp_model = session.loaded.denoiser

    fp16_file = workdir / f"{Path(ref).name}-fp16.safetensors"
    save_file({k: v.detach().half().contiguous().cpu() for k, v in fp_model.state_dict().items()}, str(fp16_file))
    fp16_disk = fp16_file.stat().st_size
    base: dict[str, Any] = {"model": ref, "device": str(device), "steps": args.steps, "compile": args.compile,
                            "fuse_qkv": args.fuse_qkv}
    rows: list[dict[str, Any]] = []

    def record(name: str, backend: str, model: torch.nn.Module, memory: int, disk: int, dtype: torch.dtype,
               extra: dict[str, Any]) -> None:
        if args.compile:
            model.forward = torch.compile(model.forward, dynamic=False, mode=args.compile)  # one graph per batch size
        for batch in args.batch_sizes:
            run = sampling_run(model, session, batch, dtype, device)
            seconds = median_seconds(run, args.repeats, timer)
            row = {**base, "config": name, "backend": backend, "batch": batch, "seconds": seconds,
                   "images_per_second": batch / seconds, "disk_bytes": disk, "memory_bytes": memory, **extra}
            if args.profile and batch == max(args.batch_sizes):
                row["profile"] = profile_split(run, device)
            row.update(ratios(row, rows, fp16_disk))
            rows.append(row)
            emit(row)  # at once: a run cut off by a time limit keeps every row it measured
            print(f"{name} {backend} batch {batch}: {seconds * 1000:.1f} ms", file=sys.stderr, flush=True)

    for name in args.references:
        dtype = DTYPES[name]
        model, memory = measure_memory(lambda: reference(fp_model, device, dtype, args.fuse_qkv), device)
        record(name.upper(), "dense", model, memory, fp16_disk, dtype, {})
        del model

    for name, (quant, overrides, variants) in CONFIGS.items():
        variants = [v for v in variants if args.backends is None or {v[0], variant_label(*v)} & set(args.backends)]
        if name not in args.configs or not variants:
            continue
        recipe = parse_recipe({**data, "quant": quant, "overrides": overrides})
        started = time.perf_counter()
        ctx = session.quantize(recipe)
        out = export_model(ctx, workdir / f"{Path(ref).name}-{name}", recipe={**data, "quant": quant,
                           "overrides": overrides}, overwrite=True)
        calib_seconds = time.perf_counter() - started
        disk = folder_bytes(out)
        bits = json.loads((out / "qsearch_config.json").read_text())["bits"]
        del ctx
        for backend, dequantize, options in variants:
            if backend == "torchao" and importlib.util.find_spec("torchao") is None:
                print(f"{name}: torchao is not installed; skipping its backend", file=sys.stderr)
                continue
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", BackendFallbackWarning)
                model, memory = measure_memory(lambda: denoiser_of(
                    load(out, backend=backend, device=device, dtype=torch.bfloat16, dequantize=dequantize,
                         fuse_qkv=args.fuse_qkv, **options)), device)
            used: dict[str, int] = {}
            for how in model.qsearch_backends.values():
                used[how] = used.get(how, 0) + 1
            label = variant_label(backend, dequantize, options)
            record(name, label, model, memory, disk, torch.bfloat16, {
                "layers_by_kernel": used, "avg_weight_bits": bits["avg_weight_bits"],
                "fused_attention": sum(v == "fused" for v in getattr(model, "qsearch_fused", {}).values()),
                "quantize_export_seconds": calib_seconds,
                "fallbacks": [str(w.message) for w in caught],
            })
            del model
    report(rows, fp16_disk)


def variant_label(backend: str, dequantize: str, options: dict[str, Any]) -> str:
    """The backend column of a row: ``scaled_mm``, ``fake+on_the_fly``, ``scaled_mm+fast_accum``..."""
    label = backend if dequantize == "load" or backend != "fake" else f"fake+{dequantize}"
    return label + "".join(f"+{key.removeprefix('fp8_')}" for key, on in options.items() if on)


def reference(fp_model: torch.nn.Module, device: torch.device, dtype: torch.dtype, fuse_qkv: bool) -> torch.nn.Module:
    """A dense copy of the FP model in ``dtype``, with q/k/v fused when the quantized models are."""
    model = copy.deepcopy(fp_model).to(device, dtype)
    if fuse_qkv:
        fuse_qkv_projections(model)
    return model


def ratios(row: dict[str, Any], measured: list[dict[str, Any]], fp16_disk: int) -> dict[str, float]:
    """``row``'s size against the FP16 file, and memory and speed against the references measured so far.

    The references run first, so every quantized row has its ratios when it is written; a
    reference row lacks those against a reference measured after it (the final table has them).
    """
    out = {"size_vs_fp16": fp16_disk / row["disk_bytes"]}
    refs = {(r["config"], r["batch"]): r for r in measured if r["config"] in ("FP16", "BF16")}
    fp16_any = next((r for r in measured if r["config"] == "FP16"), None)
    if fp16_any is not None:  # the model's memory does not depend on the batch
        out["memory_vs_fp16"] = fp16_any["memory_bytes"] / max(row["memory_bytes"], 1)
    for name in ("BF16", "FP16"):
        ref = refs.get((name, row["batch"]))
        if ref is not None:
            out[f"speed_vs_{name.lower()}"] = ref["seconds"] / row["seconds"]
    return out


def report(rows: list[dict[str, Any]], fp16_disk: int) -> None:
    """The run as a Markdown table, each ratio against the references of the same run ("-" when not run)."""
    print(f"\n### {rows[0]['model']} ({rows[0]['device']}, DDIM-{rows[0]['steps']})\n")
    print("| config | backend | batch | disk MB | x smaller than FP16 | memory MB | x less than FP16 "
          "| ms / sampling run | images/s | x BF16 speed | x FP16 speed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        ratio = ratios(r, rows, fp16_disk)
        print(f"| {r['config']} | {r['backend']} | {r['batch']} | {r['disk_bytes'] / 2**20:.2f} | "
              f"{fmt(ratio['size_vs_fp16'])} | {r['memory_bytes'] / 2**20:.2f} | {fmt(ratio.get('memory_vs_fp16'))} | "
              f"{r['seconds'] * 1000:.1f} | {r['images_per_second']:.1f} | {fmt(ratio.get('speed_vs_bf16'))} | "
              f"{fmt(ratio.get('speed_vs_fp16'))} |")
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        print(f"\nKernel time of one profiled run at batch {profiled[0]['batch']} (ms):\n")
        print("| config | backend | matmul | attention | other | matmul share |\n|---|---|---|---|---|---|")
        for r in profiled:
            ms, share = r["profile"]["kernel_ms"], r["profile"]["matmul_share"]
            print(f"| {r['config']} | {r['backend']} | {ms['matmul']:.1f} | {ms['attention']:.1f} | "
                  f"{ms['other']:.1f} | {fmt(share)} |")
    big = max(r["batch"] for r in rows)
    kernels = ("int_mm", "scaled_mm", "torchao")
    w8 = [r for r in rows if r["config"].startswith("W8A8") and r["backend"].split("+")[0] in kernels
          and r["batch"] == big and "speed_vs_bf16" in r]
    w4 = [r for r in rows if r["config"] == "W4"]
    if w8:
        best = max(w8, key=lambda r: r["speed_vs_bf16"])
        print(f"\nGoal W8A8 >= 1.3x BF16 speed at batch {big}: {best['speed_vs_bf16']:.2f}x "
              f"({best['config']}/{best['backend']}) -> {'met' if best['speed_vs_bf16'] >= 1.3 else 'NOT met'}")
    if w4:
        ratio = w4[0]["size_vs_fp16"]
        memory = [r["memory_vs_fp16"] for r in w4 if "memory_vs_fp16" in r]
        print(f"Goal W4 >= 3.5x smaller than FP16 on disk: {ratio:.2f}x -> {'met' if ratio >= 3.5 else 'NOT met'}"
              + (f"; in memory (on the fly): {max(memory):.2f}x" if memory else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["zoo:ddpm-cifar10", "zoo:dit-cifar10"])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", help="weights variant of the FP model (fp16 on the GPU machine)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of a sampling run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration trajectories")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="quantized configurations to measure")
    parser.add_argument("--references", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="dense reference models, measured first (bf16 alone saves a compile when only the "
                        "speed against BF16 is wanted)")
    parser.add_argument("--backends", nargs="+",
                        help="only these load backends, or variants by their row label such as scaled_mm+fast_accum "
                        "(default: all of each config)")
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile every measured model (whole-model fusion; adds ~1 min per model); "
                        "max-autotune lets inductor pick Triton GEMM templates for _int_mm/_scaled_mm, into "
                        "which it can fuse the activation quantization and the dequantizing epilogue")
    parser.add_argument("--profile", action="store_true",
                        help="profile one run at the largest batch: kernel time split into matmul, attention "
                        "and other (benchmarks/kernel_profile.py), stored in the row")
    parser.add_argument("--fuse-qkv", action="store_true",
                        help="one GEMM for each self-attention's q/k/v, in the references and the loaded models "
                        "(qsearch.export.fusion)")
    parser.add_argument("--workdir", type=Path, help="where the exported folders go (default: a temp dir)")
    args = parser.parse_args(argv)
    quiet_libraries()

    def emit(row: dict) -> None:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for ref in args.models:
            bench_model(ref, args, workdir, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
