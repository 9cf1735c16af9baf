"""BiDM-style W1A1: binary activations with learned thresholds, SPD, training."""

from __future__ import annotations

import pytest
import torch

from methods.bidm import ApproxSign, BinaryActivation, BinaryWeight, patch_similarity_loss
from qsearch.engine import Session
from qsearch.quant.quantizers import WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.recipe import parse_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_binary_activation_is_a_scaled_sign_per_token() -> None:
    act = BinaryActivation(QuantSpec(w_bits=1, a_bits=8), channels=5)
    with torch.no_grad():
        act.threshold.copy_(torch.tensor([0.0, 0.5, -0.5, 0.0, 0.0]))
    x = torch.randn(2, 5, 3, 3)
    out = act(x)
    beta = x.abs().mean(1, keepdim=True)
    assert torch.allclose(out.abs(), beta.expand_as(out))  # one magnitude per pixel: 1 bit + scale
    assert torch.equal(out > 0, x + act.threshold.view(1, 5, 1, 1) >= 0)  # thresholds move the sign
    tokens = torch.randn(2, 7, 5)
    assert torch.allclose(act(tokens).abs(), tokens.abs().mean(-1, keepdim=True).expand(2, 7, 5))


def test_approx_sign_gradient_is_bireal() -> None:
    x = torch.tensor([-1.5, -0.5, -0.25, 0.0, 0.25, 0.75, 1.2], requires_grad=True)
    ApproxSign.apply(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 1.5, 2.0, 1.5, 0.5, 0.0]))


def test_binary_weight_freezes_to_the_core_one_bit_grid() -> None:
    spec = QuantSpec(w_bits=1, a_bits=8)
    w = (torch.randn(4, 9) * 0.05).half().float()
    bw = BinaryWeight(spec, w.shape)
    bw.spec = spec
    plain = bw.frozen(w)
    assert type(plain) is WeightQuantizer and plain.bits == 1
    assert torch.allclose(plain(w), bw(w), rtol=1e-3)  # up to the fp16 step size


def test_spd_matches_patch_structure_not_scale() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 4, 8, 8)
    assert float(patch_similarity_loss(t, t)) == 0.0
    assert float(patch_similarity_loss(3 * t, t)) < 1e-6  # each patch map is normalised
    assert float(patch_similarity_loss(torch.randn(2, 4, 8, 8), t)) > 0.1
    tokens = torch.randn(2, 16, 4)  # a 4 x 4 token grid
    assert float(patch_similarity_loss(tokens, tokens, patches=2)) == 0.0


def test_bidm_trains_w1a1(tiny_model_dir) -> None:
    recipe = parse_recipe({
        "model": str(tiny_model_dir("unet2d")),
        "sampler": {"scheduler": "ddim", "steps": 4},
        "quant": {"w_bits": 1, "a_bits": 8},
        "overrides": {"conv_in": {"w_bits": 8}, "conv_out": {"w_bits": 8}},
        "calibration_pool": {"samples": 4},
        "stages": [{"method": "uniform", "n_samples": 8},
                   {"method": "bidm", "steps": 12, "batch_size": 4, "lr": 1e-3}],
        "eval": {"n_samples": 2, "batch_size": 2, "fid": False, "fidelity_samples": 0, "device": "cpu"},
    })
    session = Session(recipe)
    ctx = session.quantize(recipe)
    curve = ctx.state["loss_curves"]["bidm"]
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3
    layers = ctx.layers()
    binary = [m for m in layers.values() if m.weight_quantizer.bits == 1]
    assert binary and all(type(m.weight_quantizer) is WeightQuantizer for m in binary)
    assert all(isinstance(m.act_quantizer, BinaryActivation) for m in binary)
    assert not isinstance(layers["conv_in"].act_quantizer, BinaryActivation)
    assert any(float(m.act_quantizer.threshold.abs().sum()) > 0 for m in binary)  # thresholds learned
    assert torch.isfinite(session.sampler.sample(ctx.denoiser, 2, batch_size=2)).all()
