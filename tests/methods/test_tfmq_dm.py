"""TFMQ-DM: the temporal block is the U-Net's own, TIAR lowers its error, FSC grids fit every t."""

from __future__ import annotations

import diffusers
import pytest
import torch

from tests.conftest import tiny_recipe
from methods.brecq import BlockConfig, timestep_context
from qsearch.quant.modules import activations_off
from methods.tdq import TimestepActQuantizer
from methods.tfmq_dm import TemporalBlock, finite_set_calibration, temporal_reconstruction
from qsearch.engine import Session
from qsearch.quant.quantizers import ActQuantizer
from qsearch.recipe import parse_recipe


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_temporal_block_computes_the_unets_own_temporal_features(tiny_model_dir, kind) -> None:
    model = diffusers.UNet2DModel if kind == "unet2d" else diffusers.UNet2DConditionModel
    model = model.from_pretrained(tiny_model_dir(kind)).eval()
    tib = TemporalBlock.of(model)
    seen = {}
    hooks = [r.time_emb_proj.register_forward_hook(lambda m, a, out, _r=r: seen.__setitem__(_r, out))
             for r in tib.resnets]
    t = torch.tensor([3, 640])
    x = torch.randn(2, model.config.in_channels, 16, 16)
    with torch.no_grad():
        if kind == "unet2d":
            model(x, t)
        else:
            model(x, t, encoder_hidden_states=torch.randn(2, 8, 32))
        features = tib(t)
    for h in hooks:
        h.remove()
    assert len(features) == len(tib.resnets) >= 4
    for r, f in zip(tib.resnets, features):
        assert torch.allclose(f, seen[r], atol=1e-6)
    assert tib.layer_names[:2] == ["time_embedding.linear_1", "time_embedding.linear_2"]


def test_a_dit_has_no_temporal_block(tiny_model_dir) -> None:
    dit = diffusers.DiTTransformer2DModel.from_pretrained(tiny_model_dir("dit"))
    with pytest.raises(TypeError, match="t-only time embedding"):
        TemporalBlock.of(dit)


@pytest.fixture(scope="module")
def mse_ctx(tiny_model_dir):
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": 3, "a_bits": 4},
        stages=[{"method": "uniform", "n_samples": 32}, {"method": "mse_clip"}],
    ))
    return Session(recipe).quantize(recipe)


def test_tiar_lowers_the_temporal_feature_error(mse_ctx) -> None:
    with activations_off(mse_ctx.layers()):
        record = temporal_reconstruction(mse_ctx, mse_ctx.calibration, BlockConfig(iters=200, lr=1e-2, batch_size=16))
    assert record["after"] < 0.7 * record["before"]


def test_tiar_on_sampler_timesteps_fits_the_steps_the_calibration_set_lacks(tiny_model_dir) -> None:
    """A calibration set at one timestep: TIAR on it leaves the other steps' temporal features worse than
    TIAR on every sampler step (``tiar_timesteps: sampler``), measured over all the sampler's steps."""
    errors = {}
    for where in ("calibration", "sampler"):
        recipe = parse_recipe(tiny_recipe(
            tiny_model_dir("unet2d"), quant={"w_bits": 2, "a_bits": 8},
            stages=[{"method": "uniform", "n_samples": 32}, {"method": "mse_clip"}],
        ))
        ctx = Session(recipe).quantize(recipe)
        calib = ctx.calibration
        one_step = type(calib)(x=calib.x, t=torch.full_like(calib.t, int(ctx.sampler.timesteps[0])), cond=calib.cond)
        with activations_off(ctx.layers()):
            temporal_reconstruction(ctx, one_step, BlockConfig(iters=200, lr=1e-2, batch_size=16), where)
        t = ctx.sampler.timesteps
        with torch.no_grad(), activations_off(ctx.layers()):
            errors[where] = sum(float((f - g).pow(2).mean()) for f, g in
                                zip(TemporalBlock.of(ctx.model)(t), TemporalBlock.of(ctx.fp_denoiser.model)(t)))
    assert errors["sampler"] < 0.8 * errors["calibration"]


def test_fsc_gives_each_temporal_layer_a_min_max_grid_per_timestep(mse_ctx) -> None:
    ctx = mse_ctx
    tib = TemporalBlock.of(ctx.model)
    assert finite_set_calibration(ctx) == tib.layer_names
    steps = ctx.sampler.timesteps
    quantizers = {n: ctx.layers()[n].act_quantizer for n in tib.layer_names}
    assert all(isinstance(q, TimestepActQuantizer) and q.scale.shape == (len(steps),) for q in quantizers.values())
    assert all(q.scale.unique().numel() == len(steps) for q in quantizers.values())  # one grid per t
    x = torch.randn(1, 3, 16, 16)
    for k, t in enumerate(steps):
        inputs = {}
        hooks = [q.register_forward_pre_hook(lambda m, a, _n=n: inputs.__setitem__(_n, a[0]))
                 for n, q in quantizers.items()]
        with torch.no_grad():
            ctx.denoiser.forward(x, t.reshape(1), {})
        for h in hooks:
            h.remove()
        for name, q in quantizers.items():  # in a real denoiser call at t: exactly the min-max grid of t
            v = inputs[name]
            scale, zero_point = ActQuantizer.qparams(q, v.amin(), v.amax())
            assert torch.equal(q.scale[k], scale) and torch.equal(q.zero_point[k], zero_point), name
            with torch.no_grad(), timestep_context(t.reshape(1)):
                assert ((q(v) - v).abs() <= q.scale[k] / 2 + 1e-6).all()  # nothing clipped


def test_tfmq_dm_stage_keeps_the_temporal_block_out_of_block_reconstruction(tiny_model_dir) -> None:
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": 4, "a_bits": 8},
        stages=[{"method": "uniform", "n_samples": 8},
                {"method": "tfmq_dm", "iters": 10, "lr": 1e-2, "act_iters": 3, "batch_size": 8}],
    ))
    ctx = Session(recipe).quantize(recipe)
    report = ctx.state["reconstruction"]["tfmq_dm"]
    tib = TemporalBlock.of(ctx.model)
    assert report["temporal"] is not None and report["finite_set"] == tib.layer_names
    assert not {"time_embedding.linear_1", "time_embedding.linear_2"} & set(report["weights"])
    assert "down_blocks.0.resnets.0" in report["weights"]
    for name, layer in ctx.layers().items():
        assert isinstance(layer.act_quantizer, TimestepActQuantizer) == (name in tib.layer_names)
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)  # all weights baked
