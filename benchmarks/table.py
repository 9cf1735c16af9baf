"""Print the JSON-lines rows of ``run_recipes.py`` as a Markdown table, FP first, in recipe order.

    python benchmarks/table.py benchmarks/results/gpu_2k/ddpm_[012].jsonl --order w8a8_rtn w8a8_ptq4dm ...

Columns: FID-res9 and its difference to the FP row of the same files, PSNR of the final samples
against the FP model's on the same seeds, average weight bits, calibration (or fine-tuning) seconds,
peak GPU memory and the recipe that reproduces the row. Rows that failed show their error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_rows(files: list[Path]) -> list[dict]:
    """All rows of the files, one per name: a later row of the same name (a re-run, given in a later
    file) replaces the earlier one in its place, so the FP row written by each process appears once."""
    rows: dict[str, dict] = {}
    for file in files:
        for line in file.read_text().splitlines():
            row = json.loads(line)
            rows[row["name"]] = row
    return list(rows.values())


def ordered(rows: list[dict], order: list[str]) -> list[dict]:
    """FP first, then the rows named in ``order`` in that order, then the others as they came."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows, key=lambda r: (r["name"] != "FP32", rank.get(r["name"], len(rank))))


def markdown(rows: list[dict]) -> str:
    fp = next((r["metrics"]["fid"] for r in rows if r["name"] == "FP32"), None)
    lines = ["| row | FID-res9 | vs FP | PSNR vs FP (dB) | avg W bits | calibration s | peak GPU MB | recipe |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | `{r['recipe']}` |")
            continue
        m = r["metrics"]
        delta = "-" if fp is None or r["name"] == "FP32" else f"{m['fid'] - fp:+.2f}"
        calib = f"{r['timings']['calibrate_seconds']:.1f}" if "timings" in r else "-"
        peak = f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"
        psnr = "-" if m["psnr"] == float("inf") else f"{m['psnr']:.1f}"
        recipe = "-" if r["recipe"] == "fp" else f"`{r['recipe']}`"
        lines.append(f"| {r['name']} | {m['fid']:.2f} | {delta} | {psnr} | {m['avg_weight_bits']:.2f} | "
                     f"{calib} | {peak} | {recipe} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--order", nargs="*", default=[], help="row names in the order to print them")
    args = parser.parse_args(argv)
    print(markdown(ordered(load_rows(args.files), args.order)))


if __name__ == "__main__":
    main()
