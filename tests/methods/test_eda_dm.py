"""EDA-DM TDAC: density/variety scores as defined, and the budget follows density + lambda x variety."""

from __future__ import annotations

import torch

from tests.conftest import tiny_recipe
from methods.eda_dm import (
    TemporalDistributionAlignment, allocate, min_max, step_features, timestep_scores,
)
from qsearch.engine import Session
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
