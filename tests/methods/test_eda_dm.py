"""EDA-DM: TDAC's density/variety scores and budget; FBR's loss and its effect on inner layers."""

from __future__ import annotations

import torch

from tests.conftest import tiny_recipe
from methods.brecq import capture_unit, lp_loss, output_loss, reconstruction_units
from methods.eda_dm import (
    TemporalDistributionAlignment, allocate, fbr_loss, min_max, step_features, timestep_scores,
    unit_outputs,
)
from qsearch.engine import Session
from qsearch.quant import full_precision
from qsearch.recipe import parse_recipe


def _reference_scores(features: list[torch.Tensor], radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' double loop, literally (features as (N, C, positions))."""
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    n = len(features)
    density, variety = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                fi, fj = features[i].double(), features[j].double()
                density[i] += float(torch.mean((fi - fj) ** 2) <= radius)
                variety[i] += torch.sum(1 - cos(fi, fj))
    return density, variety


def test_scores_match_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 8, 5, generator=g)
    features = [base + s * torch.randn(4, 8, 5, generator=g) for s in (0.1, 0.2, 0.3, 1.0, 2.0, 3.0)]
    density, variety = timestep_scores(features, radius=1.0)
    ref_density, ref_variety = _reference_scores(features, radius=1.0)
    assert torch.equal(density, ref_density)
    assert torch.allclose(variety, ref_variety, rtol=1e-6)
    assert density[0] > density[5] and variety[5] > variety[0]


def test_dense_and_outlying_steps_get_more_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 8, 5, generator=g)
    cluster = [v + 0.01 * torch.randn(4, 8, 5, generator=g) for _ in range(4)]  # 4 near-identical steps
    spread = [v * (1 + k) + torch.randn(4, 8, 5, generator=g) for k in range(1, 5)]  # 4 scattered steps
    density, variety = timestep_scores(cluster + spread, radius=0.5)
    assert (density[:4] == 3).all() and (density[4:] == 0).all()
    w = min_max(density) + 1.2 * min_max(variety)
    counts = allocate(w, 1000)
    assert counts.sum() == 1000
    order = torch.argsort(w)
    assert (counts[order].diff() >= 0).all()  # more weight, never fewer inputs
    assert torch.allclose(counts.double() / 1000, w / w.sum(), atol=1.5e-3)


def test_allocation_settles_rounding_like_the_authors() -> None:
    w = torch.tensor([1.0, 1.0, 1.0])  # 10/3 each: rounds to 3, the missing one goes to the first largest
    assert allocate(w, 10).tolist() == [4, 3, 3]
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])  # 1.5 each rounds to 2 (half to even): surplus from the last steps
    assert allocate(w, 6).tolist() == [2, 2, 1, 1]
    assert allocate(torch.rand(50), 1024).sum() == 1024


def test_stage_on_a_unet_spends_the_budget_by_weight(tiny_model_dir) -> None:
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), sampler={"scheduler": "ddim", "steps": 6},
        stages=[{"method": "eda_dm", "n_samples": 60, "radius": 1e-3}, {"method": "rtn"}],
    ))
    session = Session(recipe)
    ctx = session.quantize(recipe)
    counts = ctx.state["eda_dm"]["counts"]
    assert len(ctx.calibration) == 60 and counts.sum() == 60
    traj = ctx.trajectory
    per_step = torch.stack([(ctx.calibration.t == t).sum() for t in traj.timesteps])
    assert torch.equal(per_step, counts)
    stage = TemporalDistributionAlignment(TemporalDistributionAlignment.Config(
        method="eda_dm", n_samples=60, radius=1e-3))
    w = stage.weights(ctx)
    assert torch.equal(allocate(w, 60), counts)
    features = step_features(ctx.fp_denoiser, traj, traj.num_samples, 4)
    assert features[0].shape[:2] == (traj.num_samples, 32)  # mid-block attention input, 32 channels
    for x, t in zip(ctx.calibration.x, ctx.calibration.t):  # every input is a pool trajectory entry
        step = int((traj.timesteps == t).nonzero())
        assert (traj.xs[step] == x).flatten(1).all(1).any()


# ------------------------------------------------------------------------------------------------
# FBR: fine-grained block reconstruction
# ------------------------------------------------------------------------------------------------
def _fbr_session(tiny_model_dir, method: str, **extra):
    stage = {"method": method, "iters": 40, "lr": 1e-2, "act_iters": 5, "batch_size": 8, **extra}
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": 3, "a_bits": 8},
        stages=[{"method": "uniform", "n_samples": 16}, stage],
    ))
    return Session(recipe).quantize(recipe)


def _inner_layer_error(ctx) -> float:
    """Sum over blocks of the L2 error of each inner layer's output against the block run in FP."""
    total = 0.0
    for unit in reconstruction_units(ctx.denoiser, ctx.calibration):
        if len(unit.layers) < 2:
            continue
        data = capture_unit(ctx, unit, ctx.calibration, 8)
        index = torch.arange(len(data))
        with torch.no_grad():
            _, q = unit_outputs(unit, data, index)
            with full_precision(unit.layers):
                _, fp = unit_outputs(unit, data, index)
        total += sum(float(lp_loss(q[n], fp[n], 2.0)) for n in list(unit.layers)[:-1])
    return total


def test_fbr_loss_is_the_block_loss_plus_weighted_inner_layer_losses(tiny_model_dir) -> None:
    ctx = _fbr_session(tiny_model_dir, "brecq")  # any quantized model: the loss is a function of it
    unit = next(u for u in reconstruction_units(ctx.denoiser, ctx.calibration) if len(u.layers) > 2)
    data = capture_unit(ctx, unit, ctx.calibration, 8)
    index = torch.arange(6)
    with torch.no_grad():
        block = output_loss(unit, data, index, 2.0)
        assert torch.equal(fbr_loss(0.0)(unit, data, index, 2.0), block)  # weight 0: BRECQ's loss
        _, q = unit_outputs(unit, data, index)
        with full_precision(unit.layers):
            _, fp = unit_outputs(unit, data, index)
        inner = sum(lp_loss(q[n], fp[n], 2.0) for n in list(unit.layers)[:-1])
        assert inner > 0
        assert torch.allclose(fbr_loss(0.8)(unit, data, index, 2.0), block + 0.8 * inner)
    assert all(layer.quant_enabled for layer in unit.layers.values())  # FP pass restored the state


def test_fbr_aligns_inner_layers_better_than_block_reconstruction(tiny_model_dir) -> None:
    brecq = _inner_layer_error(_fbr_session(tiny_model_dir, "brecq"))
    fbr = _inner_layer_error(_fbr_session(tiny_model_dir, "eda_dm_fbr", layer_weight=5.0))
    assert fbr < brecq
