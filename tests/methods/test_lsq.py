"""LSQ: the step-size gradient of the paper, frozen quantizers, timestep-indexed steps, fine-tuning."""

from __future__ import annotations

import math

import pytest
import torch

from methods.lsq import (
    DatasetPool,
    LSQActQuantizer,
    LSQWeightQuantizer,
    TemporalActQuantizer,
    plot_curves,
    trajectory_inputs,
)
from qsearch.engine import Session
from qsearch.models import current_timestep
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.recipe import parse_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the shared test machine is slower with oversubscribed threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(model_dir, stages, **quant) -> dict:
    return {
        "model": str(model_dir),
        "sampler": {"scheduler": "ddim", "steps": 4},
        "quant": {"w_bits": 4, "a_bits": 4, **quant},
        "calibration_pool": {"samples": 4},
        "stages": [{"method": "uniform", "n_samples": 8}, *stages],
        "eval": {"n_samples": 4, "batch_size": 4, "fid": False, "fidelity_samples": 0, "device": "cpu"},
    }


def test_step_size_gradient_is_lsq() -> None:
    """d/ds of sum(v_hat) = g * sum(round(v/s) - v/s inside, clip level outside), g = 1/sqrt(N Q_P)."""
    torch.manual_seed(0)
    spec = QuantSpec(w_bits=3, a_bits=None)
    w = torch.randn(4, 6)
    wq = LSQWeightQuantizer(spec, w.shape)
    wq.init_lsq(w)
    with torch.no_grad():
        wq.scale.copy_(torch.tensor([0.3, 0.5, 0.2, 0.4]).view(4, 1, 1))
    wq(w).sum().backward()
    s = wq.scale.detach().view(4, 1)
    v = w / s
    inside = (v > -4) & (v < 3)  # symmetric 3-bit: Q_N = 4, Q_P = 3
    expected = torch.where(inside, torch.round(v) - v, v.clamp(-4, 3)).sum(1) / math.sqrt(w.numel() * 3)
    assert torch.allclose(wq.scale.grad.view(4), expected, atol=1e-6)


def test_activation_step_gradient_is_scaled_per_example() -> None:
    spec = QuantSpec(w_bits=None, a_bits=4, a_symmetric=True)
    aq = LSQActQuantizer(spec)
    aq.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.randn(5, 3, 8, requires_grad=True)
    aq(x).sum().backward()
    s = aq.scale.detach()
    v = x.detach() / s
    inside = (v > -8) & (v < 7)
    expected = torch.where(inside, torch.round(v) - v, v.clamp(-8, 7)).sum() / math.sqrt(24 * 7)
    assert torch.allclose(aq.scale.grad, expected, atol=1e-5)
    # straight-through to the input: identity inside the range, zero where clipped
    assert torch.equal(x.grad, inside.float())


def test_frozen_quantizers_compute_what_training_computed() -> None:
    spec = QuantSpec(w_bits=4, a_bits=8)
    w = torch.randn(8, 16)
    wq = LSQWeightQuantizer(spec, w.shape)
    wq.init_lsq(w)
    with torch.no_grad():  # fp16-representable steps, so rounding them for export changes nothing
        wq.scale.copy_(wq.scale.half().float())
    plain = wq.frozen()
    assert type(plain) is WeightQuantizer and not isinstance(plain.scale, torch.nn.Parameter)
    assert torch.equal(plain(w), wq(w).detach())
    assert torch.equal(plain.decode(plain.encode(w)), plain(w))

    aq = LSQActQuantizer(spec)
    aq.set_range(torch.tensor(-2.0), torch.tensor(3.0))
    x = torch.randn(2, 16) * 2
    frozen = aq.frozen(spec)
    assert type(frozen) is ActQuantizer and frozen.calibrated
    assert torch.allclose(frozen(x), aq(x), atol=1e-6)


def test_temporal_quantizer_uses_the_step_of_each_example_timestep() -> None:
    spec = QuantSpec(w_bits=None, a_bits=4, a_symmetric=True)
    base = ActQuantizer(spec)
    base.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    steps = torch.tensor([900, 600, 300, 0])
    tq = TemporalActQuantizer.from_quantizer(base, spec, steps)
    with torch.no_grad():
        tq.scale.copy_(torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    x = torch.linspace(-1, 1, 40).repeat(2, 1)
    token = current_timestep.set(torch.tensor([610, 2]))  # nearest steps: 600 and 0
    try:
        out = tq(x)
    finally:
        current_timestep.reset(token)
    for row, s in ((0, 0.25), (1, 0.0625)):
        ref = ActQuantizer(spec)
        ref.scale.fill_(s)
        ref.zero_point.copy_(base.zero_point)
        ref.calibrated = True
        assert torch.allclose(out[row], ref(x[row]))
    assert torch.allclose(tq(x), out)  # outside a denoiser call (checkpoint recompute): same index


def test_lsq_fine_tuning_lowers_the_distillation_loss(tiny_model_dir, capsys) -> None:
    stages = [{"method": "rtn"},
              {"method": "lsq", "steps": 24, "batch_size": 4, "lr": 1e-4, "quant_lr": 1e-3}]
    recipe = parse_recipe(_recipe(tiny_model_dir("unet2d"), stages))
    session = Session(recipe)
    ctx = session.quantize(recipe)
    curve = ctx.state["loss_curves"]["lsq"]
    assert len(curve) == 24
    assert sum(curve[-6:]) / 6 < 0.8 * sum(curve[:6]) / 6
    for layer in ctx.layers().values():  # trained quantizers are plain quantizers again
        assert type(layer.weight_quantizer) is WeightQuantizer
        assert type(layer.act_quantizer) is ActQuantizer and layer.act_quantizer.calibrated
    assert ctx.state["train_seconds"]["lsq"] > 0
    # captured output is not a terminal: progress comes as log lines (every 5% of the steps)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lsq: step ")]
    assert len(lines) == 24 and lines[-1].startswith("lsq: step 24/24, loss ")


def test_loss_curves_plot(tmp_path) -> None:
    path = tmp_path / "curves" / "loss.png"
    plot_curves({"lsq": [1.0, 0.5, 0.25], "other": [0.8, 0.7]}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_inputs_are_noised_images(tiny_model_dir, tmp_path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    recipe = parse_recipe(_recipe(tiny_model_dir("unet2d"), [{"method": "rtn"}]))
    ctx = Session(recipe).quantize(recipe)
    pool = DatasetPool(str(tmp_path), ctx, limit=10)
    assert pool.x0.shape == (3, 3, 16, 16) and pool.x0.min() >= -1 and pool.x0.max() <= 1
    x, t, cond, noise = pool.batch(5, torch.Generator().manual_seed(0), ctx.device)
    a = ctx.sampler.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * noise) / a.sqrt()
    assert all(any(torch.allclose(r, p, atol=1e-4) for p in pool.x0) for r in x0)
    assert set(t.tolist()) <= set(ctx.sampler.timesteps.tolist())
    assert len(trajectory_inputs(ctx)) == ctx.trajectory.num_steps * ctx.trajectory.num_samples


def test_lsq_rejects_binary_weights() -> None:
    with pytest.raises(ValueError):
        LSQWeightQuantizer(QuantSpec(w_bits=1), torch.Size([2, 2]))
