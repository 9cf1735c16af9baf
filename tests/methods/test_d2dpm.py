"""D^2-DPM: the conditional Gaussian of the quantization noise given the quantized prediction, and
its two uses (S-D^2 samples it, D-D^2 subtracts its mean and absorbs its variance)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import tiny_recipe
from methods.d2dpm import DualDenoising, JointGaussian, fit_joint
from methods.ptqd import step_noise
from qsearch.engine import Session
from qsearch.models import Denoiser
from qsearch.recipe import parse_recipe


class AffineDenoiser(Denoiser):
    """A stand-in for a quantized model: ``(1 + a) eps + b``, i.e. noise exactly linear in the output."""

    def __init__(self, base: Denoiser, a: float, b: float) -> None:
        super().__init__(base.model)
        self.base, self.a, self.b = base, a, b

    def forward(self, x, t, cond):
        return (1 + self.a) * self.base.forward(x, t, cond) + self.b


@pytest.fixture(scope="module")
def fp_ctx(tiny_model_dir):
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": None, "a_bits": None},
        sampler={"scheduler": "ddim", "steps": 4, "eta": 1.0}, calibration_pool={"samples": 8},
        stages=[{"method": "uniform", "n_samples": 4}],
    ))
    session = Session(recipe)
    return session, session.quantize(recipe)


def _gaussian(**fields: float) -> JointGaussian:
    """The same one-channel Gaussian at each of the 4 steps."""
    return JointGaussian(**{k: torch.full((4, 1), v, dtype=torch.float64) for k, v in fields.items()})


def _stage(ctx, **cfg) -> DualDenoising:
    stage = DualDenoising(DualDenoising.Config(method="d2dpm", **cfg))
    stage.prepare(ctx)
    return stage


def test_fit_recovers_a_bivariate_gaussian_and_its_conditional() -> None:
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 2.0 * torch.randn(200_000, generator=g, dtype=torch.float64)
    y = -0.1 + 0.3 * (0.6 * (x - 0.5) / 2.0 + 0.8 * torch.randn(200_000, generator=g, dtype=torch.float64))
    mu_x, mu_y, sigma_x, sigma_y, rho = fit_joint(x, y)
    assert (mu_x, mu_y, sigma_x, sigma_y, rho) == pytest.approx((0.5, -0.1, 2.0, 0.3, 0.6), abs=0.02)
    gauss = JointGaussian(*(torch.tensor([[v]]) for v in (mu_x, mu_y, sigma_x, sigma_y, rho)))
    mean, std = gauss.conditional(0, torch.tensor([2.5]).view(1, 1))
    assert mean.item() == pytest.approx(-0.1 + 0.6 * 0.3 / 2.0 * 2.0, abs=0.01)  # mu_y + rho sy/sx (x - mu_x)
    assert std.item() == pytest.approx(0.3 * 0.8, abs=0.01)  # sigma_y sqrt(1 - rho^2)


@pytest.mark.parametrize("variant", ["stochastic", "deterministic"])
def test_no_quantization_noise_means_no_correction(fp_ctx, variant) -> None:
    session, ctx = fp_ctx
    stage = _stage(ctx, variant=variant)
    assert stage.gaussian.sigma_y.abs().max() == 0
    plain = session.sampler.sample(ctx.fp_denoiser, 4, seed=2, batch_size=4)
    corrected = session.sampler.sample(ctx.denoiser, 4, seed=2, batch_size=4, correctors=[stage])
    assert torch.equal(plain, corrected)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_noise_linear_in_the_prediction_is_removed(fp_ctx, granularity) -> None:
    session, ctx = fp_ctx
    quant = AffineDenoiser(ctx.fp_denoiser, a=0.2, b=0.05)
    stage = _stage(dataclasses.replace(ctx, denoiser=quant), variant="deterministic", granularity=granularity)
    assert (stage.gaussian.rho.abs() > 0.999).all()
    seen = []
    step = stage.wrap(lambda eps, t, x: seen.append(eps) or x, session.sampler)
    x, t = ctx.trajectory.xs[1, :4], ctx.trajectory.timesteps[1]
    with torch.no_grad():
        eps_q, eps_fp = quant(x, t, {}), ctx.fp_denoiser(x, t, {})
        step(eps_q, t, x)
    assert (seen[0] - eps_fp).abs().max() < 0.01 * (eps_q - eps_fp).abs().max()


def test_stochastic_variant_samples_the_conditional_noise(fp_ctx) -> None:
    session, ctx = fp_ctx
    stage = _stage(ctx, variant="stochastic")
    k = 1
    stage.gaussian = _gaussian(mu_x=0.0, mu_y=0.1, sigma_x=1.0, sigma_y=0.2, rho=0.6)
    seen = []
    step = stage.wrap(lambda eps, t, x: seen.append(eps) or x, session.sampler)
    eps_q = torch.randn(8, 3, 16, 16)
    step(eps_q, session.sampler.timesteps[k], torch.randn(8, 3, 16, 16))
    removed = eps_q - seen[0]
    mean = 0.1 + 0.6 * 0.2 / 1.0 * eps_q
    assert (removed - mean).mean().abs() < 0.01
    assert (removed - mean).std().item() == pytest.approx(0.2 * 0.8, rel=0.05)


def test_deterministic_variant_absorbs_the_variance(fp_ctx) -> None:
    session, ctx = fp_ctx
    stage = _stage(ctx, variant="deterministic")
    stage.gaussian = _gaussian(mu_x=0.0, mu_y=0.0, sigma_x=1.0, sigma_y=0.001, rho=0.0)
    t = session.sampler.timesteps[0]
    noise = step_noise(session.sampler, t)
    seen = []

    def inner(eps, t, x):  # the step sees the reduced variance through the scheduler
        seen.append(float(session.sampler.scheduler._get_variance(int(t), 0)) ** 0.5)
        return x

    stage.wrap(inner, session.sampler)(torch.zeros(1, 3, 4, 4), t, torch.zeros(1, 3, 4, 4))
    expected = (noise.sigma**2 - noise.eps_coef**2 * 0.001**2) ** 0.5
    assert seen[0] == pytest.approx(expected, rel=1e-6) and 0 < seen[0] < noise.sigma


def test_stochastic_sampling_is_deterministic_for_given_seeds(fp_ctx) -> None:
    session, ctx = fp_ctx
    stage = _stage(dataclasses.replace(ctx, denoiser=AffineDenoiser(ctx.fp_denoiser, 0.1, 0.0)))
    stage.gaussian.sigma_y += 0.05  # some conditional spread, so the draws matter
    def run(seed: int) -> torch.Tensor:
        return session.sampler.sample(ctx.denoiser, 4, seed=seed, batch_size=4, correctors=[stage])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
