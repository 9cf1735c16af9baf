"""``benchmarks/gemm_bench.py``: every kernel timed at each shape, ratios against the BF16 GEMM."""

from __future__ import annotations

import json

import pytest

import benchmarks.gemm_bench as bench


def test_each_shape_gets_every_kernel_and_its_ratio(tmp_path, capsys) -> None:
    out = tmp_path / "gemm.jsonl"
    bench.main(["--device", "cpu", "--shapes", "32x16x24", "48x32x16", "--repeats", "2", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kernels = list(bench.kernels(16, 16, 16, bench.torch.device("cpu")))
    assert [(r["shape"], r["kernel"]) for r in rows] == [(s, k) for s in ("32x16x24", "48x32x16") for k in kernels]
    for r in rows:
        assert "error" not in r, r  # the CPU build has every kernel
        reference = next(q for q in rows if q["shape"] == r["shape"] and q["kernel"] == "bf16")
        assert r["speed_vs_bf16"] == pytest.approx(reference["seconds"] / r["seconds"])
        assert ("tflops" in r) == ("relative_error" in r) == (r["kernel"] != "fp8_quantize")
    errors = {(r["shape"], r["kernel"]): r.get("relative_error") for r in rows}
    assert errors["48x32x16", "int8"] == 0  # integer products are exact in int32
    assert 0 < errors["48x32x16", "fp8_rowwise"] < 1e-2  # bf16 output rounding, nothing more
    assert "| 48x32x16 | fp8_rowwise+fast_accum |" in capsys.readouterr().out


def test_a_kernel_the_device_lacks_is_a_row_with_its_error(tmp_path, monkeypatch) -> None:
    def missing(*args, **kwargs):
        raise RuntimeError("Rowwise scaling is not currently supported on your device\nmore")

    monkeypatch.setattr(bench.torch, "_int_mm", missing)
    rows = bench.bench_shape("32x16x24", 1, bench.torch.device("cpu"))
    failed = [r for r in rows if "error" in r]
    assert [r["kernel"] for r in failed] == ["int8"]
    assert failed[0]["error"] == "Rowwise scaling is not currently supported on your device"
