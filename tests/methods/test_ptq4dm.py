"""PTQ4DM NDTC: calibration time-steps follow the configured normal distribution, skewed to t=0."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from methods.ptq4dm import NormalTimestepCalibration, nearest_steps
from qsearch.sampling import Trajectory

T = 1000


def _ctx(steps: int) -> SimpleNamespace:
    """A pool whose trajectory visits ``steps`` time-steps from T-1 down to 0 (one value per entry)."""
    timesteps = torch.linspace(T - 1, 0, steps).round().long()
    xs = timesteps.float().view(steps, 1, 1, 1, 1).expand(steps, 3, 1, 1, 1).clone()
    sampler = SimpleNamespace(num_train_timesteps=T)
    return SimpleNamespace(trajectory=Trajectory(xs, timesteps, {}), sampler=sampler)


def _select(mean: float, std: float, steps: int = T, n: int = 20000) -> torch.Tensor:
    cfg = NormalTimestepCalibration.Config(method="ptq4dm", n_samples=n, mean=mean, std=std, seed=3)
    calib = NormalTimestepCalibration(cfg).select(_ctx(steps))
    assert torch.equal(calib.x.flatten(), calib.t.float())  # each input is the trajectory at its t
    return calib.t.double()


def _truncated_normal(mean: float, std: float) -> torch.Tensor:
    """Reference: the normal truncated to [0, T) by rejection (independent draws, float64)."""
    g = torch.Generator().manual_seed(123)
    t = (torch.randn(2_000_000, generator=g, dtype=torch.float64) * std + mean).mul(T)
    return t[(t >= 0) & (t < T)].floor()


@pytest.mark.parametrize(("mean", "std"), [(0.4, 0.4), (0.2, 0.1), (0.5, 0.25)])
def test_chosen_timesteps_follow_the_configured_normal(mean: float, std: float) -> None:
    t = _select(mean, std)
    ref = _truncated_normal(mean, std)
    assert abs(t.mean() - ref.mean()) < 0.02 * T
    assert abs(t.std() - ref.std()) < 0.02 * T
    if std <= 0.1:  # barely truncated (the cut lies 2 std or more away): the plain normal's moments
        assert abs(t.mean() - mean * T) < 0.02 * T and abs(t.std() - std * T) < 0.02 * T


def test_timesteps_concentrate_near_zero_and_follow_the_mean() -> None:
    t_default = _select(0.4, 0.4)
    assert (t_default < T / 2).float().mean() > 0.55  # skewed toward the image end
    # the left tail is cut, not clamped: no pile on the final step t = 0 (a clamp puts 16% there)
    assert (t_default == 0).float().mean() < 0.005
    means = [_select(m, 0.1).mean() for m in (0.1, 0.3, 0.5)]
    assert means[0] + 0.15 * T < means[1] < means[2] - 0.15 * T


def test_draws_map_to_the_nearest_sampler_step() -> None:
    t = _select(0.3, 0.2, steps=11, n=4000)  # trajectory at 999, 899, ..., 0
    grid = torch.linspace(T - 1, 0, 11).round().double()
    assert set(t.tolist()) <= set(grid.tolist())
    assert nearest_steps(grid.long(), torch.tensor([0, 49, 51, 951, 999])).tolist() == [10, 10, 9, 0, 0]
    assert abs(t.mean() - 0.3 * T) < 0.03 * T


def test_mean_above_half_is_rejected() -> None:
    with pytest.raises(ValueError):
        NormalTimestepCalibration.Config(method="ptq4dm", mean=0.6)


def test_same_seed_same_set() -> None:
    assert torch.equal(_select(0.4, 0.4, n=100), _select(0.4, 0.4, n=100))
