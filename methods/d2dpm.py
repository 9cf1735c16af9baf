"""D^2-DPM: dual denoising of the quantization noise, by its conditional Gaussian at each step.

Zeng et al. split the effect of quantization on a sampling step into a *mean deviation* (it shifts
the drift of the sampling equation) and a *variance deviation* (it inflates the diffusion term).
Per time-step they fit a joint Gaussian to the quantized prediction ``X = eps_q`` and the
quantization noise ``Y = eps_q - eps`` (on calibration trajectories, after dropping points whose
noise lies beyond 4 std), so that given the prediction the noise is Gaussian with

    mu_{Y|X} = mu_Y + rho sigma_Y / sigma_X (eps_q - mu_X),   sigma_{Y|X} = sigma_Y sqrt(1 - rho^2)

(``rho`` clipped to +-0.9999). The prediction is then denoised before the sampler denoises the
sample (hence "dual"), in one of the paper's two variants:

* ``stochastic`` (S-D^2): subtract a *sample* of the conditional noise,
  ``eps' = eps_q - (mu_{Y|X} + sigma_{Y|X} z)``; the sampler step is unchanged;
* ``deterministic`` (D-D^2): subtract its mean, ``eps' = eps_q - mu_{Y|X}``, and absorb the variance
  it leaves into the step's noise, ``sigma'^2 = sigma^2 - c_t^2 sigma_{Y|X}^2`` (0 when negative),
  ``c_t`` being the weight of ``eps`` in the update (as in PTQD; see ``methods.ptqd.step_noise``).

The Gaussian is fitted over the whole tensor (``granularity: tensor``, the authors' tensor-wise
modelling) or per output channel (``channel``); with per-channel statistics the D-D^2 variance
absorbed by the scalar step noise is the channel average of ``sigma_{Y|X}^2``. Statistics come from
the pool's FP trajectories at every sampling step, guided as sampling is. The S-D^2 noise ``z`` is
drawn from a generator seeded by ``seed`` and the batch's starting noise, so sampling stays
deterministic for given seeds.

Paper: Q. Zeng, J. Song, H. Zheng, H. Jiang, M. Song, "D^2-DPM: Dual Denoising for Quantized
Diffusion Probabilistic Models", AAAI 2025 (arXiv:2501.08180). Code:
https://github.com/TaylorJocelyn/D2-DPM (``quant_scripts/gaussian_modeling.py``;
``ldm/models/diffusion/ddim.py``: ``DDIMSampler_gaussian_quantCorrection_imagenet`` (S-D^2) and
``DDIMSampler_implicit_gaussian_quantCorrection_imagenet`` (D-D^2)).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from methods.ptqd import noise_estimates, noise_std, reduced_sigma, step_noise
from qsearch.registry import register
from qsearch.sampling import Sampler, StepFn
from qsearch.stages import ErrorCorrector, QuantContext, StageConfig

RHO_MAX = 0.9999
OUTLIER_STD = 4.0


@dataclass
class JointGaussian:
    """Per step (and channel): means and stds of ``X = eps_q`` and ``Y = eps_q - eps``, and ``rho``."""

    mu_x: torch.Tensor
    mu_y: torch.Tensor
    sigma_x: torch.Tensor
    sigma_y: torch.Tensor
    rho: torch.Tensor

    def conditional(self, k: int, eps_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (shaped like ``eps_q``) and std (per channel, or one) of the noise given ``eps_q``."""
        shape = (1, -1, *([1] * (eps_q.dim() - 2)))

        def at(v: torch.Tensor) -> torch.Tensor:
            return v[k].to(eps_q.device, eps_q.dtype).reshape(shape)

        slope = at(self.rho) * at(self.sigma_y) / at(self.sigma_x).clamp_min(1e-12)
        mean = at(self.mu_y) + slope * (eps_q - at(self.mu_x))
        std = self.sigma_y[k] * (1 - self.rho[k] ** 2).sqrt()
        return mean, std


