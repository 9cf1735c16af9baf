"""``benchmarks/export_bench.py``: rows written as measured, ratios against the references run first."""

from __future__ import annotations

import json

import pytest

import benchmarks.export_bench as bench
from benchmarks.random_model import write_random_model

TINY = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "sample_size": 8}
ARGS = ["--device", "cpu", "--batch-sizes", "2", "--steps", "1", "--repeats", "1", "--calib-samples", "2"]


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory) -> str:
    return str(write_random_model("dit-xl-2-256", tmp_path_factory.mktemp("dit") / "m", TINY))


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def bench_rows(model: str, tmp_path, *flags: str) -> list[dict]:
    """The rows a tiny CPU run with ``flags`` writes (given after ``ARGS``: a repeated flag wins)."""
    out = tmp_path / "rows.jsonl"
    bench.main(["--models", model, "--out", str(out), *ARGS, *flags])
    return rows_of(out)


def test_bf16_reference_alone_gives_each_row_its_speed_ratio(tiny_dit, tmp_path, capsys) -> None:
    rows = bench_rows(tiny_dit, tmp_path, "--references", "bf16", "--configs", "W4", "--backends", "fake")
    assert [r["config"] for r in rows] == ["BF16", "W4", "W4"]
    for r in rows[1:]:
        assert r["speed_vs_bf16"] == pytest.approx(rows[0]["seconds"] / r["seconds"])
        assert "speed_vs_fp16" not in r and "memory_vs_fp16" not in r  # no FP16 model was run
        assert r["size_vs_fp16"] > 0  # against the FP16 file, which is written whatever the references
    table = capsys.readouterr().out
    assert "| W4 | fake |" in table and "| - |" in table


def test_a_run_cut_off_keeps_the_rows_it_measured(tiny_dit, tmp_path, monkeypatch) -> None:
    out = tmp_path / "rows.jsonl"

    def cut_off(*args, **kwargs):
        raise KeyboardInterrupt  # what a time limit's signal does to the run

    monkeypatch.setattr(bench, "load", cut_off)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--models", tiny_dit, "--out", str(out), "--configs", "W4", "--backends", "fake", *ARGS])
    rows = rows_of(out)
    assert [r["config"] for r in rows] == ["FP16", "BF16"]
    assert rows[1]["speed_vs_fp16"] == pytest.approx(rows[0]["seconds"] / rows[1]["seconds"])


def test_profile_is_taken_at_the_largest_batch_only(tiny_dit, tmp_path, capsys) -> None:
    rows = bench_rows(tiny_dit, tmp_path, "--references", "bf16", "--configs", "W4", "--backends", "fake",
                      "--batch-sizes", "1", "2", "--profile")
    assert {r["batch"] for r in rows} == {1, 2}
    for r in rows:
        if r["batch"] == 2:
            assert r["profile"]["kernel_ms"]["matmul"] > 0  # the DiT's linear layers
        else:
            assert "profile" not in r
    assert "| W4 | fake |" in capsys.readouterr().out.split("Kernel time of one profiled run")[1]


def test_fp8_rows_with_and_without_fast_accumulation(tiny_dit, tmp_path) -> None:
    """``--backends scaled_mm`` measures both accumulation modes, labelled apart, every layer on the kernel."""
    rows = bench_rows(tiny_dit, tmp_path, "--references", "bf16", "--configs", "W8A8-fp8", "--backends", "scaled_mm")
    assert [r["backend"] for r in rows] == ["dense", "scaled_mm", "scaled_mm+fast_accum"]
    for r in rows[1:]:
        assert set(r["layers_by_kernel"]) >= {"scaled_mm"} and "speed_vs_bf16" in r


def test_fused_qkv_in_references_and_quantized_models(tiny_dit, tmp_path) -> None:
    rows = bench_rows(tiny_dit, tmp_path, "--references", "bf16", "--configs", "W8A8-fp8",
                      "--backends", "scaled_mm+fast_accum", "--fuse-qkv")  # one variant, by its label
    assert [r["backend"] for r in rows] == ["dense", "scaled_mm+fast_accum"]
    assert all(r["fuse_qkv"] for r in rows)
    assert rows[1]["fused_attention"] == 1  # the tiny DiT's one self-attention
