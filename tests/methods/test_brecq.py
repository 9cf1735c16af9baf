"""AdaRound and BRECQ: learned rounding that is exact to export, hard at the end, and better than RTN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import tiny_recipe
from methods.brecq import (
    AdaRoundQuantizer, RoundingConfig, bake_rounding, capture_unit, learn_rounding,
    lp_loss, reconstruction_units, rounding_beta,
)
from methods.qdiffusion import SplitWeightQuantizer
from qsearch.engine import Session
from qsearch.quant import QuantConv2d, QuantLinear, QuantSpec
from qsearch.quant.modules import activations_off
from qsearch.recipe import parse_recipe

W3 = QuantSpec(w_bits=3, a_bits=None)
GROUPED_ASYM = QuantSpec(w_bits=4, w_granularity="group", group_size=8, w_symmetric=False, a_bits=None)


def linear_problem(
    spec: QuantSpec, seed: int = 0, n: int = 256, shape: tuple[int, int] = (24, 16)
) -> tuple[QuantLinear, torch.Tensor, torch.Tensor]:
    """A quantized layer at min-max ranges, inputs, and the full-precision outputs to reconstruct."""
    torch.manual_seed(seed)
    fp = nn.Linear(*shape)
    x = torch.randn(n, shape[0])
    target = fp(x).detach()
    layer = QuantLinear.from_float(fp, spec)
    layer.weight.requires_grad_(False)
    layer.weight_quantizer.init_minmax(layer.weight)
    return layer, x, target


def test_rounding_starts_at_the_weight_and_schedule_matches_the_paper() -> None:
    layer, _, _ = linear_problem(W3)
    ada = AdaRoundQuantizer(layer.weight_quantizer, layer.weight)
    assert torch.allclose(ada(layer.weight), layer.weight, atol=1e-6)  # h(V) = fractional part
    assert rounding_beta(1, 100, 0.2, 20, 2) == 20 and rounding_beta(100, 100, 0.2, 20, 2) == 2
    assert rounding_beta(60, 100, 0.2, 20, 2) == pytest.approx(11.0)  # linear after warm-up


@pytest.mark.parametrize("spec", [W3, GROUPED_ASYM], ids=["channel-sym", "group-asym"])
def test_baked_weights_are_rtn_with_the_same_scale(spec: QuantSpec) -> None:
    layer, _, _ = linear_problem(spec)
    base = layer.weight_quantizer
    scale, rtn_codes = base.scale.clone(), base.encode(layer.weight)
    ada = AdaRoundQuantizer(base, layer.weight)
    with torch.no_grad():
        ada.alpha.copy_(torch.randn_like(ada.alpha))  # an arbitrary learned rounding
    learned = ada.encode(layer.weight)
    layer.weight_quantizer = ada
    bake_rounding(layer)
    assert layer.weight_quantizer is base and torch.equal(base.scale, scale)
    assert torch.equal(base.encode(layer.weight), learned)  # RTN on the same grid reproduces the codes
    assert torch.equal(base(layer.weight), layer.weight)  # the baked weight lies on the grid
    assert not torch.equal(learned, rtn_codes)
    assert ((learned - rtn_codes).abs() <= 1).all()  # rounding moves a code by at most one step


def test_split_weight_grids_are_read_element_wise() -> None:
    torch.manual_seed(0)
    spec = QuantSpec(w_bits=4, a_bits=None)
    conv = QuantConv2d.from_float(nn.Conv2d(12, 8, 1), spec)
    conv.weight.requires_grad_(False)
    conv.weight_quantizer = SplitWeightQuantizer(spec, conv.weight.shape, split=4)
    conv.weight_quantizer.init_minmax(conv.weight)
    ada = AdaRoundQuantizer(conv.weight_quantizer, conv.weight)
    assert torch.allclose(ada(conv.weight), conv.weight, atol=1e-6)
    conv.weight_quantizer = ada
    bake_rounding(conv)
    assert isinstance(conv.weight_quantizer, SplitWeightQuantizer)


def test_rounding_ends_hard_and_beats_round_to_nearest() -> None:
    def run(rounding_weight: float, iters: int) -> tuple[dict[str, float], QuantLinear]:
        layer, x, target = linear_problem(W3, n=64, shape=(16, 8))
        cfg = RoundingConfig(iters=iters, lr=1e-2, batch_size=16, rounding_weight=rounding_weight)
        return learn_rounding({"fc": layer}, len(x), lambda i: lp_loss(layer(x[i]), target[i], 2.0), cfg), layer

    record, layer = run(0.01, 1000)
    assert record["hard"] > 0.9  # the annealed regulariser decided (nearly) every weight
    assert record["after"] < record["before"]
    assert not isinstance(layer.weight_quantizer, AdaRoundQuantizer)
    # without the regulariser h(V) stays at the (soft) fractional parts that reproduce w exactly:
    # nothing is decided, and the final hard rounding is round-to-nearest again
    soft, _ = run(0.0, 200)
    assert soft["hard"] < 0.2
    assert soft["after"] == pytest.approx(soft["before"])


@pytest.fixture(scope="module")
def brecq_session(tiny_model_dir):
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": 3, "a_bits": 8},
        stages=[{"method": "uniform", "n_samples": 16},
                {"method": "brecq", "iters": 30, "lr": 1e-2, "act_iters": 5, "batch_size": 8}],
    ))
    session = Session(recipe)
    return session, recipe, session.quantize(recipe)


def test_units_follow_execution_order_and_replay_exactly(brecq_session) -> None:
    session, recipe, ctx = brecq_session
    names = [u.name for u in reconstruction_units(ctx.denoiser, ctx.calibration)]
    assert names[:3] == ["time_embedding.linear_1", "time_embedding.linear_2", "conv_in"]
    assert names.index("mid_block.resnets.0") < names.index("up_blocks.0.resnets.0")
    assert names[-1] == "conv_out" and "down_blocks.1.attentions.0" in names
    # replay: with quantization off (and RTN weights left as loaded) the quantized model computes the
    # FP one, so the captured inputs of the quantized model must reproduce the FP targets exactly
    plain = session.quantize(recipe.model_copy(update={"stages": recipe.stages[:1]}))
    for layer in plain.layers().values():
        layer.quant_enabled = False
    unit = next(u for u in reconstruction_units(plain.denoiser, plain.calibration) if u.name == "mid_block.resnets.1")
    data = capture_unit(plain, unit, plain.calibration, batch_size=4)
    assert len(data) == len(plain.calibration)
    assert torch.allclose(data.call(unit.module, torch.arange(len(data))), data.target, atol=1e-5)


def test_brecq_lowers_block_errors_and_leaves_exportable_weights(brecq_session) -> None:
    session, recipe, ctx = brecq_session
    report = ctx.state["reconstruction"]["brecq"]
    weights = [r for r in report["weights"].values() if r]
    assert len(weights) == report["units"]
    assert sum(r["after"] for r in weights) < sum(r["before"] for r in weights)
    assert sum(r["after"] < r["before"] for r in weights) >= 0.8 * len(weights)
    assert report["activations"]  # the step sizes were learned too
    for layer in ctx.layers().values():
        wq = layer.weight_quantizer
        assert not isinstance(wq, AdaRoundQuantizer)
        assert torch.equal(wq(layer.weight), layer.weight)  # every weight baked onto its grid
        assert not layer.weight.requires_grad
    with activations_off(ctx.layers()):
        assert all(layer.act_quantizer is None for layer in ctx.layers().values())
    assert all(layer.act_quantizer is not None for layer in ctx.layers().values())
    metrics = session.evaluate(ctx, recipe)
    assert metrics["psnr"] > 10
