"""PTQD: correct the quantization noise of the noise prediction, and fold what is left into the
sampler's variance schedule.

He et al. model the quantized network's output at each step as ``eps_q = (1 + k_t) eps + Delta'``:
a part of the quantization noise is correlated with the FP prediction ``eps`` (the network's output
is scaled by ``1 + k_t``), the rest ``Delta' ~ N(mu_t, sigma_t^2)`` is uncorrelated. Per step they

1. estimate ``k_t`` by linear regression of the quantization noise ``eps_q - eps`` on ``eps``
   (kept only when positive, as in the released code), and remove it: divide by ``1 + k_t``;
2. correct the bias of the residual: subtract its mean ``mu_t`` (per channel);
3. calibrate the variance schedule: after 1-2 the prediction still carries zero-mean noise of std
   ``sigma_t / (1 + k_t)``, which enters ``x_{t-1}`` through the coefficient ``c_t`` of ``eps`` in
   the sampler's update, so the step's own noise is reduced to keep the total variance:
   ``sigma'^2 = sigma^2 - c_t^2 sigma_q^2 / (1 + k_t)^2``, or 0 when that is negative.

``c_t`` is ``sqrt(1 - a_prev - sigma^2) - sqrt(a_prev (1 - a_t) / a_t)`` for DDIM (its stochastic
form with ``eta``; at ``eta = 0`` there is no noise to reduce and only 1-2 apply) and
``-beta_t / (sqrt(alpha_t) sqrt(1 - a_t))`` for DDPM (``a`` = cumulative alphas). Deterministic
ODE solvers (DPM-Solver, Euler) get 1-2 only. The new ``sigma'`` is applied by letting the
scheduler's own step draw its noise with it (see ``noise_std``), so seeds and the chain of
correctors are untouched.

Statistics: per sampling step, on the pool's FP trajectories (every step of the sampler, which is
what PTQD's collection script records: the FP trajectory and both models' predictions on it),
guided exactly as sampling is. The calibration set of the recipe is not used: it may leave out
steps (PTQ4DM, EDA-DM), and the correction needs each step.

Differences from the released code, each following the paper's equations: ``mu_t`` is the mean
of the residual ``Delta'`` (the code subtracts the mean of the raw error, which differs by
``k_t mean(eps)``), and ``sigma_t`` is the std of ``Delta'`` about its channel means over all
samples (the code averages per-sample stds).

Paper: Y. He, L. Liu, J. Liu, W. Wu, H. Zhou, B. Zhuang, "PTQD: Accurate Post-Training
Quantization for Diffusion Models", NeurIPS 2023 (arXiv:2305.10657). Code:
https://github.com/ziplab/PTQD (``quant_scripts/analyze_error.py``, ``ldm/models/diffusion/ddim.py``:
``DDIMSampler_quantCorrection_imagenet``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import Field

from qsearch.registry import register
from qsearch.sampling import Sampler, StepFn
from qsearch.stages import ErrorCorrector, QuantContext, StageConfig


# ------------------------------------------------------------------------------------------------
# helpers shared by the error correctors (PTQD, D2-DPM, TaC-QDM)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def noise_estimates(
    ctx: QuantContext, samples: int | None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For every sampling step ``k`` of the pool: ``(k, eps_fp, eps_q)`` on the FP trajectory.

    Both models see the same inputs (the first ``samples`` pool trajectories at step ``k``) and
    are guided as the sampler guides them, so the noise measured is the noise sampling will see.
    """
    traj = ctx.trajectory
    n = min(samples or traj.num_samples, traj.num_samples)
    device = ctx.device
    cond, uncond = ctx.sampler.conditioning(ctx.fp_denoiser.model, torch.arange(n))
    scale = ctx.sampler.config.guidance_scale
    for k in range(traj.num_steps):
        t = traj.timesteps[k].to(device)
        fp, q = [], []
        for s in range(0, n, ctx.batch_size):
            e = min(n, s + ctx.batch_size)
            x = traj.xs[k, s:e].to(device)
            c = {key: v[s:e].to(device) for key, v in cond.items()}
            u = {key: v[s:e].to(device) for key, v in uncond.items()} if uncond else None
            fp.append(ctx.fp_denoiser(x, t, c, u, scale).float())
            q.append(ctx.denoiser(x, t, c, u, scale).float())
        yield k, torch.cat(fp), torch.cat(q)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over everything but the channel axis (dim 1)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).mean(1)


def per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (C,) vector shaped to broadcast over (B, C, ...) tensors like ``like``."""
    return v.to(like.device, like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


@dataclass(frozen=True)
class StepNoise:
    """The noise a scheduler step adds (std ``sigma``) and the weight ``eps_coef`` of ``eps`` in it."""

    sigma: float
    eps_coef: float


def step_noise(sampler: Sampler, t: torch.Tensor) -> StepNoise:
    """``sigma_t`` and ``c_t`` of the sampler's update at time-step ``t`` (``sigma = 0``: deterministic)."""
    sched = sampler.scheduler
    t = int(t)
    kind = type(sched).__name__
    if kind == "DDIMScheduler":
        prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = float(sched.alphas_cumprod[t])
        a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        sigma = sampler.config.eta * float(sched._get_variance(t, prev)) ** 0.5
        coef = math.sqrt(max(1 - a_prev - sigma**2, 0.0)) - math.sqrt(a_prev * (1 - a_t) / a_t)
        return StepNoise(sigma, coef)
    if kind == "DDPMScheduler":
        prev = int(sched.previous_timestep(t))
        a_t = float(sched.alphas_cumprod[t])
        a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else 1.0
        alpha = a_t / a_prev
        beta = 1 - alpha
        coef = -beta / (math.sqrt(alpha) * math.sqrt(1 - a_t))
        if t == 0:
            return StepNoise(0.0, coef)
        variance_type = sched.config.variance_type
        if variance_type == "fixed_small":
            var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
        elif variance_type == "fixed_large":
            var = beta
        else:
            raise NotImplementedError(f"variance calibration of DDPM variance_type {variance_type!r}")
        return StepNoise(math.sqrt(var), coef)
    return StepNoise(0.0, 0.0)  # deterministic solvers: nothing to calibrate


