"""PTQ4DiT: exact re-parameterization, balanced salience, Spearman-weighted timesteps."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from tests.conftest import tiny_recipe
from methods.ptq4dit import (
    DIT_LINEARS, ChannelScale, balancing_groups, calibrated_salience, spearman,
    ssc_weights, timestep_stats,
)
from qsearch.engine import Session
from qsearch.quant import full_precision
from qsearch.recipe import parse_recipe


def quantize(model_dir, *stages: dict):
    recipe = parse_recipe(tiny_recipe(model_dir, stages=[{"method": "uniform", "n_samples": 8}, *stages,
                                                         {"method": "rtn"}]))
    session = Session(recipe)
    return session, session.quantize(recipe)


def assert_fp_output_unchanged(session: Session, ctx) -> None:
    x, t, cond = next(ctx.calibration.batches(8))
    with torch.no_grad(), full_precision(ctx.layers()):
        out, ref = ctx.denoiser.forward(x, t, cond), session.fp.forward(x, t, cond)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_reparameterization_leaves_fp_output_unchanged(tiny_model_dir, kind) -> None:
    session, ctx = quantize(tiny_model_dir(kind), {"method": "ptq4dit"})
    assert_fp_output_unchanged(session, ctx)
    fp = dict(session.fp.model.named_parameters())
    changed = [n for n, p in ctx.model.named_parameters() if not torch.equal(p, fp[n])]
    assert any(n.endswith("to_q.weight") for n in changed)  # the balancing did something


def test_dit_folds_balancing_into_adaln_and_value(tiny_model_dir) -> None:
    session, ctx = quantize(tiny_model_dir("dit"), {"method": "ptq4dit"})
    layers = ctx.layers()
    for name, layer in layers.items():
        if name.endswith("ff.net.2"):  # after the GELU: nothing can absorb it
            assert isinstance(layer.pre, ChannelScale)
        else:
            assert layer.pre is None, name
    fp = dict(session.fp.model.named_parameters())
    adaln = ctx.model.transformer_blocks[0].norm1.linear.weight
    d = adaln.shape[1]
    fp_adaln = fp["transformer_blocks.0.norm1.linear.weight"]
    for chunk in (0, 1, 3, 4):  # shift/scale of attention and MLP
        assert not torch.allclose(adaln[chunk * d:(chunk + 1) * d], fp_adaln[chunk * d:(chunk + 1) * d])
    for chunk in (2, 5):  # the gates stay
        assert torch.equal(adaln[chunk * d:(chunk + 1) * d], fp_adaln[chunk * d:(chunk + 1) * d])


def test_csb_balances_activation_and_weight_salience(tiny_model_dir) -> None:
    """Without SSC, every balanced input channel ends with max|x_j| == max|W_j| (their geometric mean)."""
    session, ctx = quantize(tiny_model_dir("dit"), {"method": "ptq4dit", "ssc": False})
    groups = balancing_groups(ctx, DIT_LINEARS, "test")
    stats = timestep_stats(ctx, {g.representative: g.layers[g.representative] for g in groups}, "test")
    assert len(groups) == 2 * 4 + 1  # per block: QKV, out, FC1, FC2; and the final projection
    for group in groups:
        act = stats.absmax[group.representative].amax(0)
        assert torch.allclose(act, group.weight_salience(), rtol=1e-4), group.names


def test_spearman_matches_scipy_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).double()
    b = torch.randn(40, generator=g, dtype=torch.float64) + a
    assert math.isclose(spearman(a, b).item(), spearmanr(a, b).statistic, rel_tol=1e-9)


def test_ssc_weights_complementary_timesteps_more() -> None:
    weight = torch.arange(1.0, 9.0)
    alike, complementary = weight.clone(), weight.flip(0)  # rho = +1 and rho = -1
    act = torch.stack([alike, complementary])
    eta = ssc_weights(act, weight)
    assert torch.allclose(eta, torch.softmax(torch.tensor([-1.0, 1.0]), 0))
    assert torch.allclose(calibrated_salience(act, weight), eta[0] * alike + eta[1] * complementary)


def test_ssc_balances_the_spearman_weighted_salience(tiny_model_dir) -> None:
    """With SSC, each layer's weight salience ends at ``sqrt(s_rho(X_j) s(W_j))``, where ``s_rho`` is
    the eta-weighted sum over timesteps of the FP model's activation salience (not its maximum).

    Checked on the groups whose weights no other group's fold touches (all but QKV, whose ``to_v``
    also absorbs the output projection's vector)."""
    model_dir = tiny_model_dir("dit")
    session, balanced = quantize(model_dir, {"method": "ptq4dit"})
    plain = session.quantize(parse_recipe(tiny_recipe(model_dir, stages=[
        {"method": "uniform", "n_samples": 8}, {"method": "rtn"}])))
    groups = [g for g in balancing_groups(plain, DIT_LINEARS, "test") if not g.representative.endswith("to_q")]
    assert len(groups) == 2 * 3 + 1
    stats = timestep_stats(plain, {g.representative: g.layers[g.representative] for g in groups}, "test")
    assert len(stats.timesteps) > 1
    after = balanced.layers()
    differs = False
    for group in groups:
        sw = group.weight_salience()
        per_step = stats.absmax[group.representative]
        s_rho = calibrated_salience(per_step, sw)
        differs |= not torch.allclose(s_rho, per_step.amax(0), rtol=1e-2)
        balanced_sw = torch.stack([after[n].weight.abs().amax(0) for n in group.names]).amax(0)
        assert torch.allclose(balanced_sw, (s_rho * sw).sqrt(), rtol=1e-4), group.names
    assert differs  # the test tells SSC from the plain maximum
