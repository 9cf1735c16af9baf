"""``benchmarks/profile_sampling.py``: one denoiser call timed per model and layout, kernels listed."""

from __future__ import annotations

import json

import yaml

from benchmarks.profile_sampling import main
from tests.conftest import tiny_recipe


def test_times_fp_and_quantized_calls_in_both_layouts(tiny_model_dir, tmp_path, capsys) -> None:
    recipe = tmp_path / "w4a8.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir("unet2d"), quant={"w_bits": 4, "a_bits": 8})))
    out = tmp_path / "profile.json"
    main([str(recipe), "--batch-size", "2", "--repeats", "1", "--top", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    keys = [f"{m}_{layout}_ms" for m in ("fp", "quantized") for layout in ("nchw", "channels_last")]
    assert all(report[k] > 0 for k in keys) and report["batch_size"] == 2
    printed = capsys.readouterr().out
    assert "== fp (NCHW)" in printed and "== quantized (NCHW)" in printed
    assert printed.count("Self CPU time total") == 2  # one kernel table per model
