"""HQ-DiT: exact Hadamard rotation, exact FP grids, and a format that follows the data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import tiny_recipe
from methods.hq_dit import exponent_choices, fit_act_format, fit_weight_format, rotate_layer
from qsearch.engine import Session
from qsearch.quant import QuantConv2d, QuantLinear, QuantSpec
from qsearch.quant.grid import fp_table
from qsearch.recipe import parse_recipe

FP4 = QuantSpec(w_bits=4, w_format="fp", a_bits=4, a_format="fp")
RATIOS = torch.linspace(0.5, 1.0, 6)


def test_rotation_leaves_full_precision_output_unchanged() -> None:
    torch.manual_seed(0)
    layers = [
        (QuantLinear.from_float(nn.Linear(32, 24), FP4), torch.randn(3, 7, 32)),
        (QuantConv2d.from_float(nn.Conv2d(16, 8, 3, padding=1), FP4), torch.randn(2, 16, 6, 6)),
    ]
    for layer, x in layers:
        layer.quant_enabled = False
        before, weight = layer(x), layer.weight.detach().clone()
        assert rotate_layer(layer)
        assert not torch.allclose(layer.weight, weight)
        assert torch.allclose(layer(x), before, atol=1e-5)
    odd = QuantConv2d.from_float(nn.Conv2d(3, 8, 2), FP4)  # 3 channels: no Hadamard block
    assert not rotate_layer(odd) and odd.pre is None


def test_fp4_weights_land_exactly_on_the_e2m1_grid() -> None:
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(64, 16), FP4)
    fit_weight_format(layer, RATIOS, select_format=False)
    wq = layer.weight_quantizer
    assert wq.exponent_bits == 2
    values = (wq(layer.weight) / wq.scale.squeeze(-1)).abs()  # per-channel scales, (16, 1)
    assert set(values.unique().tolist()) <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    spec = fit_weight_format(layer, RATIOS, select_format=True)  # any chosen split is on its own grid
    wq = layer.weight_quantizer
    grid = set(abs(v) for v in fp_table(4, spec.w_exponent_bits))
    assert set((wq(layer.weight) / wq.scale.squeeze(-1)).abs().unique().tolist()) <= grid


def test_heavy_tails_get_more_exponent_bits_than_flat_data() -> None:
    torch.manual_seed(0)
    flat = torch.rand(32, 256) * 2 - 1
    heavy = torch.randn(32, 256) * torch.exp(1.5 * torch.randn(32, 256))  # log-normal scale mixture
    chosen = []
    for w in (flat, heavy):
        layer = QuantLinear.from_float(nn.Linear(256, 32), FP4)
        layer.weight.data.copy_(w)
        chosen.append(fit_weight_format(layer, RATIOS, select_format=True).w_exponent_bits)
    assert chosen[0] < chosen[1]
    assert set(chosen) <= set(exponent_choices(4))
    act = [fit_act_format(FP4, rows.T.contiguous(), RATIOS, select_format=True)[1].a_exponent_bits
           for rows in (flat, heavy)]
    assert act[0] < act[1]


@pytest.mark.parametrize("bits", [4, 8])
def test_stage_on_a_tiny_dit(tiny_model_dir, bits: int) -> None:
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("dit"),
        quant={"w_bits": bits, "w_format": "fp", "a_bits": bits, "a_format": "fp"},
        stages=[{"method": "uniform", "n_samples": 4},
                {"method": "hq_dit", "clip_grid": 3, "max_rows": 128}],
    ))
    session = Session(recipe)
    ctx = session.quantize(recipe)
    layers = ctx.layers()
    rotated = [n for n, l in layers.items() if l.pre is not None]
    assert "transformer_blocks.0.attn1.to_q" in rotated and "pos_embed.proj" not in rotated
    for name, layer in layers.items():
        assert ctx.specs[name] == layer.spec
        assert layer.weight_quantizer.exponent_bits == layer.spec.w_exponent_bits
        assert layer.act_quantizer.exponent_bits == layer.spec.a_exponent_bits
        assert layer.act_quantizer.calibrated
    x, t, cond = next(ctx.calibration.batches(4))
    quantized = ctx.denoiser.forward(x, t, cond)
    for layer in layers.values():
        layer.quant_enabled = False
    assert torch.allclose(ctx.denoiser.forward(x, t, cond), ctx.fp_denoiser.forward(x, t, cond), atol=1e-4)
    assert torch.isfinite(quantized).all()
