"""The engine: default stages, fidelity ordering by bits, errors for bad layer patterns and NaNs."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_recipe
from qsearch.engine import NonFiniteError, Session
from qsearch.recipe import parse_recipe


@pytest.fixture(scope="module")
def session(tiny_model_dir) -> Session:
    return Session(parse_recipe(tiny_recipe(tiny_model_dir("unet2d"))))


def _recipe(session: Session, **overrides):
    return parse_recipe(tiny_recipe(session.base.model, **overrides))


def test_default_stages_calibrate_every_quantizer(session: Session) -> None:
    ctx = session.quantize(_recipe(session, stages=[]))  # uniform (256 inputs) + rtn added
    assert ctx.calibration is not None and len(ctx.calibration) == 256
    for layer in ctx.layers().values():
        assert layer.act_quantizer.calibrated
        assert not torch.equal(layer.weight_quantizer.scale, torch.ones_like(layer.weight_quantizer.scale))


def test_fewer_bits_lower_fidelity(session: Session) -> None:
    psnr = {}
    for bits in (8, 4, 2):
        recipe = _recipe(session, quant={"w_bits": bits, "a_bits": 8})
        psnr[bits] = session.evaluate(session.quantize(recipe), recipe)["psnr"]
    assert psnr[8] > psnr[4] > psnr[2]


def test_fp_model_untouched_by_quantization(session: Session) -> None:
    before = {k: v.clone() for k, v in session.fp.model.state_dict().items()}
    session.quantize(_recipe(session, quant={"w_bits": 2, "a_bits": 4}))
    after = session.fp.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_pattern_matching_no_layer_is_an_error(session: Session) -> None:
    with pytest.raises(ValueError, match="match no layer"):
        session.quantize(_recipe(session, overrides={"nonexistent.*": {"w_bits": 3}}))


def test_nan_producing_model_raises_non_finite(session: Session) -> None:
    recipe = _recipe(session)
    ctx = session.quantize(recipe)
    with torch.no_grad():
        list(ctx.layers().values())[-1].bias.fill_(float("nan"))  # after the last act quantizer
    with pytest.raises(NonFiniteError):
        session.evaluate(ctx, recipe)


def test_recipe_for_another_model_rejected(session: Session, tiny_model_dir) -> None:
    other = parse_recipe(tiny_recipe(tiny_model_dir("dit")))
    with pytest.raises(ValueError, match="model differs"):
        session.quantize(other)


def test_reconstruction_stages_learn_under_a_callers_no_grad(session: Session) -> None:
    """BitsFusion's sensitivity probe quantizes the base recipe inside ``torch.no_grad``: BRECQ must still learn."""
    recipe = _recipe(session, quant={"w_bits": 3, "a_bits": 8},
                     stages=[{"method": "uniform", "n_samples": 16},
                             {"method": "brecq", "iters": 4, "lr": 1e-2, "act_iters": 2, "batch_size": 8}])
    with torch.no_grad():
        ctx = session.quantize(recipe)
    assert ctx.state["stage_seconds"]["brecq"] > 0