def reduced_sigma(noise: StepNoise, extra_std: float) -> float:
    """``sqrt(sigma^2 - c^2 extra^2)``, or 0 when the extra noise already exceeds the step's own."""
    extra = (noise.eps_coef * extra_std) ** 2
    return math.sqrt(noise.sigma**2 - extra) if extra < noise.sigma**2 else 0.0


@contextmanager
def noise_std(sampler: Sampler, sigma: float) -> Iterator[None]:
    """Within the block, the scheduler's step adds noise of std ``sigma`` instead of its own.

    The scheduler reads its variance through ``_get_variance``; an instance attribute shadows the
    method for the duration of one step (DDIM scales it by ``eta``, DDPM's fixed variances are used
    as variances), so the step keeps drawing its noise from the sampler's seeded generator and DDIM's
    direction term ``sqrt(1 - a_prev - sigma^2)`` follows the new ``sigma``, as in the PTQD code.
    """
    sched = sampler.scheduler
    if type(sched).__name__ == "DDIMScheduler":
        value = (sigma / sampler.config.eta) ** 2
    else:
        value = sigma**2
    sched._get_variance = lambda *args, **kwargs: torch.tensor(value)
    try:
        yield
    finally:
        del sched._get_variance


# ------------------------------------------------------------------------------------------------
# PTQD
# ------------------------------------------------------------------------------------------------
@dataclass
class PTQDStats:
    """Per sampling step: correlation ``k`` (S,), residual mean ``mu`` (S, C), residual std ``sigma`` (S,)."""

    k: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor


def ptqd_step_stats(eps_fp: torch.Tensor, eps_q: torch.Tensor) -> tuple[float, torch.Tensor, float]:
    """``k_t`` (regression slope of the quantization noise on ``eps``, ReLU'd), residual mean and std."""
    err = (eps_q - eps_fp).double()
    x = eps_fp.double()
    xc = x - x.mean()
    var = xc.pow(2).mean()
    slope = float((xc * (err - err.mean())).mean() / var) if var > 0 else 0.0
    k = max(slope, 0.0)
    residual = err - k * x
    mu = channel_mean(residual)
    sigma = float((residual - per_channel(mu, residual)).pow(2).mean().sqrt())
    return k, mu.float(), sigma


@register("ptqd")
class PTQD(ErrorCorrector):
    """PTQD: remove correlated quantization noise, correct its bias, calibrate the variance schedule."""

    paper = "He et al., PTQD: Accurate Post-Training Quantization for Diffusion Models (NeurIPS 2023)"

    class Config(StageConfig):
        samples: int | None = Field(
            None, ge=2, description="pool trajectories the statistics use (null: the whole pool)"
        )

    def __init__(self, config: StageConfig | None = None) -> None:
        super().__init__(config)
        self.stats: PTQDStats | None = None
        self.timesteps: list[int] = []

    def prepare(self, ctx: QuantContext) -> None:
        ks, mus, sigmas = [], [], []
        for _, eps_fp, eps_q in noise_estimates(ctx, self.config.samples):
            k, mu, sigma = ptqd_step_stats(eps_fp, eps_q)
            ks.append(k)
            mus.append(mu.cpu())
            sigmas.append(sigma)
        self.stats = PTQDStats(torch.tensor(ks), torch.stack(mus), torch.tensor(sigmas))
        self.timesteps = ctx.trajectory.timesteps.tolist()
        ctx.state[self.name] = {"k": self.stats.k, "mu": self.stats.mu, "sigma": self.stats.sigma}

    def corrected_sigma(self, sampler: Sampler, t: torch.Tensor) -> tuple[float, float]:
        """The step's noise std before and after variance calibration."""
        k = self.timesteps.index(int(t))
        noise = step_noise(sampler, t)
        residual_std = float(self.stats.sigma[k]) / (1 + float(self.stats.k[k]))
        return noise.sigma, reduced_sigma(noise, residual_std)

    def wrap(self, step: StepFn, sampler: Sampler) -> StepFn:
        if self.stats is None:
            raise RuntimeError("ptqd: prepare() has not run")
        index = {int(t): k for k, t in enumerate(self.timesteps)}

        def corrected(eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            k = index[int(t)]
            eps = (eps - per_channel(self.stats.mu[k], eps)) / (1 + float(self.stats.k[k]))
            sigma, new_sigma = self.corrected_sigma(sampler, t)
            if new_sigma == sigma:
                return step(eps, t, x)
            with noise_std(sampler, new_sigma):
                return step(eps, t, x)

        return corrected
