"""TaC-QDM: the closed-form NER coefficient minimises its loss, reconstructs a rescaled estimate,
and IBC leaves no mean drift between the corrected quantized trajectory and the FP one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import tiny_recipe
from methods.tac_qdm import TimestepAwareCorrection, TrajectoryRecorder, ner_coefficients
from qsearch.engine import Session
from qsearch.models import Denoiser
from qsearch.recipe import parse_recipe


class AffineDenoiser(Denoiser):
    """A stand-in for a quantized model: ``scale_c * eps + offset_c`` per output channel."""

    def __init__(self, base: Denoiser, scale: list[float], offset: list[float]) -> None:
        super().__init__(base.model)
        self.base = base
        self.s, self.o = torch.tensor(scale).view(1, -1, 1, 1), torch.tensor(offset).view(1, -1, 1, 1)

    def forward(self, x, t, cond):
        return self.s * self.base.forward(x, t, cond) + self.o


class TimestepScaledDenoiser(Denoiser):
    """A stand-in whose error changes with the step: ``(1 + t / 1000) * eps``."""

    def __init__(self, base: Denoiser) -> None:
        super().__init__(base.model)
        self.base = base

    def forward(self, x, t, cond):
        return (1 + t.float().view(-1, 1, 1, 1) / 1000) * self.base.forward(x, t, cond)


@pytest.fixture(scope="module")
def fp_ctx(tiny_model_dir):
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("unet2d"), quant={"w_bits": None, "a_bits": None},
        sampler={"scheduler": "ddim", "steps": 4}, stages=[{"method": "uniform", "n_samples": 4}],
    ))
    session = Session(recipe)
    return session, session.quantize(recipe)


def _stage(ctx, **cfg) -> TimestepAwareCorrection:
    stage = TimestepAwareCorrection(TimestepAwareCorrection.Config(method="tac_qdm", n_samples=6, **cfg))
    stage.prepare(ctx)
    return stage


def _loss(k, q, r, l1, l2, ratio):
    mask = r.abs() >= ratio * r.abs().mean()
    mse = ((k * q - r) ** 2).mean()
    rqnsr = ((k * q[mask] / r[mask] - 1) ** 2).mean()
    return (1 - l1) * mse + l1 * rqnsr + l2 * (k - 1) ** 2


def test_closed_form_minimises_the_loss() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    q = 0.8 * r + 0.1 * torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64)
    k = ner_coefficients(q, r, 0.5, 0.1, 1.0).double()
    grid = torch.linspace(0.5, 2.0, 3001, dtype=torch.float64)
    for c in range(2):
        losses = torch.stack([_loss(v, q[:, c], r[:, c], 0.5, 0.1, 1.0) for v in grid])
        assert abs(grid[losses.argmin()] - k[c]) <= 1e-3
    assert torch.allclose(ner_coefficients(r, r, 0.5, 0.1, 1.0), torch.ones(2))
    assert torch.allclose(ner_coefficients(3 * r, r, 0.5, 0.0, 1.0), torch.full((2,), 1 / 3))


def test_identity_when_the_model_is_not_quantized(fp_ctx) -> None:
    session, ctx = fp_ctx
    stage = _stage(ctx)
    assert torch.allclose(stage.scale, torch.ones_like(stage.scale), atol=1e-6)
    assert stage.bias.abs().max() < 1e-6
    plain = session.sampler.sample(ctx.fp_denoiser, 4, seed=3, batch_size=4)
    corrected = session.sampler.sample(ctx.denoiser, 4, seed=3, batch_size=4, correctors=[stage])
    assert torch.allclose(plain, corrected, atol=1e-5)


def test_ner_reconstructs_a_rescaled_estimate(fp_ctx) -> None:
    session, ctx = fp_ctx
    quant = AffineDenoiser(ctx.fp_denoiser, scale=[1.25, 0.8, 1.1], offset=[0.0, 0.0, 0.0])
    stage = _stage(dataclasses.replace(ctx, denoiser=quant), lambda_reg=0.0)
    expected = 1 / torch.tensor([1.25, 0.8, 1.1])
    assert torch.allclose(stage.scale, expected.expand_as(stage.scale), rtol=1e-4)
    assert stage.bias.abs().max() < 1e-4  # with the estimate reconstructed there is no drift left
    index = torch.arange(6)
    fp = session.sampler.sample_batch(ctx.fp_denoiser, index, 10_000)[0]
    replay = session.sampler.sample_batch(quant, index, 10_000, correctors=[stage])[0]
    raw = session.sampler.sample_batch(quant, index, 10_000)[0]
    assert (replay - fp).abs().max() < 1e-3 < (raw - fp).abs().max()


def test_ner_coefficient_is_solved_per_timestep(fp_ctx) -> None:
    """Timestep-aware (abstract of arXiv:2407.03917): each step gets its own K_t, so an error that
    changes with t is undone at every step; one K pooled over the trajectory would fail here."""
    _, ctx = fp_ctx
    stage = _stage(dataclasses.replace(ctx, denoiser=TimestepScaledDenoiser(ctx.fp_denoiser)), lambda_reg=0.0)
    expected = 1 / (1 + torch.tensor(stage.timesteps, dtype=torch.float32) / 1000)
    assert expected.max() - expected.min() > 0.1
    assert torch.allclose(stage.scale, expected[:, None].expand_as(stage.scale), rtol=1e-4)


def test_ibc_removes_the_mean_drift_of_the_inputs(fp_ctx) -> None:
    session, ctx = fp_ctx
    quant = AffineDenoiser(ctx.fp_denoiser, scale=[1.0, 1.0, 1.0], offset=[0.2, -0.1, 0.05])
    stage = _stage(dataclasses.replace(ctx, denoiser=quant))
    assert stage.bias[1:].abs().max() > 0.01 and stage.bias[0].abs().max() == 0
    index = torch.arange(6)
    fp, corrected, raw = TrajectoryRecorder(), TrajectoryRecorder(), TrajectoryRecorder()
    session.sampler.sample_batch(ctx.fp_denoiser, index, 10_000, correctors=[fp])
    session.sampler.sample_batch(quant, index, 10_000, correctors=[stage, corrected])
    session.sampler.sample_batch(quant, index, 10_000, correctors=[raw])
    for k in range(1, 4):  # inputs of steps 1.. : the per-channel mean drift is gone
        drift = (corrected.states[k] - fp.states[k]).mean(dim=(0, 2, 3))
        assert drift.abs().max() < 1e-5
        assert (raw.states[k] - fp.states[k]).mean(dim=(0, 2, 3)).abs().max() > 0.01
