"""The layer library: trials assembled from uniform calibrations, one per distinct spec, reproducibly."""

from __future__ import annotations

import pytest
import torch

from qsearch.engine import Session
from qsearch.quant.spec import FULL_PRECISION
from qsearch.recipe import parse_recipe
from tests.conftest import tiny_recipe

BRECQ = [{"method": "uniform", "n_samples": 8},
         {"method": "brecq", "iters": 4, "lr": 1e-2, "act_iters": 2, "batch_size": 4}]


def _recipe(model_dir, **changes):
    data = tiny_recipe(model_dir, stages=BRECQ, layer_library=True)
    data.update(changes)
    return parse_recipe(data)


def _state(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


def _same_layer(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def mixed(tiny_model_dir):
    """A session, a recipe with the first down block at 2 bits and the rest at 4, and its model."""
    session = Session(_recipe(tiny_model_dir("unet2d")))
    recipe = _recipe(tiny_model_dir("unet2d"), overrides={"down_blocks.0.*": {"w_bits": 2}})
    return session, recipe, session.quantize(recipe)


def test_each_layer_comes_from_the_uniform_calibration_of_its_spec(mixed) -> None:
    session, recipe, ctx = mixed
    assert session.library.builds == 2  # W2A8 and W4A8: one calibration each, whatever the layer count
    uniform = {bits: session.quantize(recipe.model_copy(update={"overrides": {}, "quant": recipe.quant.model_copy(
        update={"w_bits": bits})})) for bits in (2, 4)}
    assert session.library.builds == 2  # the uniform recipes are the library's own entries
    low = [n for n in ctx.layers() if n.startswith("down_blocks.0.")]
    assert low and len(low) < len(ctx.layers())
    for name, layer in ctx.layers().items():
        bits = 2 if name in low else 4
        assert layer.weight_quantizer.bits == bits
        assert _same_layer(layer, uniform[bits].model.get_submodule(name)), name
    # learned rounding differs from the other spec's, so the assembly really picked per layer
    assert not torch.equal(ctx.layers()[low[0]].quantized_weight(),
                           uniform[4].model.get_submodule(low[0]).quantized_weight())


def test_a_later_trial_reuses_the_library(mixed) -> None:
    session, recipe, _ = mixed
    builds = session.library.builds
    other = recipe.model_copy(update={"overrides": {"up_blocks.*": {"w_bits": 2}}})
    ctx = session.quantize(other)
    assert session.library.builds == builds
    assert ctx.state["layer_library"]["built_now"] == 0
    assert "layer_library" in ctx.state["stage_seconds"]


def test_a_fresh_session_rebuilds_the_same_model(mixed, tiny_model_dir) -> None:
    """What export does with a stored trial recipe: entries built in another order, same layers."""
    _, recipe, ctx = mixed
    again = Session(_recipe(tiny_model_dir("unet2d"))).quantize(recipe)
    for name, layer in ctx.layers().items():
        assert _same_layer(layer, again.model.get_submodule(name)), name


def test_full_precision_layers_are_copied_from_the_fp_model(mixed, tiny_model_dir) -> None:
    session, recipe, _ = mixed
    kept = recipe.model_copy(update={"keep_fp": ["conv_in"]})
    ctx = session.quantize(kept)
    assert ctx.specs["conv_in"] == FULL_PRECISION
    assert "conv_in" not in ctx.layers()
    assert torch.equal(ctx.model.conv_in.weight, session.loaded.denoiser.conv_in.weight)


def test_pinned_layers_make_the_uniform_trial_the_recipe_itself(tiny_model_dir) -> None:
    """A study pins conv_in at 8 bits: its uniform W4 trial is the W4 recipe with conv_in at 8, calibrated so."""
    pins = {"overrides": {"conv_in": {"w_bits": 8}}, "library_pinned": ["conv_in"]}
    session = Session(_recipe(tiny_model_dir("unet2d")))
    ctx = session.quantize(_recipe(tiny_model_dir("unet2d"), **pins))
    assert session.library.builds == 1  # no W8 entry for the pinned layer
    recipe = _recipe(tiny_model_dir("unet2d"), **pins, layer_library=False)
    standalone = Session(recipe).quantize(recipe)
    assert ctx.layers()["conv_in"].weight_quantizer.bits == 8
    for name, layer in standalone.layers().items():
        assert _same_layer(layer, ctx.model.get_submodule(name)), name
    # a mixed trial takes the pinned layer from its base entry, not from a W8 calibration
    mixed = session.quantize(_recipe(tiny_model_dir("unet2d"), overrides={
        "conv_in": {"w_bits": 8}, "down_blocks.0.*": {"w_bits": 2}}, library_pinned=["conv_in"]))
    assert session.library.builds == 2
    assert _same_layer(mixed.model.conv_in, ctx.model.conv_in)


def test_pins_must_be_overrides(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="library_pinned: conv_in"):
        _recipe(tiny_model_dir("unet2d"), library_pinned=["conv_in"])


def test_error_correctors_are_refused(tiny_model_dir) -> None:
    recipe = _recipe(tiny_model_dir("unet2d"), stages=[*BRECQ, {"method": "ptqd"}])
    with pytest.raises(ValueError, match="error correctors"):
        Session(recipe).quantize(recipe)
