"""GPTQ: RTN when inputs are uncorrelated, lower output error than RTN when they are, on the grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.gptq import HessianAccumulator, column_rounder, gptq_round, input_columns
from qsearch.engine import Session
from qsearch.quant import QuantConv2d, QuantLinear, QuantSpec
from qsearch.recipe import parse_recipe
from tests.conftest import tiny_recipe

W3 = QuantSpec(w_bits=3, a_bits=None)
GROUPED_ASYM = QuantSpec(w_bits=3, w_granularity="group", group_size=8, w_symmetric=False, a_bits=None)


def _layer(spec: QuantSpec, shape: tuple[int, int] = (32, 24)) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(*shape), spec)
    layer.weight_quantizer.init_minmax(layer.weight)
    return layer


def _correlated_inputs(cols: int, n: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g)


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ (w - q).T).pow(2).sum())


@pytest.mark.parametrize("spec", [W3, GROUPED_ASYM], ids=["channel-sym", "group-asym"])
def test_uncorrelated_inputs_give_round_to_nearest(spec: QuantSpec) -> None:
    layer = _layer(spec)
    wq, w = layer.weight_quantizer, layer.weight.detach()
    hessian = torch.diag(torch.rand(w.shape[1]) + 0.5)  # diagonal: nothing to compensate
    q = gptq_round(w, hessian, column_rounder(wq, w.shape[0]), block_size=5)
    assert torch.equal(wq.encode(q), wq.encode(w))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [W3, GROUPED_ASYM], ids=["channel-sym", "group-asym"])
def test_correlated_inputs_lower_the_output_error_on_the_same_grid(spec: QuantSpec, act_order: bool) -> None:
    layer = _layer(spec)
    wq, w = layer.weight_quantizer, layer.weight.detach()
    x = _correlated_inputs(w.shape[1])
    hessian = 2 * x.T @ x / x.shape[0]
    q = gptq_round(w, hessian, column_rounder(wq, w.shape[0]), block_size=7, act_order=act_order)
    assert torch.allclose(wq.decode(wq.encode(q)), q, atol=1e-6)  # every weight is a grid point
    rtn = wq.decode(wq.encode(w))
    assert _output_error(x, w, q) < 0.75 * _output_error(x, w, rtn)
    assert not torch.equal(wq.encode(q), wq.encode(w))


def test_blocks_change_nothing_but_speed() -> None:
    layer = _layer(W3)
    wq, w = layer.weight_quantizer, layer.weight.detach()
    x = _correlated_inputs(w.shape[1])
    hessian = 2 * x.T @ x / x.shape[0]
    one = gptq_round(w, hessian, column_rounder(wq, w.shape[0]), block_size=1)
    many = gptq_round(w, hessian, column_rounder(wq, w.shape[0]), block_size=128)
    assert torch.equal(wq.encode(one), wq.encode(many))


def test_conv_patches_are_in_weight_column_order() -> None:
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(3, 5, 3, padding=1, stride=2), W3)
    x = torch.randn(2, 3, 9, 9)
    cols = input_columns(conv, x)
    out = nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    as_matmul = (cols @ conv.weight.flatten(1).T).reshape(2, -1, 5).transpose(1, 2).reshape(out.shape)
    assert torch.allclose(as_matmul, out, atol=1e-5)


def test_hessian_of_batches_equals_the_hessian_of_all_inputs() -> None:
    layer = _layer(W3)
    x = _correlated_inputs(32, n=300)
    acc = HessianAccumulator({"l": layer})
    for chunk in x.split([100, 37, 163]):
        acc.add("l", chunk)
    assert torch.allclose(acc.hessians["l"], 2 * x.T @ x / 300, rtol=1e-4, atol=1e-3)


def _output_mse(model_dir, method: str) -> float:
    recipe = parse_recipe(tiny_recipe(
        model_dir, quant={"w_bits": 3, "a_bits": None},
        stages=[{"method": "uniform", "n_samples": 16}, {"method": method, "act_order": True}
                if method == "gptq" else {"method": method}],
    ))
    ctx = Session(recipe).quantize(recipe)
    if method == "gptq":  # GPTQ leaves the weights on their grids (RTN rounds at run time)
        for layer in ctx.layers().values():
            wq = layer.weight_quantizer
            assert torch.allclose(wq.decode(wq.encode(layer.weight)), layer.weight, atol=1e-6)
    err = []
    with torch.no_grad():
        for x, t, cond in ctx.calibration.batches(8, ctx.device):
            err.append((ctx.denoiser.forward(x, t, cond) - ctx.fp_denoiser.forward(x, t, cond)).pow(2).mean())
    return float(torch.stack(err).mean())


@pytest.mark.parametrize("kind", ["unet2d", "dit"])
def test_gptq_beats_mse_clipping_on_a_tiny_model(tiny_model_dir, kind: str) -> None:
    model_dir = tiny_model_dir(kind)
    assert _output_mse(model_dir, "gptq") < _output_mse(model_dir, "mse_clip")


def test_gptq_after_q_dit_keeps_its_groups_and_lowers_the_error(tiny_model_dir) -> None:
    """Q-DiT's final recipe: its searched group sizes and dynamic activations, GPTQ-rounded weights."""
    qdit = {"method": "q_dit", "group_sizes": [8, 16, 32], "min_mean_group_size": 16, "population": 4,
            "select": 2, "mutations": 2, "crossovers": 1, "epochs": 1, "n_samples": 2}
    errors, groups = {}, {}
    for name, stages in {"rtn": [qdit], "gptq": [qdit, {"method": "gptq", "weights": False}]}.items():
        recipe = parse_recipe(tiny_recipe(tiny_model_dir("dit"), quant={"w_bits": 3, "a_bits": 8},
                                          stages=[{"method": "uniform", "n_samples": 8}, *stages]))
        ctx = Session(recipe).quantize(recipe)
        groups[name] = ctx.state["q_dit"]["group_sizes"]
        with torch.no_grad():
            errors[name] = float(torch.stack([
                (ctx.denoiser.forward(x, t, c) - ctx.fp_denoiser.forward(x, t, c)).pow(2).mean()
                for x, t, c in ctx.calibration.batches(8, ctx.device)
            ]).mean())
        assert all(l.act_quantizer.dynamic for n, l in ctx.layers().items() if n in groups[name])
    assert groups["gptq"] == groups["rtn"]  # the same search (same seed), then GPTQ on its grids
    assert errors["gptq"] < errors["rtn"]
