"""Q-Diffusion: interval time-step calibration and split quantization of skip concatenations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from methods.qdiffusion import (
    ShortcutSplitting,
    SplitActQuantizer,
    SplitWeightQuantizer,
    TimestepAwareCalibration,
    skip_concat_splits,
)
from qsearch.engine import Session
from qsearch.models import load_model
from qsearch.quant import ActQuantizer, QuantSpec, WeightQuantizer
from qsearch.recipe import parse_recipe
from qsearch.sampling import Trajectory
from tests.conftest import tiny_recipe


def _trajectory(steps: int, samples: int) -> Trajectory:
    xs = torch.arange(steps * samples, dtype=torch.float32).view(steps, samples, 1, 1, 1)
    return Trajectory(xs, torch.linspace(999, 0, steps).long(), {})


# --- time-step-aware calibration --------------------------------------------------------------
def test_same_samples_at_each_step_at_a_fixed_interval() -> None:
    traj = _trajectory(steps=100, samples=8)
    cfg = TimestepAwareCalibration.Config(method="qdiff_timesteps", cali_st=20, cali_n=5)
    stage = TimestepAwareCalibration(cfg)
    calib = stage.select(SimpleNamespace(trajectory=traj))
    chosen = traj.timesteps[torch.arange(0, 100, 5)]
    assert len(calib) == 20 * 5
    assert torch.equal(torch.unique(calib.t), torch.sort(chosen).values)
    for t in chosen:  # the same 5 trajectories (the first ones) at every chosen step
        x = calib.x[calib.t == t].flatten()
        step = int((traj.timesteps == t).nonzero())
        assert torch.equal(x, traj.xs[step, :5].flatten())


def test_more_samples_per_step_than_the_pool_is_an_error() -> None:
    stage = TimestepAwareCalibration(TimestepAwareCalibration.Config(method="qdiff_timesteps", cali_n=9))
    with pytest.raises(ValueError, match="calibration_pool.samples"):
        stage.select(SimpleNamespace(trajectory=_trajectory(10, 8)))


# --- split quantizers ---------------------------------------------------------------------------
def _bimodal(n: int = 64, split: int = 4, channels: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, 4, 4, generator=g)
    x[:, :split] *= 0.05  # hidden state: small range; skip: large range
    x[:, split:] *= 5.0
    return x


def test_each_part_gets_its_own_activation_scale_and_less_error() -> None:
    spec = QuantSpec(a_bits=4, w_bits=None)
    x = _bimodal()
    split_q, plain_q = SplitActQuantizer(spec, split=4), ActQuantizer(spec)
    assert torch.equal(split_q(x), x)  # uncalibrated: passes through while it records per-part ranges
    split_q.set_range(x.min(), x.max())
    plain_q.set_range(x.min(), x.max())
    hidden_scale, skip_scale = (p.scale.item() for p in split_q.parts)
    assert skip_scale > 20 * hidden_scale
    assert torch.isclose(split_q.parts[0].scale, plain_qparams_scale(spec, x[:, :4]))
    err_split = (split_q(x) - x)[:, :4].pow(2).mean()
    err_plain = (plain_q(x) - x)[:, :4].pow(2).mean()
    assert err_split < err_plain / 20
    assert (split_q(x) - x).pow(2).mean() <= (plain_q(x) - x).pow(2).mean()


def plain_qparams_scale(spec: QuantSpec, x: torch.Tensor) -> torch.Tensor:
    q = ActQuantizer(spec)
    q.set_range(x.min(), x.max())
    return q.scale


def test_a_whole_tensor_clip_clips_each_part_no_wider() -> None:
    x = _bimodal()
    q = SplitActQuantizer(QuantSpec(a_bits=8), split=4)
    q(x)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    assert q.parts[1].scale < plain_qparams_scale(QuantSpec(a_bits=8), x[:, 4:])  # skip: clipped to [-1, 1]
    assert torch.equal(q.parts[0].scale, plain_qparams_scale(QuantSpec(a_bits=8), x[:, :4]))  # inside [-1, 1]


def test_split_rows_of_linear_inputs_use_the_last_axis() -> None:
    rows = _bimodal().permute(0, 2, 3, 1).reshape(-1, 8)
    q = SplitActQuantizer(QuantSpec(a_bits=4), split=4)
    q(rows)
    q.set_range(rows.min(), rows.max())
    assert q.parts[1].scale > 20 * q.parts[0].scale


@pytest.mark.parametrize("spec", [
    QuantSpec(w_bits=4),
    QuantSpec(w_bits=3, w_symmetric=False, w_granularity="tensor"),
    QuantSpec(w_bits=4, w_granularity="group", group_size=16),
    QuantSpec(w_bits=4, w_format="fp"),
])
def test_split_weight_quantizer_is_two_independent_quantizers(spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, 3, 3, generator=g)
    w[:, :3] *= 0.01  # unequal parts with very different ranges
    split_q = SplitWeightQuantizer(spec, w.shape, split=3)
    split_q.init_minmax(w)
    parts = []
    for part in (w[:, :3], w[:, 3:]):
        q = WeightQuantizer(spec, part.shape)
        q.init_minmax(part)
        parts.append(q(part))
    assert torch.equal(split_q(w), torch.cat(parts, dim=1))
    assert torch.equal(split_q.decode(split_q.encode(w)), split_q(w))
    plain = WeightQuantizer(spec, w.shape)
    plain.init_minmax(w)
    assert (split_q(w) - w)[:, :3].pow(2).sum() < (plain(w) - w)[:, :3].pow(2).sum()


# --- the stage on a U-Net -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_split_point_is_the_hidden_state_of_the_concatenation(tiny_model_dir, kind) -> None:
    model = load_model(str(tiny_model_dir(kind))).denoiser
    splits = skip_concat_splits(model)
    assert splits and len(splits) == sum(len(b.resnets) for b in model.up_blocks)
    last_output: list[torch.Tensor] = []
    checked = []

    def record(module, args, output):
        last_output[:] = [output[0] if isinstance(output, tuple) else output]

    def check(name):
        def hook(module, args):
            x = args[0]
            assert torch.equal(x[:, : splits[name]], last_output[0]), name
            checked.append(name)
        return hook

    handles = [model.mid_block.register_forward_hook(record)]
    for i, block in enumerate(model.up_blocks):
        for j, resnet in enumerate(block.resnets):
            handles.append(resnet.register_forward_pre_hook(check(f"up_blocks.{i}.resnets.{j}")))
            handles.append(resnet.register_forward_hook(record))
        for m in [*getattr(block, "attentions", []), *(block.upsamplers or [])]:
            handles.append(m.register_forward_hook(record))
    cond = {}
    if kind == "unet2d_condition":
        cond = {"encoder_hidden_states": torch.randn(2, 8, model.config.cross_attention_dim)}
    with torch.no_grad():
        model(torch.randn(2, model.config.in_channels, 16, 16), torch.tensor([10, 500]), **cond)
    for h in handles:
        h.remove()
    assert sorted(checked) == sorted(splits)


def test_stage_splits_shortcuts_and_rtn_calibrates_each_part(tiny_model_dir) -> None:
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": 8, "a_bits": 8},
        stages=[{"method": "uniform", "n_samples": 8}, {"method": "qdiff_split"}, {"method": "rtn"}],
    ))
    session = Session(recipe)
    ctx = session.quantize(recipe)
    layers = ctx.layers()
    split_names = ctx.state["qdiff_split"]["splits"]
    assert split_names and all(n.endswith("conv_shortcut") for n in split_names)
    for name in split_names:
        aq, wq = layers[name].act_quantizer, layers[name].weight_quantizer
        assert isinstance(aq, SplitActQuantizer) and isinstance(wq, SplitWeightQuantizer)
        assert aq.calibrated and all(p.calibrated for p in aq.parts)
        for part, (lo, hi) in zip(aq.parts, aq.seen):  # min-max calibration: exactly each part's range
            assert torch.equal(part.scale, plain_qparams_scale(QuantSpec(a_bits=8), torch.stack([lo, hi])))
    assert not isinstance(layers["up_blocks.0.resnets.0.conv1"].act_quantizer, SplitActQuantizer)
    x = ctx.trajectory.xs[1, :2]
    t = ctx.trajectory.timesteps[1]
    with torch.no_grad():
        err = (ctx.denoiser(x, t, {}) - ctx.fp_denoiser(x, t, {})).pow(2).mean()
    assert err < 1e-3  # W8A8 with split grids stays close to the FP model


def test_conv1_can_be_split_too(tiny_model_dir) -> None:
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"),
        stages=[{"method": "uniform", "n_samples": 4}, {"method": "qdiff_split", "targets": ["conv1"]}],
    ))
    ctx = Session(recipe).quantize(recipe)
    assert all(n.endswith("conv1") for n in ctx.state["qdiff_split"]["splits"])
    assert isinstance(ctx.layers()["up_blocks.1.resnets.1.conv1"].act_quantizer, SplitActQuantizer)
    assert ShortcutSplitting.summary()
