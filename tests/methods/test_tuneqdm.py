"""TuneQDM: frozen codes, separable output x input scales, one scale set per timestep interval."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.tuneqdm import IntervalPool, TuneQDMQuantizer, expert_index
from methods.lsq import trajectory_inputs
from qsearch.engine import Session
from qsearch.models import current_timestep
from qsearch.quant.modules import QuantConv2d
from qsearch.quant.spec import QuantSpec
from qsearch.recipe import parse_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _at(t: int, fn):
    token = current_timestep.set(torch.tensor([t, t]))
    try:
        return fn()
    finally:
        current_timestep.reset(token)


def test_weight_is_codes_times_output_and_input_scales_of_the_expert() -> None:
    torch.manual_seed(0)
    layer = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), QuantSpec(w_bits=4, a_bits=None))
    layer.weight_quantizer.init_minmax(layer.weight.detach())
    codes = layer.weight_quantizer.encode(layer.weight.detach())
    wq = TuneQDMQuantizer(layer, experts=4, train_steps=1000)
    with torch.no_grad():
        wq.scale.mul_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1))
        wq.in_scale.copy_(torch.rand(4, 3) + 0.5)
    z = layer.weight_quantizer.zero_point.view(4, 1, 1, 1)
    for t, e in ((999, 3), (520, 2), (300, 1), (10, 0)):
        assert int(expert_index(torch.tensor([t]), 4, 1000)) == e
        w = _at(t, lambda: wq(layer.weight))
        expected = (codes - z) * wq.scale[e].view(4, 1, 1, 1) * wq.in_scale[e].view(1, 3, 1, 1)
        assert torch.allclose(w, expected)
    assert torch.equal(wq.encode(layer.weight), codes)  # the integer codes never change
    w = _at(520, lambda: wq(layer.weight))
    w.square().sum().backward()
    assert wq.scale.grad[2].abs().sum() > 0 and wq.in_scale.grad[2].abs().sum() > 0
    assert wq.scale.grad[[0, 1, 3]].abs().sum() == 0  # other experts untouched by this timestep


def _distill_error(ctx) -> float:
    """MSE to the FP noise prediction over the whole trajectory, one timestep per call."""
    traj = ctx.trajectory
    errs = []
    with torch.no_grad():
        for k in range(traj.num_steps):
            x, t = traj.xs[k], traj.timesteps[k].expand(traj.num_samples)
            errs.append(torch.nn.functional.mse_loss(
                ctx.denoiser.forward(x, t, traj.cond), ctx.fp_denoiser.forward(x, t, traj.cond)))
    return float(torch.stack(errs).mean())


def test_tuneqdm_trains_scales_only(tiny_model_dir) -> None:
    def recipe(*stages):
        return parse_recipe({
            "model": str(tiny_model_dir("dit")),
            "sampler": {"scheduler": "ddim", "steps": 4},
            "quant": {"w_bits": 4, "a_bits": 8},
            "calibration_pool": {"samples": 4},
            "stages": [{"method": "uniform", "n_samples": 8}, {"method": "rtn"}, *stages],
            "eval": {"n_samples": 2, "batch_size": 2, "fid": False, "fidelity_samples": 0, "device": "cpu"},
        })

    session = Session(recipe())
    before = _distill_error(session.quantize(recipe()))
    ctx = session.quantize(recipe({"method": "tuneqdm", "steps": 16, "batch_size": 4, "lr": 1e-4}))
    assert _distill_error(ctx) < before
    pool = IntervalPool(trajectory_inputs(ctx), 4, 1000)
    for _ in range(5):  # every mini-batch belongs to one interval
        _, t, _, _ = pool.batch(6, torch.Generator().manual_seed(_), ctx.device)
        assert len(set(expert_index(t, 4, 1000).tolist())) == 1
    assert len(ctx.state["loss_curves"]["tuneqdm"]) == 16
    fp = dict(session.fp.model.named_parameters())
    for name, layer in ctx.layers().items():
        assert isinstance(layer.weight_quantizer, TuneQDMQuantizer)
        assert torch.equal(layer.weight, fp[f"{name}.weight"])  # weights frozen
    moved = [m.weight_quantizer.in_scale for m in ctx.layers().values()]
    assert any(float((s - 1).abs().max()) > 0 for s in moved)
    # experts trained apart, and sampling switches experts with the timestep (no stale cached weight)
    quantizers = [m.weight_quantizer for m in ctx.layers().values()]
    assert any(not torch.equal(q.scale[0], q.scale[-1]) for q in quantizers)
    x = ctx.trajectory.xs[0, :2]
    cond = {"class_labels": torch.tensor([0, 1])}
    ctx.denoiser.forward(x, torch.tensor([900, 900]), cond)
    after_900 = ctx.denoiser.forward(x, torch.tensor([100, 100]), cond)
    for layer in ctx.layers().values():
        layer._cache_key = None
    assert torch.equal(after_900, ctx.denoiser.forward(x, torch.tensor([100, 100]), cond))
