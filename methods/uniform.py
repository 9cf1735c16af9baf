"""Uniform timestep calibration: the baseline calibration sampler.

Draws ``n_samples`` denoiser inputs with timesteps uniform over the sampling trajectory (and the
sample run uniform over the pool), the naive choice that PTQ4DM, Q-Diffusion and EDA-DM improve on.
"""

from __future__ import annotations

import torch
from pydantic import Field

from qsearch.calibration import CalibrationSet
from qsearch.registry import register
from qsearch.stages import CalibrationSampler, QuantContext, StageConfig


@register("uniform")
class UniformTimesteps(CalibrationSampler):
    """Calibration inputs at timesteps drawn uniformly from the sampling trajectory."""

    paper = "baseline (no paper): uniform over the sampler's timesteps"

    class Config(StageConfig):
        n_samples: int = Field(256, ge=1, description="calibration inputs")
        seed: int = 0

    def select(self, ctx: QuantContext) -> CalibrationSet:
        traj = ctx.trajectory
        g = torch.Generator().manual_seed(self.config.seed)
        steps = torch.randint(traj.num_steps, (self.config.n_samples,), generator=g)
        samples = torch.randint(traj.num_samples, (self.config.n_samples,), generator=g)
        return CalibrationSet.from_trajectory(traj, steps, samples)
