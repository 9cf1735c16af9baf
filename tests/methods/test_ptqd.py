"""PTQD: recovers the correlated part, bias and residual std of the quantization noise; variance
calibration never goes negative and is the identity when there is no quantization noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import tiny_recipe
from methods.ptqd import PTQD, noise_std, reduced_sigma, step_noise, StepNoise
from qsearch.engine import Session
from qsearch.models import Denoiser
from qsearch.recipe import parse_recipe

FP = {"w_bits": None, "a_bits": None}


class NoisyDenoiser(Denoiser):
    """A stand-in for a quantized model: ``(1 + k) eps + mu_c + std * noise``, noise independent of eps."""

    def __init__(self, base: Denoiser, k: float, mu: list[float], std: float) -> None:
        super().__init__(base.model)
        self.base, self.k, self.mu, self.std = base, k, torch.tensor(mu), std
        self.calls = 0

    def forward(self, x, t, cond):
        eps = self.base.forward(x, t, cond)
        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        noise = torch.randn(eps.shape, generator=g)
        return (1 + self.k) * eps + self.mu.view(1, -1, 1, 1) + self.std * noise


def _session(tiny_model_dir, scheduler: str = "ddim", eta: float = 1.0) -> tuple[Session, object]:
    sampler = {"scheduler": scheduler, "steps": 4} | ({"eta": eta} if scheduler == "ddim" else {})
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant=FP, sampler=sampler, calibration_pool={"samples": 8},
        stages=[{"method": "uniform", "n_samples": 4}, {"method": "ptqd"}],
    ))
    return Session(recipe), recipe


@pytest.fixture(scope="module")
def ddim(tiny_model_dir):
    session, recipe = _session(tiny_model_dir)
    return session, recipe, session.quantize(recipe)


def _ptqd(ctx) -> PTQD:
    stage = PTQD()
    stage.prepare(ctx)
    return stage


def test_no_quantization_noise_means_no_correction(ddim) -> None:
    session, recipe, ctx = ddim  # an FP "quantized" model: zero quantization noise
    stage = ctx.correctors[0]
    assert torch.equal(stage.stats.k, torch.zeros(4)) and stage.stats.mu.abs().max() == 0
    assert stage.stats.sigma.abs().max() == 0
    for t in session.sampler.timesteps:
        before, after = stage.corrected_sigma(session.sampler, t)
        assert after == before
    plain = session.sampler.sample(ctx.fp_denoiser, 4, seed=1, batch_size=4)
    corrected = session.sampler.sample(ctx.denoiser, 4, seed=1, batch_size=4, correctors=ctx.correctors)
    assert torch.equal(plain, corrected)


def test_recovers_correlation_and_residual_std(ddim) -> None:
    _, _, ctx = ddim
    noisy = NoisyDenoiser(ctx.fp_denoiser, k=0.2, mu=[0.0, 0.0, 0.0], std=0.03)
    stats = _ptqd(dataclasses.replace(ctx, denoiser=noisy)).stats
    assert torch.allclose(stats.k, torch.full((4,), 0.2), atol=0.01)
    assert stats.mu.abs().max() < 0.01
    assert torch.allclose(stats.sigma, torch.full((4,), 0.03), rtol=0.1)


def test_recovers_the_bias_per_channel(ddim) -> None:
    _, _, ctx = ddim
    noisy = NoisyDenoiser(ctx.fp_denoiser, k=0.0, mu=[0.05, -0.1, 0.0], std=0.0)
    stats = _ptqd(dataclasses.replace(ctx, denoiser=noisy)).stats
    assert torch.allclose(stats.mu, torch.tensor([0.05, -0.1, 0.0]).expand(4, 3), atol=0.01)


@pytest.mark.parametrize(("k", "mu"), [(0.2, [0.0, 0.0, 0.0]), (0.0, [0.05, -0.1, 0.0])])
def test_corrected_prediction_is_unscaled_and_unbiased(ddim, k, mu) -> None:
    session, _, ctx = ddim
    noisy = NoisyDenoiser(ctx.fp_denoiser, k=k, mu=mu, std=0.0)
    stage = _ptqd(dataclasses.replace(ctx, denoiser=noisy))
    seen = []
    step = stage.wrap(lambda eps, t, x: seen.append(eps) or x, session.sampler)
    x, t = ctx.trajectory.xs[2, :4], ctx.trajectory.timesteps[2]
    with torch.no_grad():
        eps_q, eps_fp = noisy(x, t, {}), ctx.fp_denoiser(x, t, {})
        step(eps_q, t, x)
    assert (seen[0] - eps_fp).abs().max() < 0.01 < (eps_q - eps_fp).abs().max()


def test_variance_shrinks_never_below_zero(ddim) -> None:
    session, _, ctx = ddim
    for std, expect_zero in ((0.001, False), (50.0, True)):
        stage = _ptqd(dataclasses.replace(ctx, denoiser=NoisyDenoiser(ctx.fp_denoiser, 0.1, [0, 0, 0], std)))
        for t in session.sampler.timesteps[:-1]:  # the last DDIM step adds no noise
            before, after = stage.corrected_sigma(session.sampler, t)
            assert before > 0 and 0 <= after < before
            assert (after == 0) == expect_zero
            noise = step_noise(session.sampler, t)
            k = stage.timesteps.index(int(t))
            residual = float(stage.stats.sigma[k]) / (1 + float(stage.stats.k[k]))
            if not expect_zero:  # total variance of x_{t-1} is kept: new^2 + c^2 residual^2 = old^2
                assert after**2 + (noise.eps_coef * residual) ** 2 == pytest.approx(before**2, rel=1e-6)
    assert reduced_sigma(StepNoise(0.0, 1.0), 0.5) == 0.0


def test_noise_std_sets_the_scheduler_noise(ddim) -> None:
    session, _, ctx = ddim
    sampler = session.sampler
    sampler.scheduler.set_timesteps(4)
    t = sampler.timesteps[1]
    x = ctx.trajectory.xs[1, :2]
    eps = torch.randn_like(x)
    det = sampler.scheduler.step(eps, t, x, eta=0.0).prev_sample
    with noise_std(sampler, 0.0):
        stochastic_at_zero = sampler.base_step(torch.Generator().manual_seed(0))(eps, t, x)
    assert torch.allclose(stochastic_at_zero, det, atol=1e-6)
    assert "_get_variance" not in vars(sampler.scheduler)  # restored
    sigma = step_noise(sampler, t).sigma
    with noise_std(sampler, sigma):  # asking for the scheduler's own std changes nothing
        same = sampler.base_step(torch.Generator().manual_seed(0))(eps, t, x)
    assert torch.allclose(same, sampler.base_step(torch.Generator().manual_seed(0))(eps, t, x), atol=1e-6)


def test_ddpm_coefficient_matches_the_scheduler(tiny_model_dir) -> None:
    session, recipe = _session(tiny_model_dir, scheduler="ddpm")
    sampler = session.sampler
    sampler.scheduler.set_timesteps(4)
    t = sampler.timesteps[1]
    x = torch.randn(1, 3, 16, 16) * 0.01  # small: x0 is not clipped, the update is linear in eps
    eps = torch.randn_like(x) * 0.01
    with noise_std(sampler, 0.0):
        a = sampler.scheduler.step(eps, t, x).prev_sample
        b = sampler.scheduler.step(eps + 0.001, t, x).prev_sample
    noise = step_noise(sampler, t)
    assert torch.allclose((b - a) / 0.001, torch.full_like(a, noise.eps_coef), rtol=1e-2)
    assert noise.sigma > 0
