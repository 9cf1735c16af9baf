"""Recipe files: valid ones parse; each malformed one is rejected naming the field at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsearch.recipe import RecipeError, load_recipe, parse_recipe, recipe_schema

VALID = """
model: zoo:ddpm-cifar10
sampler: {scheduler: ddim, steps: 50}
quant: {w_bits: 4, a_bits: 8}
overrides:
  "down_blocks.*.resnets.*.conv1": {w_bits: 3}
keep_fp: [conv_in, conv_out]
stages:
  - {method: uniform, n_samples: 128}
  - {method: mse_clip, p: 2.0}
eval: {n_samples: 100}
"""

# (file text, the field path the error must name, a fragment of the message)
MALFORMED = [
    ("model: x\nstages: [{method: mse_clp}]", "stages.0", "did you mean: mse_clip"),
    ("model: x\nstages: [{method: mse_clip, grid: many}]", "stages.0.mse_clip.grid", "valid integer"),
    ("model: x\nstages: [{method: mse_clip, gird: 4}]", "stages.0.mse_clip.gird", "Extra inputs"),
    ("model: x\nstages: [{n_samples: 4}]", "stages.0", "'method'"),
    ("model: x\nquant: {w_bits: 9}", "quant.w_bits", "less than or equal to 8"),
    ("model: x\nquant: {w_granularity: group}", "quant", "needs group_size"),
    ("model: x\nquant: {w_granularity: row}", "quant.w_granularity", "'tensor', 'channel' or 'group'"),
    ("model: x\noverrides: {'up.*': {w_bitz: 3}}", "overrides.up.*.w_bitz", "Extra inputs"),
    ("model: x\noverrides: {'up.*': {w_bits: 0}}", "overrides.up.*.w_bits", "greater than or equal to 1"),
    ("sampler: {steps: 50}", "model", "Field required"),
    ("model: x\nsampler: {scheduler: heun}", "sampler.scheduler", "'ddim'"),
    ("model: x\nsampler: {steps: 0}", "sampler.steps", "greater than or equal to 1"),
    ("model: x\neval: {n_samples: many}", "eval.n_samples", "valid integer"),
    ("model: x\nstages: [{method: rtn}, {method: uniform}]", "", "stages.1 (uniform, a calibration stage)"),
    ("model: x\nquant: {a_granularity: token}", "quant", "must be dynamic"),
    ("model: x\ncolour: blue", "colour", "Extra inputs"),
    ("- just\n- a list", "", "expected a mapping"),
    ("model: [unclosed", "", "line 1"),
]


def test_valid_recipe_parses(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(VALID)
    recipe = load_recipe(path)
    assert [s.method for s in recipe.stages] == ["uniform", "mse_clip"]
    assert recipe.stages[1].p == 2.0
    plan = recipe.layer_plan()
    assert plan.spec_for("down_blocks.1.resnets.0.conv1").w_bits == 3
    assert plan.spec_for("down_blocks.1.resnets.0.conv2").w_bits == 4
    assert plan.spec_for("conv_in").w_bits is None


@pytest.mark.parametrize("text,field,fragment", MALFORMED)
def test_malformed_recipe_names_the_field(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path))
    if field:
        assert f": {field}: " in message, message
    assert fragment in message, message


def test_missing_file_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_schema_lists_every_stage() -> None:
    schema = recipe_schema()
    text = str(schema)
    for name in ("uniform", "rtn", "mse_clip"):
        assert name in text
    assert "stages" in schema["properties"]


def test_parse_accepts_dicts() -> None:
    recipe = parse_recipe({"model": "x", "stages": [{"method": "rtn"}]})
    assert recipe.stages[0].method == "rtn"


def test_override_checked_against_the_default_spec(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\noverrides: {'up.*': {w_granularity: group}}")
    with pytest.raises(RecipeError, match=r"overrides.up.\*: .*needs group_size"):
        load_recipe(path)
