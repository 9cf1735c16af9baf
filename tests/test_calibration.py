"""Calibration data: selection from trajectories and what the hooks collect."""

from __future__ import annotations

import torch

from qsearch.calibration import CalibrationSet, capture_inputs, collect_stats
from qsearch.models import Denoiser, load_model
from qsearch.sampling import Trajectory


def _denoiser(tiny_model_dir) -> Denoiser:
    return Denoiser(load_model(str(tiny_model_dir("unet2d"))).denoiser)


def _calib(n: int = 6) -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(torch.randn(n, 3, 16, 16, generator=g), torch.linspace(900, 10, n).long(), {})


def test_from_trajectory_picks_the_named_entries() -> None:
    xs = torch.arange(3 * 4).float().view(3, 4, 1, 1, 1)
    traj = Trajectory(xs, torch.tensor([900, 500, 100]), {"class_labels": torch.tensor([5, 6, 7, 8])})
    calib = CalibrationSet.from_trajectory(traj, torch.tensor([0, 2]), torch.tensor([3, 1]))
    assert calib.x.flatten().tolist() == [3.0, 9.0]
    assert calib.t.tolist() == [900, 100]
    assert calib.cond["class_labels"].tolist() == [8, 6]


def test_stats_hooks_see_each_layers_true_inputs(tiny_model_dir) -> None:
    den = _denoiser(tiny_model_dir)
    layer = den.model.conv_in
    calib = _calib()
    stats = collect_stats(den, {"conv_in": layer}, calib, batch_size=4)
    assert torch.isclose(stats.lo["conv_in"], calib.x.min()) and torch.isclose(stats.hi["conv_in"], calib.x.max())
    assert torch.allclose(stats.channel_absmax["conv_in"], calib.x.abs().amax(dim=(0, 2, 3)))


def test_capture_is_bounded_and_rows_are_real_inputs(tiny_model_dir) -> None:
    den = _denoiser(tiny_model_dir)
    captured = capture_inputs(den, {"conv_in": den.model.conv_in}, _calib(), max_rows=50, batch_size=2)
    rows = captured["conv_in"]
    assert rows.shape == (48, 3)  # 3 batches x 16 rows each, channels last
    pixels = _calib().x.permute(0, 2, 3, 1).reshape(-1, 3)
    assert all((pixels == r).all(-1).any() for r in rows)
    assert not any(h for h in den.model.conv_in._forward_pre_hooks.values())  # hooks removed
