"""Single-step calibration: every calibration input comes from the one chosen sampling step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.conftest import tiny_recipe
from methods.one_step import OneStepCalibration
from qsearch.engine import Session
from qsearch.recipe import parse_recipe
from qsearch.sampling import Trajectory


def _trajectory(steps: int = 5, samples: int = 6) -> Trajectory:
    xs = torch.randn(steps, samples, 3, 4, 4)
    return Trajectory(xs, torch.arange(steps * 100, 0, -100), {"class_labels": torch.arange(samples)})


def _select(traj: Trajectory, **cfg):
    stage = OneStepCalibration(OneStepCalibration.Config(method="one_step", **cfg))
    return stage.select(SimpleNamespace(trajectory=traj))


def test_all_inputs_at_the_chosen_step() -> None:
    traj = _trajectory()
    for step, t in ((0, 500), (2, 300), (-1, 100)):
        calib = _select(traj, step=step, n_samples=4)
        assert (calib.t == t).all()
        samples = calib.cond["class_labels"]
        assert len(samples.unique()) == len(calib) == 4  # distinct runs of the pool
        assert torch.equal(calib.x, traj.xs[step, samples])


def test_capped_by_pool_and_rejects_steps_outside_the_schedule() -> None:
    traj = _trajectory()
    assert len(_select(traj, n_samples=100)) == traj.num_samples
    with pytest.raises(ValueError, match="outside"):
        _select(traj, step=5)


def test_first_step_is_the_initial_noise(tiny_model_dir) -> None:
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("dit"), stages=[{"method": "one_step", "n_samples": 3}, {"method": "rtn"}]
    ))
    session = Session(recipe)
    ctx = session.quantize(recipe)
    calib = ctx.calibration
    assert (calib.t == session.sampler.timesteps[0]).all() and len(calib) == 3
    labels = calib.cond["class_labels"]  # the tiny DiT has 10 classes and the pool 4 runs: label = index
    noise = session.sampler.initial_noise(session.fp.model, labels, recipe.calibration_pool.seed)
    assert torch.allclose(calib.x, noise)
