"""``qsearch search/studies/pareto/show`` end to end on a tiny U-Net."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from qsearch.cli import app
from qsearch.recipe import parse_recipe


def test_search_then_read_the_results(tiny_model_dir, tmp_path):
    space = {
        "name": "cli",
        "base": {
            "model": str(tiny_model_dir("unet2d")),
            "sampler": {"scheduler": "ddim", "steps": 2},
            "quant": {"w_bits": 8, "a_bits": 8},
            "calibration_pool": {"samples": 2},
            "stages": [{"method": "uniform", "n_samples": 2}, {"method": "rtn"}],
            "eval": {"n_samples": 2, "batch_size": 2, "fid": False, "fidelity_samples": 2, "device": "cpu"},
        },
        "granularity": "pattern",
        "layers": {"*": {"w_bits": [2, 8]}},
        "objectives": {"quality": "mse"},
        "trials": 5,
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    runner = CliRunner()

    result = runner.invoke(app, ["search", str(path), "--trials", "2", "--storage", url])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["search", str(path), "--trials", "2", "--storage", url])
    assert result.exit_code == 0 and "resuming" in result.output

    result = runner.invoke(app, ["studies", "--storage", url, "--json"])
    (row,) = json.loads(result.stdout)
    assert row["name"] == "cli" and row["states"] == {"COMPLETE": 2}

    png = tmp_path / "front.png"
    result = runner.invoke(app, ["pareto", "cli", "--storage", url, "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["objectives"] == ["mse", "avg_weight_bits"]
    assert {b["origin"] for b in out["baselines"]} == {"uniform-w2", "uniform-w8"}
    assert out["front"] and png.stat().st_size > 1000

    result = runner.invoke(app, ["show", "cli", str(out["front"][0]["number"]), "--storage", url, "--recipe"])
    assert result.exit_code == 0
    parse_recipe(yaml.safe_load(result.stdout))

    result = runner.invoke(app, ["show", "cli", "7", "--storage", url])
    assert result.exit_code == 2 and "no trial 7" in result.output
    result = runner.invoke(app, ["pareto", "nope", "--storage", url])
    assert result.exit_code == 2 and "no study 'nope'" in result.output
