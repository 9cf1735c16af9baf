"""``benchmarks/table.py``: one FP row, differences to it, the requested order, failed rows shown."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.table import load_rows, markdown, ordered


def _row(name: str, fid: float, psnr: float = 20.0) -> dict:
    return {"name": name, "recipe": "fp" if name == "FP32" else f"r/{name}.yaml",
            "metrics": {"fid": fid, "psnr": psnr, "avg_weight_bits": 4.0},
            "timings": {"calibrate_seconds": 1.5}, "peak_memory_mb": 100.0}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_of_several_processes_make_one_table(tmp_path) -> None:
    a = _write(tmp_path / "a.jsonl", [_row("FP32", 40.0, float("inf")), _row("w4a8_rtn", 150.0)])
    b = _write(tmp_path / "b.jsonl", [_row("FP32", 40.0, float("inf")), _row("w8a8_rtn", 41.5),
                                      {"name": "w4a6_rtn", "recipe": "r/w4a6_rtn.yaml", "error": "RuntimeError: NaN"}])
    rows = ordered(load_rows([a, b]), ["w8a8_rtn", "w4a8_rtn"])
    assert [r["name"] for r in rows] == ["FP32", "w8a8_rtn", "w4a8_rtn", "w4a6_rtn"]  # FP once, first
    lines = markdown(rows).splitlines()[2:]
    assert lines[0].startswith("| FP32 | 40.00 | - | - |")
    assert "| w8a8_rtn | 41.50 | +1.50 | 20.0 | 4.00 | 1.5 | 100 | `r/w8a8_rtn.yaml` |" == lines[1]
    assert "+110.00" in lines[2]
    assert "failed: RuntimeError: NaN" in lines[3]


def test_a_rerun_in_a_later_file_replaces_the_earlier_row(tmp_path) -> None:
    old = _write(tmp_path / "old.jsonl", [_row("FP32", 40.0, float("inf")), _row("w8a8_ptq4dm", 71.8),
                                          _row("w8a8_rtn", 41.5)])
    new = _write(tmp_path / "new.jsonl", [_row("w8a8_ptq4dm", 41.9)])
    rows = load_rows([old, new])
    assert [r["name"] for r in rows] == ["FP32", "w8a8_ptq4dm", "w8a8_rtn"]
    assert rows[1]["metrics"]["fid"] == 41.9
