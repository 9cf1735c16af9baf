"""Q-DM: TaQ normalizes each timestep's activations before one quantizer; NeM distillation trains."""

from __future__ import annotations

import pytest
import torch

from methods.q_dm import TaQActQuantizer, timestep_statistics
from qsearch.engine import Session
from qsearch.models import current_timestep
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.recipe import parse_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _at(t: list[int], fn):
    token = current_timestep.set(torch.tensor(t))
    try:
        return fn()
    finally:
        current_timestep.reset(token)


def test_taq_quantizes_each_timestep_on_its_own_normalized_scale() -> None:
    spec = QuantSpec(w_bits=None, a_bits=4, a_symmetric=True)
    taq = TaQActQuantizer(spec, torch.tensor([999, 499]))
    taq.set_range(torch.tensor(-3.0), torch.tensor(3.0))
    with torch.no_grad():
        taq.mean.copy_(torch.tensor([0.0, 5.0]))
        taq.std.copy_(torch.tensor([1.0, 0.1]))
    torch.manual_seed(0)
    early, late = torch.randn(1, 256), 5 + 0.1 * torch.randn(1, 256)  # the oscillating input
    x = torch.cat([early, late])
    out = _at([999, 499], lambda: taq(x)).detach()
    plain = ActQuantizer(spec)
    plain.set_range(torch.tensor(-3.0), torch.tensor(3.0))
    assert torch.allclose(out[0], plain(early[0]), atol=1e-6)
    assert torch.allclose(out[1], 0.1 * plain((late[0] - 5) / 0.1) + 5, atol=1e-5)
    # one range for both timesteps (what TaQ removes) loses the narrow late distribution
    shared = ActQuantizer(spec)
    shared.set_range(x.min(), x.max())
    assert (out[1] - late[0]).abs().mean() < 0.2 * (shared(late[0]) - late[0]).abs().mean()


def test_taq_gradient_reaches_the_step_size() -> None:
    spec = QuantSpec(w_bits=None, a_bits=4)
    taq = TaQActQuantizer(spec, torch.tensor([999, 499]))
    taq.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    x = torch.randn(2, 3, 8)
    _at([999, 499], lambda: taq(x)).square().sum().backward()
    assert taq.scale.grad is not None and taq.scale.grad.abs() > 0


def _recipe(model_dir, stages) -> dict:
    return {
        "model": str(model_dir),
        "sampler": {"scheduler": "ddim", "steps": 4},
        "quant": {"w_bits": 4, "a_bits": 4},
        "calibration_pool": {"samples": 4},
        "stages": [{"method": "uniform", "n_samples": 8}, *stages],
        "eval": {"n_samples": 2, "batch_size": 2, "fid": False, "fidelity_samples": 0, "device": "cpu"},
    }


def test_q_dm_statistics_and_training(tiny_model_dir) -> None:
    stages = [{"method": "rtn"}, {"method": "q_dm", "steps": 16, "batch_size": 4, "lr": 1e-4,
                                  "quant_lr": 1e-3, "stat_samples": 3}]
    recipe = parse_recipe(_recipe(tiny_model_dir("unet2d"), stages))
    session = Session(recipe)

    # conv_in's input is x_t itself: its per-timestep statistics are those of the trajectory
    ctx = session.quantize(parse_recipe(_recipe(tiny_model_dir("unet2d"), [{"method": "rtn"}])))
    mean, std, rows = timestep_statistics(ctx, ["conv_in"], samples_per_step=3)
    xs = ctx.trajectory.xs[:, :3]
    assert torch.allclose(mean["conv_in"], xs.mean(dim=(1, 2, 3, 4)), atol=1e-4)
    assert torch.allclose(std["conv_in"], xs.std(dim=(1, 2, 3, 4), unbiased=False), atol=1e-4)
    assert rows["conv_in"].shape[1] == 3 and abs(float(rows["conv_in"].std()) - 1) < 0.1

    ctx = session.quantize(recipe)
    curve = ctx.state["loss_curves"]["q_dm"]
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4
    layers = ctx.layers()
    assert all(type(m.weight_quantizer) is WeightQuantizer for m in layers.values())
    taq = [m.act_quantizer for m in layers.values() if isinstance(m.act_quantizer, TaQActQuantizer)]
    assert len(taq) == len(layers)
    assert all(torch.equal(q.std, q.std.half().float()) for q in taq)  # stored as export stores them
    assert not torch.allclose(taq[0].std, taq[0].std[:1].expand_as(taq[0].std))  # timestep-dependent


def test_compiled_training_computes_what_eager_training_computes(tiny_model_dir) -> None:
    """``compile: true`` (torch.compile while training, TaQ reading the timestep inside the graph)."""
    curves = {}
    for compiled in (False, True):
        stages = [{"method": "rtn"}, {"method": "q_dm", "steps": 8, "batch_size": 4, "lr": 1e-4,
                                      "quant_lr": 1e-3, "stat_samples": 3, "compile": compiled}]
        recipe = parse_recipe(_recipe(tiny_model_dir("unet2d"), stages))
        ctx = Session(recipe).quantize(recipe)
        curves[compiled] = ctx.state["loss_curves"]["q_dm"]
        assert ctx.model._compiled_call_impl is None  # eager again for sampling and export
    # the first step's loss precedes any update: equal up to float summation order
    assert curves[True][0] == pytest.approx(curves[False][0], rel=1e-4)
    assert sum(curves[True][-3:]) < sum(curves[True][:3])
