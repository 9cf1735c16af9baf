"""APQ-DM SRM: each round takes the eligible step of highest U_t - lambda n_t (U: the search entropy)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.conftest import tiny_recipe
from methods.apq_dm_srm import ImportanceSearch, SRMSelection, SRMTimestepSelection
from methods.apq_dm import importance_entropy
from qsearch.engine import Session
from qsearch.quant import QuantLinear, QuantSpec
from qsearch.quant.quantizers import ActQuantizer
from qsearch.recipe import parse_recipe
from qsearch.registry import REGISTRY
from qsearch.sampling import Trajectory

A4 = QuantSpec(w_bits=None, a_bits=4)


def test_rule_takes_the_highest_score_in_the_window_and_the_latest_of_ties() -> None:
    rule = SRMSelection(num_steps=6, first=1, count_weight=2.0)
    u = torch.tensor([9.0, 0.0, 5.0, 0.5, 3.0, 0.0])  # step 0 is the most uncertain but outside the window
    # scores 0 5 .5 3 0 -> 2; then 0 3 .5 3 0 -> tie 2/4 -> the later 4; then 0 3 .5 1 0 -> 2; then tie -> 4
    assert [rule.pick(u) for _ in range(4)] == [2, 4, 2, 4]
    assert rule.counts.tolist() == [0, 0, 2, 0, 2, 0]
    assert torch.equal(rule.scores(u), u.double() - 2.0 * rule.counts.double())
    flat = SRMSelection(num_steps=5, first=2, count_weight=2.0)
    # a flat U (the authors' first round): one round per step, from the last step backwards
    assert [flat.pick(torch.zeros(5)) for _ in range(4)] == [4, 3, 2, 4]


def test_without_the_count_penalty_the_most_uncertain_step_takes_every_round() -> None:
    rule = SRMSelection(num_steps=4, first=0, count_weight=0.0)
    u = torch.tensor([0.1, 0.7, 0.2, 0.3])
    assert [rule.pick(u) for _ in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="no eligible step"):
        SRMSelection(num_steps=3, first=3, count_weight=2.0)


def _mixed_error(search: ImportanceSearch, x: torch.Tensor, group: int) -> torch.Tensor:
    scale, zero = search.grids["fc"]
    q = search.quantizers["fc"]
    return (q.fake_quant(x, scale[group], zero[group]) - x).pow(2).mean()


def test_search_decides_where_one_grid_fits_and_stays_uncertain_where_none_is_better() -> None:
    """Steps 0-1 wide inputs, 2-3 narrow; G=2 grids over the runs {0, 1} and {2, 3}."""
    g = torch.Generator().manual_seed(0)
    x = {0: 4 * torch.randn(64, 8, generator=g), 1: 4 * torch.randn(64, 8, generator=g),
         2: 0.1 * torch.randn(64, 8, generator=g), 3: torch.zeros(64, 8)}
    lo = {"fc": torch.stack([x[k].amin() for k in range(4)])}
    hi = {"fc": torch.stack([x[k].amax() for k in range(4)])}
    search = ImportanceSearch(4, {"fc": ActQuantizer(A4)}, lo, hi, 2, 1.0, 0.05, 0.05)
    u0 = search.uncertainty()
    assert torch.allclose(u0, torch.full((4,), math.log(2) / 2, dtype=torch.float64))  # uniform start
    assert _mixed_error(search, x[1], 0) < _mixed_error(search, x[1], 1)  # the wide grid fits step 1
    assert _mixed_error(search, x[2], 1) < _mixed_error(search, x[2], 0)  # the narrow grid fits step 2
    for _ in range(5):
        for k in range(4):
            search.accumulate("fc", k, x[k])
        search.step()
    probs = torch.softmax(search.logits["fc"].detach(), -1)
    assert probs[1, 0] > 0.5 and probs[2, 1] > 0.5  # each step leans to the grid that fits it
    u = search.uncertainty()
    assert u[3] == u0[3] and (u[:3] < u[3]).all()  # zeros quantize exactly on both grids: undecided
    assert torch.allclose(u, importance_entropy(search.logits["fc"].detach()).double() / 2)


class _ToyDenoiser:
    """A one-layer FP "denoiser": the calibration search sees the trajectory state itself as input."""

    def __init__(self, fc: nn.Linear) -> None:
        self.model = nn.Module()
        self.model.fc = fc

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.model.fc(x)


def _toy_ctx(scales: list[float]) -> SimpleNamespace:
    """Pool of 4 trajectories; at step k every input has scale ``scales[k]`` (0: all zeros)."""
    g = torch.Generator().manual_seed(1)
    xs = torch.stack([s * torch.randn(4, 3, 8, generator=g) for s in scales])
    traj = Trajectory(xs, torch.linspace(999, 0, len(scales)).round(), {})
    fc = nn.Linear(8, 8)
    layer = QuantLinear.from_float(nn.Linear(8, 8), A4)
    return SimpleNamespace(
        trajectory=traj, fp_denoiser=_ToyDenoiser(fc), device=torch.device("cpu"), state={},
        layers=lambda: {"fc": layer},
    )


def _run(ctx: SimpleNamespace, **cfg) -> tuple[list[int], torch.Tensor]:
    stage = SRMTimestepSelection(SRMTimestepSelection.Config(method="apq_dm_srm", **cfg))
    calib = stage.select(ctx)
    traj = ctx.trajectory
    order = ctx.state["apq_dm_srm"]["order"]
    steps = torch.tensor(order).repeat_interleave(cfg["batch_size"])[: cfg["n_samples"]]
    samples = torch.arange(cfg["n_samples"]) % traj.num_samples
    assert len(calib) == cfg["n_samples"]
    assert torch.equal(calib.t, traj.timesteps[steps]) and torch.equal(calib.x, traj.xs[steps, samples])
    return order, ctx.state["apq_dm_srm"]["counts"]


# step 0 and step 4 are ambiguous (zeros), step 0 lies outside the window (skip 0.2 of 6 steps)
SCALES = [0.0, 4.0, 4.0, 0.1, 0.0, 0.1]


def test_stage_chooses_the_undecided_step_and_never_the_skipped_ones() -> None:
    order, counts = _run(_toy_ctx(SCALES), n_samples=20, batch_size=4, count_weight=0.0, skip=0.2, groups=2)
    # round 1: flat U, the last step; afterwards the one step whose grouping stays undecided
    assert order == [5, 4, 4, 4, 4]
    assert counts.tolist() == [0, 0, 0, 0, 4, 1]


def test_count_penalty_spreads_the_rounds_over_the_window() -> None:
    order, counts = _run(_toy_ctx(SCALES), n_samples=18, batch_size=4, skip=0.2, groups=2)
    # lambda = 2 outweighs any entropy gap (at most ln 2 / 2 here): every eligible step once, the
    # undecided step right after the flat first round; 18 inputs: the fifth round holds 2
    assert order[:2] == [5, 4] and sorted(order) == [1, 2, 3, 4, 5]
    assert counts.tolist() == [0, 1, 1, 1, 1, 1]


def test_without_static_activation_quantizers_the_rule_runs_backwards_from_the_last_step() -> None:
    ctx = _toy_ctx(SCALES)
    ctx.layers = lambda: {"fc": QuantLinear.from_float(nn.Linear(8, 8), QuantSpec(w_bits=4, a_bits=None))}
    order, _ = _run(ctx, n_samples=12, batch_size=4, skip=0.5)
    assert order == [5, 4, 3]


def test_a_round_larger_than_the_pool_is_an_error() -> None:
    with pytest.raises(ValueError, match="calibration_pool.samples"):
        _run(_toy_ctx(SCALES), n_samples=8, batch_size=8)


def test_registered_as_a_calibration_sampler_with_the_authors_defaults() -> None:
    cls = REGISTRY.get("apq_dm_srm")
    assert cls is SRMTimestepSelection and cls.kind == "calibration"
    cfg = cls.Config(method="apq_dm_srm")
    assert (cfg.n_samples, cfg.batch_size, cfg.count_weight, cfg.skip, cfg.groups) == (1024, 16, 2.0, 0.3, 8)
    assert (cfg.entropy_weight, cfg.lr, cfg.weight_decay) == (1.0, 0.05, 0.05)


def test_composes_with_the_apq_dm_quantizer_on_a_unet(tiny_model_dir) -> None:
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), sampler={"scheduler": "ddim", "steps": 6}, quant={"w_bits": 8, "a_bits": 4},
        stages=[{"method": "apq_dm_srm", "n_samples": 12, "batch_size": 4, "groups": 2},
                {"method": "apq_dm", "groups": 2, "iters": 5, "batch_size": 8}],
    ))
    session = Session(recipe)
    ctx = session.quantize(recipe)
    order, counts = ctx.state["apq_dm_srm"]["order"], ctx.state["apq_dm_srm"]["counts"]
    timesteps = ctx.trajectory.timesteps
    assert len(ctx.calibration) == 12 and counts.sum() == 3 and order[0] == 5
    assert min(order) >= 1  # int(0.3 * 6): the noisiest step is never chosen
    per_step = torch.stack([(ctx.calibration.t == t).sum() for t in timesteps])
    assert torch.equal(per_step, 4 * counts)
    groups = ctx.state["reconstruction"]["apq_dm"]["groups"]
    assert groups and all(len(g) == len(timesteps) for g in groups.values())
