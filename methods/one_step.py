"""Single-step calibration for diffusion transformers: every calibration input from one sampling step.

Yang, Wang, Dai, Zhang & Zhang, "An Analysis on Quantizing Diffusion Transformers", CVPR 2024
Workshops (arXiv 2406.11100). No code was released with the paper.

The paper's proposal for activations is a "single-step sampling calibration": where U-Net methods
(PTQ4DM, Q-Diffusion) spread the calibration set over the whole sampling trajectory, the DiT's
activation ranges are calibrated on the inputs of a single denoising step, which makes calibration an
optimisation-free, one-call-per-sample procedure.

Which step: by default the first one, ``t = T``, whose denoiser input is the sampler's initial noise
(with the class or text conditioning); it needs no FP sampling at all to produce, which is what makes
the calibration single-step. ``step`` selects any other step of the sampler's schedule (``-1``: the
last, least noisy one) for comparing the choice on a given model.

What is partial: the stored copies of the paper available while writing this held its abstract only,
so the default step above is this module's reading of "single-step sampling calibration" (the paper's
analysis of which step to use could not be checked); the step is a recipe parameter for that reason.
The paper's other proposal, group-wise weight quantization, is the core's ``w_granularity: group``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from qsearch.calibration import CalibrationSet
from qsearch.registry import register
from qsearch.stages import CalibrationSampler, QuantContext, StageConfig


@register("one_step")
class OneStepCalibration(CalibrationSampler):
    """Calibration inputs all taken at one sampling step (default: the first, pure-noise step)."""

    paper = "Yang et al., An Analysis on Quantizing Diffusion Transformers, CVPR Workshops 2024"

    class Config(StageConfig):
        step: int = Field(0, description="index into the sampler's timesteps (0: first, t = T; -1: last)")
        n_samples: int = Field(256, ge=1, description="calibration inputs (at most the pool's samples)")
        seed: int = 0

    def select(self, ctx: QuantContext) -> CalibrationSet:
        traj = ctx.trajectory
        if not -traj.num_steps <= self.config.step < traj.num_steps:
            raise ValueError(f"one_step: step {self.config.step} outside the {traj.num_steps}-step schedule")
        n = min(self.config.n_samples, traj.num_samples)
        g = torch.Generator().manual_seed(self.config.seed)
        samples = torch.randperm(traj.num_samples, generator=g)[:n]
        steps = torch.full((n,), self.config.step % traj.num_steps)
        return CalibrationSet.from_trajectory(traj, steps, samples)
