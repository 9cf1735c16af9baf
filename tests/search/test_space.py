"""Search-space files: validation with paths, decisions per granularity, the recipe of a configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.search.synthetic import PARAMS, base_recipe, space_data

from qsearch.quant.apply import LayerPlan
from qsearch.recipe import RecipeError, parse_recipe
from qsearch.search.space import (
    block_of,
    build_recipe,
    default_params,
    distributions,
    layer_groups,
    load_space,
    parse_space,
    space_schema,
)

SPACES = Path(__file__).resolve().parents[2] / "spaces"
NAMES = list(PARAMS)


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_validate(path):
    space = load_space(path)
    assert space.name and space.base["model"]
    assert "name:" in space._source_text  # the file as written is kept for the study record


def test_the_four_spaces_exist():
    assert {p.name for p in SPACES.glob("*.yaml")} >= {
        "quickstart.yaml", "ddpm-cifar10.yaml", "dit-cifar10.yaml", "hub-ddpm-cifar10-32.yaml"}
    assert load_space(SPACES / "ddpm-cifar10.yaml").trials >= 100


def test_errors_name_the_file_and_field_path(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text(
        "name: s\n"
        "base: {model: m, stages: [{method: uniform, n_sample: 3}]}\n"
        "layers: {'*': {w_bits: [4]}}\n"
    )
    with pytest.raises(RecipeError) as exc:
        load_space(bad)
    assert f"{bad}: base.stages.0.uniform.n_sample" in str(exc.value) or f"{bad}: base.stages.0.n_sample" in str(exc.value)

    with pytest.raises(RecipeError, match=r"layers\.\*\.w_bit: Extra inputs"):
        parse_space(space_data(layers={"*": {"w_bit": [4]}}))
    with pytest.raises(RecipeError, match=r"layers\.\*\.w_bits\.1: .*less than or equal to 8"):
        parse_space(space_data(layers={"*": {"w_bits": [4, 9]}}))
    with pytest.raises(RecipeError, match=r"knobs\.stages\.0\.method\.1: 'unifrom'.*unknown method"):
        parse_space(space_data(knobs={"stages.0.method": ["uniform", "unifrom"]}))
    with pytest.raises(RecipeError, match="sampler"):
        parse_space(space_data(sampler="annealing"))
    with pytest.raises(RecipeError, match="nothing to search"):
        parse_space(space_data(layers={}))


def test_block_of():
    assert block_of("down_blocks.1.resnets.0.conv1") == "down_blocks.1"
    assert block_of("mid_block.attentions.0.to_q") == "mid_block"
    assert block_of("transformer_blocks.3.ff.net.0.proj") == "transformer_blocks.3"
    assert block_of("conv_in") == "conv_in"


@pytest.mark.parametrize("granularity, keys", [
    ("block", ["down_blocks.0", "mid_block", "up_blocks.0"]),
    ("pattern", ["*"]),
    ("layer", [n for n in NAMES if n not in ("conv_in", "conv_out")]),
])
def test_groups_per_granularity(granularity, keys):
    space = parse_space(space_data(granularity=granularity))
    groups = layer_groups(space, NAMES)
    assert [g.key for g in groups] == keys
    # keep_fp layers of the base recipe are never searched; every other layer is in exactly one group
    members = [n for g in groups for n in g.layers]
    assert sorted(members) == sorted(n for n in NAMES if n not in ("conv_in", "conv_out"))


def test_first_matching_pattern_wins_and_unmatched_patterns_are_errors():
    space = parse_space(space_data(granularity="pattern",
                                   layers={"mid_block.*": {"w_bits": [8]}, "*": {"w_bits": [2, 4]}}))
    groups = {g.key: g for g in layer_groups(space, NAMES)}
    assert groups["mid_block.*"].layers == ("mid_block.attentions.0.to_q", "mid_block.attentions.0.to_k")
    assert "mid_block.attentions.0.to_q" not in groups["*"].layers
    with pytest.raises(ValueError, match="match no quantized layer of the model: typo"):
        layer_groups(parse_space(space_data(layers={"typo": {"w_bits": [4]}, "*": {"w_bits": [4]}})), NAMES)


def test_configuration_recipe_gives_each_layer_its_choice():
    base = base_recipe()
    base["overrides"] = {"mid_block.*": {"a_bits": 16}, "up_blocks.*": {"w_bits": 5}}
    space = parse_space(space_data(base=base, layers={"*": {"w_bits": [2, 4], "group_size": ["channel", 64]}},
                                   knobs={"stages.0.n_samples": [8, 16]}))
    groups = layer_groups(space, NAMES)
    params = {"w_bits:down_blocks.0": 2, "group_size:down_blocks.0": 64, "w_bits:mid_block": 4,
              "group_size:mid_block": "channel", "w_bits:up_blocks.0": 2, "group_size:up_blocks.0": "channel",
              "knob:stages.0.n_samples": 16}
    assert set(distributions(space, groups)) == set(params)
    recipe = parse_recipe(build_recipe(space, groups, params))
    plan = recipe.layer_plan()
    spec = plan.spec_for("down_blocks.0.resnets.0.conv1")
    assert (spec.w_bits, spec.w_granularity, spec.group_size) == (2, "group", 64)
    mid = plan.spec_for("mid_block.attentions.0.to_k")
    assert (mid.w_bits, mid.w_granularity, mid.a_bits) == (4, "channel", 16)  # base override kept
    assert plan.spec_for("up_blocks.0.resnets.0.conv1").w_bits == 2  # the searched value wins
    assert plan.spec_for("conv_in").w_bits is None
    assert recipe.stages[0].n_samples == 16
    # the recipe is self-contained: a LayerPlan from its dict alone resolves the same specs
    again = LayerPlan(default=recipe.quant, overrides={k: v.model_dump(exclude_unset=True) for k, v in recipe.overrides.items()},
                      keep_fp=recipe.keep_fp)
    assert all(again.spec_for(n) == plan.spec_for(n) for n in NAMES)


def test_the_layer_library_keeps_the_pinned_groups_in_every_entry():
    layers = {"mid_block*": {"w_bits": [8], "group_size": ["channel"]}, "*": {"w_bits": [2, 8]}}
    for library in (True, False):
        space = parse_space(space_data(base={**base_recipe(), "layer_library": library}, layers=layers))
        groups = layer_groups(space, NAMES)
        recipe = parse_recipe(build_recipe(space, groups, default_params(space, groups, w_bits=2)))
        mid = sorted(n for n in NAMES if n.startswith("mid_block"))
        assert sorted(recipe.library_pinned) == (mid if library else [])  # searched groups are never pinned


def test_default_params_are_the_base_values_where_possible():
    space = parse_space(space_data(layers={"*": {"w_bits": [2, 8], "a_bits": [None, 8]}},
                                   knobs={"stages.0.n_samples": [4, 8]}))
    groups = layer_groups(space, NAMES)
    params = default_params(space, groups, w_bits=2)
    assert all(params[g.param("w_bits")] == 2 and params[g.param("a_bits")] == 8 for g in groups)
    assert params["knob:stages.0.n_samples"] == 8
    pinned = parse_space(space_data(layers={"mid_block*": {"w_bits": [8]}, "*": {"w_bits": [2, 8]}}))
    params = default_params(pinned, layer_groups(pinned, NAMES), w_bits=2)
    assert params["w_bits:mid_block"] == 8 and params["w_bits:down_blocks.0"] == 2  # a pin is not overridden


def test_schema_lists_the_fields_and_accepts_the_shipped_spaces():
    schema = space_schema()
    props = schema["properties"]
    assert {"name", "base", "layers", "knobs", "granularity", "constraints", "objectives", "sampler",
            "seed", "fidelity", "seed_trials"} <= set(props)
    assert "stages" in props["base"]["properties"]  # base is checked as a recipe
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    for path in SPACES.glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(space_data(base={"model": "m", "stages": [{"method": "rtn", "bogus": 1}]}), schema)


def test_schema_command():
    import json

    from typer.testing import CliRunner

    from qsearch.cli import app

    result = CliRunner().invoke(app, ["schema", "space"])
    assert result.exit_code == 0, result.output
    assert "granularity" in json.loads(result.stdout)["properties"]
