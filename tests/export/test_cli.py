"""``qsearch export`` (a study's Pareto point) and ``qsearch export-recipe``."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.export.export_testing import eps, quantize, recipe
from qsearch.cli import app
from qsearch.export import load
from qsearch.export.selection import choose_point

FRONT = [
    {"number": 4, "fid": 30.0, "avg_weight_bits": 8.0},
    {"number": 7, "fid": 31.5, "avg_weight_bits": 4.0},
    {"number": 9, "metrics": {"fid": 36.0, "avg_weight_bits": 3.0}},
]


@pytest.mark.parametrize(
    ("kwargs", "number"),
    [({"max_bits": 4.5}, 7), ({"max_bits": 8}, 4), ({"max_fid": 32}, 7), ({"max_fid": 40}, 9),
     ({"trial": 9}, 9)],
)
def test_choose_point(kwargs, number) -> None:
    assert choose_point(FRONT, **kwargs)["number"] == number


def test_choose_point_errors() -> None:
    with pytest.raises(ValueError, match="no Pareto point has average weight bits <= 2"):
        choose_point(FRONT, max_bits=2)
    with pytest.raises(ValueError, match="exactly one"):
        choose_point(FRONT, max_bits=4, max_fid=30)
    assert choose_point(FRONT, trial=12) == {"number": 12}  # not on the front: still exportable


def test_export_recipe_command(tiny_model_dir, tmp_path) -> None:
    data = recipe(tiny_model_dir("dit"), {"w_bits": 4, "a_bits": 8})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["export-recipe", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    _, ctx = quantize(data)  # the same recipe, rebuilt: the command exported this model
    assert torch.equal(eps(load(tmp_path / "out", backend="fake")), eps(ctx.model))


def test_export_command_picks_the_point_and_records_provenance(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """Against the storage contract: pareto_front(url, study) rows, trial_recipe(url, study, n)."""
    recipes = {7: recipe(tiny_model_dir("dit"), {"w_bits": 4, "a_bits": None}),
               4: recipe(tiny_model_dir("dit"), {"w_bits": 8, "a_bits": 8})}
    calls = []
    storage = types.ModuleType("qsearch.storage")
    storage.pareto_front = lambda url, study: calls.append((url, study)) or FRONT
    storage.trial_recipe = lambda url, study, number: recipes[number]
    storage.trial_metrics = lambda url, study, number: {}
    monkeypatch.setitem(sys.modules, "qsearch.storage", storage)
    url = "postgresql://me:secret@db/studies"
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "ddpm-study", "--max-bits", "5", "--out", str(out), "--storage", url])
    assert result.exit_code == 0, result.output
    assert calls == [(url, "ddpm-study")]
    provenance = json.loads((out / "qsearch_config.json").read_text())["provenance"]
    assert (provenance["study"], provenance["trial"], provenance["fid"]) == ("ddpm-study", 7, 31.5)
    assert "secret" not in provenance["storage"]
    model = load(out, backend="fake")
    assert {e["spec"]["w_bits"] for e in model.qsearch_config["layers"].values()} == {4}


def test_export_command_records_the_metrics_of_a_trial_off_the_front(tiny_model_dir, tmp_path, monkeypatch) -> None:
    storage = types.ModuleType("qsearch.storage")
    storage.pareto_front = lambda url, study: FRONT
    storage.trial_recipe = lambda url, study, number: recipe(tiny_model_dir("dit"), {"w_bits": 6, "a_bits": None})
    storage.trial_metrics = lambda url, study, number: {"proxy": {"psnr": 20.0},
                                                        "full": {"fid": 44.0, "avg_weight_bits": 6.0}}
    monkeypatch.setitem(sys.modules, "qsearch.storage", storage)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "s", "--trial", "12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "qsearch_config.json").read_text())["provenance"]
    assert (provenance["trial"], provenance["fid"], provenance["avg_weight_bits"]) == (12, 44.0, 6.0)


def test_export_command_reports_an_impossible_budget(monkeypatch, tmp_path) -> None:
    storage = types.ModuleType("qsearch.storage")
    storage.pareto_front = lambda url, study: FRONT
    storage.trial_recipe = lambda url, study, number: {}
    storage.trial_metrics = lambda url, study, number: {}
    monkeypatch.setitem(sys.modules, "qsearch.storage", storage)
    result = CliRunner().invoke(app, ["export", "s", "--max-fid", "10", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no Pareto point has FID <= 10" in result.output
