"""The ``qsearch`` command end to end on the zoo DDPM (few samples, few steps, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qsearch.cli import app
from qsearch.registry import REGISTRY
from qsearch.zoo import find_zoo

ZOO = find_zoo()
needs_zoo = pytest.mark.skipif(ZOO is None or not (ZOO / "ddpm-cifar10").is_dir(),
                               reason="the reference zoo (shared/zoo) is not beside this checkout")
runner = CliRunner()


def _recipe(tmp_path: Path, **changes) -> Path:
    data = {
        "name": "cli-w8a8",
        "model": "zoo:ddpm-cifar10",
        "sampler": {"scheduler": "ddim", "steps": 3},
        "quant": {"w_bits": 8, "a_bits": 8},
        "calibration_pool": {"samples": 4},
        "stages": [{"method": "uniform", "n_samples": 8}, {"method": "rtn"}],
        "eval": {"n_samples": 24, "batch_size": 24, "device": "cpu", "fidelity_samples": 8},
        **changes,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
@needs_zoo
def test_quantize_prints_fid_fidelity_bits_and_time(tmp_path: Path) -> None:
    result = runner.invoke(app, ["quantize", str(_recipe(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    metrics = out["metrics"]
    assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert metrics["avg_weight_bits"] == pytest.approx(8.0, abs=0.5)  # FP-kept layers count at 16
    assert metrics["model_mb"] < 17.9 * 0.6  # 8.95 M params: FP16 is 17.9 MB
    assert metrics["psnr"] > 20  # W8A8 stays close to the FP samples on the same seeds
    assert out["timings"]["calibrate_seconds"] > 0 and out["seconds"] > 0


@pytest.mark.slow
@needs_zoo
def test_quantize_table_output_and_fp_column(tmp_path: Path) -> None:
    result = runner.invoke(app, ["quantize", str(_recipe(tmp_path, eval={
        "n_samples": 8, "batch_size": 8, "device": "cpu", "fid": False, "fidelity_samples": 8})),
        "--with-fp"])
    assert result.exit_code == 0, result.output
    assert "avg_weight_bits" in result.output and "FP" in result.output


def test_malformed_recipe_names_the_file_and_field(tmp_path: Path) -> None:
    path = _recipe(tmp_path, quant={"w_bits": 12})
    result = runner.invoke(app, ["quantize", str(path)])
    assert result.exit_code != 0
    assert "recipe.yaml" in result.output and "quant.w_bits" in result.output


def test_unknown_method_suggests_a_close_name(tmp_path: Path) -> None:
    path = _recipe(tmp_path, stages=[{"method": "brecqq"}])
    result = runner.invoke(app, ["quantize", str(path)])
    assert result.exit_code != 0
    assert "brecq" in result.output


def test_methods_lists_every_registered_stage_with_kind_and_paper() -> None:
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    listed = {m["name"]: m for m in json.loads(result.stdout)}
    assert set(listed) == set(REGISTRY.names())
    assert {m["kind"] for m in listed.values()} == {"calibration", "reparameterize", "quantize", "correct"}
    assert all(m["paper"] for m in listed.values())


def test_schema_exports_the_recipe_json_schema() -> None:
    result = runner.invoke(app, ["schema", "recipe"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert "stages" in json.dumps(schema) and "w_bits" in json.dumps(schema)
