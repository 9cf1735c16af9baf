"""``benchmarks/ablate.py``: the error split follows which rounding is coarse."""

from __future__ import annotations

import json

import yaml

from benchmarks.ablate import main
from tests.conftest import tiny_recipe


def test_coarse_weights_show_in_the_weights_only_figure(tiny_model_dir, tmp_path) -> None:
    recipe = tmp_path / "w2a8.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir("unet2d"), quant={"w_bits": 2, "a_bits": 8})))
    out = tmp_path / "ablation.jsonl"
    assert main([str(recipe), "--n-samples", "4", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    # 2-bit weights dominate: removing them helps far more than removing the 8-bit activations
    assert row["psnr_activations_only"] > row["psnr_weights_only"] + 10
    assert row["psnr"] <= row["psnr_activations_only"]
