"""``benchmarks/fusion_bench.py``: each producer compiled alone and with the FP8 quantization after it."""

from __future__ import annotations

import json

import pytest
import torch

import benchmarks.fusion_bench as bench


def test_each_producer_gets_every_variant_and_its_ratio(tmp_path, capsys) -> None:
    out = tmp_path / "fusion.jsonl"
    bench.main(["--device", "cpu", "--shapes", "64x32", "--repeats", "2", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["producer"], r["variant"]) for r in rows] == [
        (p, v) for p in ("gelu", "add_layernorm_modulate") for v in ("bf16", "fp8_div", "fp8_mul")
    ]
    for r in rows:
        reference = next(q for q in rows if q["producer"] == r["producer"] and q["variant"] == "bf16")
        assert r["time_vs_bf16"] == pytest.approx(r["seconds"] / reference["seconds"])
        # bytes moved: 2 per BF16 input element, 2 (BF16) or 1 (E4M3) per output element
        moved = 64 * 32 * (2 * (2 if r["producer"] == "add_layernorm_modulate" else 1)
                           + (2 if r["variant"] == "bf16" else 1))
        assert r["gb_per_s"] == pytest.approx(moved / r["seconds"] / 1e9)
    assert "| 64x32 | gelu | fp8_mul |" in capsys.readouterr().out


def test_the_quantized_variants_are_the_producer_on_the_e4m3_grid() -> None:
    device = torch.device("cpu")
    for produce in bench.producers(256, 64, device).values():
        fns = bench.variants(produce, device)
        reference = fns["bf16"]().float() / 0.05
        for name in ("fp8_div", "fp8_mul"):
            codes = fns[name]().float()
            inside = reference.abs() < bench.FP8_MAX
            # E4M3 keeps 3 mantissa bits: half a step is at most 1/16 of the value (or 2^-10 near zero)
            assert ((codes - reference)[inside].abs() <= reference[inside].abs() / 16 + 2**-9).all(), name
