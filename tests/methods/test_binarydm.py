"""BinaryDM: EBB reconstructs weights better than sign(), evolves to one basis; LRM; training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.binarydm import EBBQuantizer, LowRankMimicking, head_and_tail
from methods.lsq import FeatureTap
from qsearch.engine import Session
from qsearch.quant.modules import QuantConv2d
from qsearch.quant.quantizers import WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.recipe import parse_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _binary_layer(seed: int = 0) -> QuantConv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(16, 8, 3)
    with torch.no_grad():  # heavy-tailed weights, as trained networks have
        conv.weight.copy_(torch.distributions.Laplace(0.0, 0.05).sample(conv.weight.shape))
    return QuantConv2d.from_float(conv, QuantSpec(w_bits=1, a_bits=8))


def test_ebb_beats_sign_on_weight_reconstruction() -> None:
    layer = _binary_layer()
    w = layer.weight.detach()
    sign = WeightQuantizer(layer.spec, w.shape)
    sign.init_minmax(w)  # XNOR-Net: mean|w| per channel
    ebb = EBBQuantizer(layer, two_bases=True)
    one = EBBQuantizer(layer, two_bases=False)
    err = {name: float((q(w).detach() - w).square().sum()) for name, q in
           (("sign", sign), ("ebb", ebb), ("one", one))}
    assert err["ebb"] < 0.7 * err["sign"]
    assert err["one"] == pytest.approx(err["sign"], rel=1e-5)  # one basis is sign() with mean|w|
    # the definition: s1 sign(w) + s2 sign(w - s1 sign(w)) per output channel
    flat = w.reshape(8, -1)
    s1 = flat.abs().mean(1, keepdim=True)
    b1 = torch.where(flat >= 0, 1.0, -1.0)
    s2 = (flat - s1 * b1).abs().mean(1, keepdim=True)
    expected = s1 * b1 + s2 * torch.where(flat - s1 * b1 >= 0, 1.0, -1.0)
    assert torch.allclose(ebb(w).reshape(8, -1), expected, atol=1e-7)


def test_ebb_codes_and_evolution_to_one_basis() -> None:
    layer = _binary_layer(1)
    w = layer.weight.detach()
    ebb = EBBQuantizer(layer, two_bases=True)
    with torch.no_grad():  # fp16-exact scales: export rounding changes nothing
        ebb.scale.copy_(ebb.scale.half().float())
    q = ebb.encode(w)
    assert ebb.bits == 2 and set(q.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert torch.allclose(ebb.decode(q), ebb(w).detach(), atol=1e-7)
    ebb.evolve()
    assert ebb.bits == 1 and float(ebb.second.abs().sum()) == 0.0
    assert set(ebb.encode(w).unique().tolist()) <= {0.0, 1.0}
    plain = ebb.frozen(layer.spec)
    assert type(plain) is WeightQuantizer and plain.bits == 1
    assert torch.equal(plain(w), ebb(w).detach())


def test_ebb_gradients_reach_weights_and_both_scales() -> None:
    layer = _binary_layer(2)
    ebb = EBBQuantizer(layer, two_bases=True)
    layer.weight_quantizer = ebb
    layer.weight.requires_grad_(True)
    layer(torch.randn(2, 16, 6, 6)).square().sum().backward()
    assert layer.weight.grad.abs().sum() > 0
    assert ebb.scale.grad.abs().sum() > 0 and ebb.second.grad.abs().sum() > 0


def _recipe(model_dir, **stage) -> dict:
    return {
        "model": str(model_dir),
        "sampler": {"scheduler": "ddim", "steps": 4},
        "quant": {"w_bits": 1, "a_bits": 8},
        "overrides": {"conv_in": {"w_bits": 8}, "conv_out": {"w_bits": 8}},
        "calibration_pool": {"samples": 4},
        "stages": [{"method": "uniform", "n_samples": 8},
                   {"method": "binarydm", "steps": 12, "batch_size": 4, "lr": 1e-3, **stage}],
        "eval": {"n_samples": 2, "batch_size": 2, "fid": False, "fidelity_samples": 0, "device": "cpu"},
    }


def test_binarydm_trains_mimics_and_evolves(tiny_model_dir) -> None:
    recipe = parse_recipe(_recipe(tiny_model_dir("unet2d")))
    session = Session(recipe)
    ctx = session.quantize(recipe)
    curve = ctx.state["loss_curves"]["binarydm"]
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3
    layers = ctx.layers()
    assert all(type(m.weight_quantizer) is WeightQuantizer for m in layers.values())
    assert session.evaluate(ctx, recipe)["avg_weight_bits"] < 1.1  # evolved: 1 bit (+ 8-bit ends)

    # LRM: zero when the representations agree, positive otherwise, through a C/4 PCA basis
    blocks = ["down_blocks.0.resnets.0", "mid_block"]
    with FeatureTap(ctx, blocks) as tap:
        lrm = LowRankMimicking(tap, 0.25)
        x, t = ctx.trajectory.xs[1, :2], ctx.trajectory.timesteps[1].expand(2)
        ctx.fp_denoiser.forward(x, t, {})
        ctx.denoiser.forward(x, t, {})
        assert float(lrm.loss()) > 0
        assert lrm.bases["mid_block"].shape == (32, 8)
        tap.student.update(tap.teacher)
        assert float(lrm.loss()) == 0.0

    keep = parse_recipe(_recipe(tiny_model_dir("unet2d"), steps=2, evolve_at=1.0))
    ctx = session.quantize(keep)
    head = [n for n in ctx.layers() if n.startswith("down_blocks.0.")]
    assert head and all(isinstance(ctx.layers()[n].weight_quantizer, EBBQuantizer) for n in head)
    assert all(ctx.layers()[n].weight_quantizer.bits == 2 for n in head)  # two bases kept: 2 bits
    assert head_and_tail(ctx.model) == ["conv_in", "conv_out", "down_blocks.0.*", "up_blocks.1.*"]
