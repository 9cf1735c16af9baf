"""TDQ: intervals that follow the timestep, tabulated so that no network runs at sampling time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import tiny_recipe
from methods.brecq import ActTraining, Unit, UnitData, reconstruct_activations, timestep_context
from methods.tdq import IntervalNet, TDQActQuantizer, TimestepActQuantizer
from qsearch.engine import Session
from qsearch.quant import QuantLinear, QuantSpec
from qsearch.quant.grid import to_fp16_grid
from qsearch.recipe import parse_recipe

A4 = QuantSpec(w_bits=None, a_bits=4)
TIMESTEPS = torch.tensor([999.0, 749.0, 499.0, 249.0, 0.0])


def test_interval_network_starts_at_the_static_interval() -> None:
    net = IntervalNet(0.05)
    assert torch.allclose(net(torch.tensor([0.0, 321.0, 999.0])), torch.full((3,), 0.05), rtol=1e-5)


def test_table_equals_the_network_at_the_sampler_timesteps() -> None:
    torch.manual_seed(0)
    q = TDQActQuantizer(A4, TIMESTEPS, scale=0.1, zero_point=8.0)
    with torch.no_grad():
        for p in q.interval.parameters():
            p.add_(0.3 * torch.randn_like(p))  # an interval that varies with t
        expected = to_fp16_grid(q.interval(TIMESTEPS))
    q.tabulate()
    assert q.interval is None and not list(q.reconstruction_parameters())
    assert torch.equal(q.scale, expected)
    assert q.scale.unique().numel() == len(TIMESTEPS)
    # a batch mixing timesteps: each example is quantized on its own timestep's grid
    x = torch.randn(len(TIMESTEPS), 3, 4, 4)
    with timestep_context(TIMESTEPS.flip(0)):
        out = q(x)
    for k, s in enumerate(q.scale.flip(0)):
        manual = (torch.clamp(torch.round(x[k] / s) + 8, 0, 15) - 8) * s
        assert torch.allclose(out[k], manual, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside a denoiser call"):
        q(x)


def test_trained_intervals_follow_timestep_dependent_ranges() -> None:
    """Inputs grow with t: the learned interval must be finer at t=0 than at t=999."""
    torch.manual_seed(0)
    fp = nn.Linear(8, 8)
    t = TIMESTEPS.repeat_interleave(64)
    x = torch.randn(len(t), 8) * (0.1 + t / 999).unsqueeze(1)
    layer = QuantLinear.from_float(fp, A4)
    layer.weight.requires_grad_(False)
    layer.act_quantizer.set_range(x.amin(), x.amax())  # one static grid, sized by the widest step
    static = layer.act_quantizer
    layer.act_quantizer = TDQActQuantizer(A4, TIMESTEPS, float(static.scale), float(static.zero_point))
    data = UnitData.from_calls([((x,), {}, t)], [fp(x).detach()])
    record = reconstruct_activations(Unit("fc", layer, {"fc": layer}), data, ActTraining(300, 1e-2, 2.4, 64))
    assert record["after"] < record["before"]
    layer.act_quantizer.tabulate()
    scale = layer.act_quantizer.scale  # in the order of TIMESTEPS: 999 ... 0
    assert scale[-1] < 0.5 * scale[0]
    assert scale[0] <= float(static.scale) * 1.5


@pytest.fixture(scope="module")
def tdq_result(tiny_model_dir):
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": 8, "a_bits": 4},
        stages=[{"method": "uniform", "n_samples": 16},
                {"method": "tdq", "iters": 20, "lr": 1e-2, "batch_size": 8}],
    ))
    session = Session(recipe)
    return session, recipe, session.quantize(recipe)


def test_tdq_stage_tabulates_intervals_that_differ_across_timesteps(tdq_result) -> None:
    session, recipe, ctx = tdq_result
    quantizers = [m.act_quantizer for m in ctx.layers().values()]
    assert quantizers and all(isinstance(q, TDQActQuantizer) for q in quantizers)
    assert all(q.interval is None for q in quantizers)  # tabulated: no network at sampling time
    assert not any("interval" in k for k in ctx.model.state_dict())
    steps = len(ctx.sampler.timesteps)
    assert all(q.scale.shape == (steps,) for q in quantizers)
    assert sum(q.scale.unique().numel() > 1 for q in quantizers) >= len(quantizers) // 2
    with pytest.raises(RuntimeError, match="per-timestep grids"):
        quantizers[0].set_range(torch.tensor(-1.0), torch.tensor(1.0))
    assert isinstance(quantizers[0], TimestepActQuantizer)
    metrics = session.evaluate(ctx, recipe)
    assert metrics["psnr"] > 10
