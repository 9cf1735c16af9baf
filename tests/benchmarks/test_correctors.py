"""``benchmarks/correctors.py``: one quantization, every corrector of the recipe evaluated alone."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from benchmarks.correctors import main, spread
from tests.conftest import tiny_recipe


def test_spread_reads_contrast_and_brightness() -> None:
    flat = torch.zeros(4, 3, 2, 2)
    flat[:, :, 0] = 1.0  # every image half 1, half 0: std ~0.52 per image, identical means
    contrast, brightness = spread(flat)
    assert contrast == pytest.approx(float(flat[0].flatten().std()))
    assert brightness == pytest.approx(0.0)
    assert spread(flat * 0.5)[0] == pytest.approx(contrast * 0.5)


def test_each_corrector_is_compared_with_the_uncorrected_model(tiny_model_dir, tmp_path) -> None:
    stages = [{"method": "uniform", "n_samples": 8}, {"method": "rtn"},
              {"method": "ptqd"}, {"method": "d2dpm", "variant": "deterministic"}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir("unet2d"), stages=stages,
                                                 quant={"w_bits": 3, "a_bits": 6})))
    out = tmp_path / "rows.jsonl"
    assert main([str(recipe), "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["fp"] == {"psnr": pytest.approx(row["fp"]["psnr"]), "contrast_ratio": 1.0, "brightness_spread_ratio": 1.0}
    labels = ["uncorrected", "ptqd", "d2dpm variant=deterministic"]
    assert all(label in row for label in labels)
    # the correctors change the samples: a corrector silently left out would repeat the uncorrected figures
    assert row["ptqd"]["psnr"] != row["uncorrected"]["psnr"]
    assert row["d2dpm variant=deterministic"]["psnr"] != row["uncorrected"]["psnr"]


def test_a_recipe_without_corrector_is_refused(tiny_model_dir, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir("unet2d"))))
    with pytest.raises(SystemExit, match="no error-corrector"):
        main([str(recipe), "--out", str(tmp_path / "rows.jsonl")])