def fit_joint(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, float, float]:
    """``mu_x, mu_y, sigma_x, sigma_y, rho`` of paired samples, after the 4-sigma outlier cut on ``y``."""
    x, y = x.double().flatten(), y.double().flatten()
    keep = (y - y.mean()).abs() <= OUTLIER_STD * y.std(correction=0)
    x, y = x[keep], y[keep]
    mu_x, mu_y = x.mean(), y.mean()
    sigma_x, sigma_y = x.std(), y.std()  # unbiased, as numpy.cov
    cov = ((x - mu_x) * (y - mu_y)).sum() / (len(x) - 1)
    rho = cov / (sigma_x * sigma_y) if sigma_x > 0 and sigma_y > 0 else torch.zeros((), dtype=x.dtype)
    rho = rho.clamp(-RHO_MAX, RHO_MAX)
    return float(mu_x), float(mu_y), float(sigma_x), float(sigma_y), float(rho)


def batch_generator(x: torch.Tensor, seed: int) -> torch.Generator:
    """A generator seeded by ``seed`` and the bytes of ``x`` (a batch's starting noise)."""
    digest = hashlib.sha256(x.detach().float().cpu().numpy().tobytes()).digest()
    g = torch.Generator(x.device)
    g.manual_seed(seed ^ int.from_bytes(digest[:7], "little"))
    return g


@register("d2dpm")
class DualDenoising(ErrorCorrector):
    """D^2-DPM: subtract the quantization noise's conditional Gaussian (S-D^2 or D-D^2)."""

    paper = "Zeng et al., D2-DPM: Dual Denoising for Quantized Diffusion Probabilistic Models (AAAI 2025)"

    class Config(StageConfig):
        variant: Literal["stochastic", "deterministic"] = Field(
            "stochastic",
            description="S-D^2 samples the noise; D-D^2 subtracts its mean and absorbs its variance",
        )
        granularity: Literal["tensor", "channel"] = Field(
            "tensor", description="one Gaussian per step, or one per step and channel"
        )
        samples: int | None = Field(
            None, ge=2, description="pool trajectories the statistics use (null: the whole pool)"
        )
        seed: int = 0

    def __init__(self, config: StageConfig | None = None) -> None:
        super().__init__(config)
        self.gaussian: JointGaussian | None = None
        self.timesteps: list[int] = []

    def prepare(self, ctx: QuantContext) -> None:
        rows = []
        for _, eps_fp, eps_q in noise_estimates(ctx, self.config.samples):
            noise = eps_q - eps_fp
            if self.config.granularity == "tensor":
                rows.append([fit_joint(eps_q, noise)])
            else:
                rows.append([fit_joint(eps_q[:, c], noise[:, c]) for c in range(eps_q.shape[1])])
        fields = torch.tensor(rows, dtype=torch.float64).permute(2, 0, 1)  # (5, steps, channels)
        self.gaussian = JointGaussian(*fields)
        self.timesteps = ctx.trajectory.timesteps.tolist()
        ctx.state[self.name] = {"rho": self.gaussian.rho, "sigma_y": self.gaussian.sigma_y}

    def wrap(self, step: StepFn, sampler: Sampler) -> StepFn:
        if self.gaussian is None:
            raise RuntimeError("d2dpm: prepare() has not run")
        index = {int(t): k for k, t in enumerate(self.timesteps)}
        generator: list[torch.Generator] = []

        def denoised(eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            k = index[int(t)]
            mean, std = self.gaussian.conditional(k, eps)
            if self.config.variant == "stochastic":
                if not generator:
                    generator.append(batch_generator(x, self.config.seed))
                z = torch.randn(eps.shape, generator=generator[0], device=eps.device, dtype=eps.dtype)
                std_b = std.to(eps.device, eps.dtype).view(1, -1, *([1] * (eps.dim() - 2)))
                return step(eps - mean - std_b * z, t, x)
            noise = step_noise(sampler, t)
            new_sigma = reduced_sigma(noise, float(std.pow(2).mean().sqrt()))
            if new_sigma == noise.sigma:
                return step(eps - mean, t, x)
            with noise_std(sampler, new_sigma):
                return step(eps - mean, t, x)

        return denoised
