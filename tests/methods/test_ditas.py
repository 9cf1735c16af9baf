"""DiTAS: exact smoothing, SmoothQuant factors from temporal maxima, alpha chosen by quantized error."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_recipe
from methods.ditas import search_alpha, smoothed_output_error, smoothing_factor
from methods.ptq4dit import DIT_LINEARS, BalancingGroup, balancing_groups, timestep_stats
from qsearch.engine import Session
from qsearch.quant import QuantLinear, QuantSpec, full_precision
from qsearch.recipe import parse_recipe

DITAS = {"method": "ditas", "grid": 5, "max_rows": 256}


def recipe(model_dir, *stages: dict):
    return parse_recipe(tiny_recipe(model_dir, stages=[{"method": "uniform", "n_samples": 8}, *stages,
                                                       {"method": "rtn"}]))


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_smoothing_leaves_fp_output_unchanged(tiny_model_dir, kind) -> None:
    session = Session(recipe(tiny_model_dir(kind)))
    ctx = session.quantize(recipe(tiny_model_dir(kind), DITAS))
    x, t, cond = next(ctx.calibration.batches(8))
    with torch.no_grad(), full_precision(ctx.layers()):
        out, ref = ctx.denoiser.forward(x, t, cond), session.fp.forward(x, t, cond)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item())


def test_factors_are_smoothquant_of_temporal_max(tiny_model_dir) -> None:
    """Each group's input ends divided by ``s = a^alpha / w^(1-alpha)``, ``a`` its max over all
    timesteps, ``w`` the weight's (``w * s`` after smoothing), ``alpha`` from the grid."""
    model_dir = tiny_model_dir("dit")
    session = Session(recipe(model_dir))
    plain, smoothed = session.quantize(recipe(model_dir)), session.quantize(recipe(model_dir, DITAS))
    alphas = smoothed.state["ditas_alpha"]
    groups = {g.representative: g for g in balancing_groups(smoothed, DIT_LINEARS, "test")}
    assert set(groups) == set(alphas) and len(groups) == 2 * 4 + 1
    before = timestep_stats(plain, {n: plain.layers()[n] for n in alphas}, "test")
    after = timestep_stats(smoothed, {n: smoothed.layers()[n] for n in alphas}, "test")
    for name, group in groups.items():
        assert alphas[name] in torch.linspace(0, 1, 5).tolist()
        a = before.absmax[name].amax(0)  # the temporal aggregate: max of the per-step maxima
        s = a / after.absmax[name].amax(0)
        w = group.weight_salience() / s
        assert torch.allclose(s, smoothing_factor(a, w, alphas[name]), rtol=1e-3), name


def _outlier_layer() -> tuple[QuantLinear, list[torch.Tensor]]:
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(16, 8), QuantSpec(w_bits=4, a_bits=8))
    steps = [torch.randn(64, 16) for _ in range(3)]
    for x in steps:
        x[:, 3] *= 60.0  # one outlier channel, at every timestep
    return layer, steps


def test_grid_search_picks_least_quantized_error_and_beats_no_smoothing() -> None:
    layer, steps = _outlier_layer()
    group = BalancingGroup(["fc"], {"fc": layer})
    act_max = torch.stack(steps).abs().amax((0, 1))
    alphas = torch.linspace(0, 1, 21)
    alpha, errors = search_alpha(group, steps, act_max, alphas)
    assert errors[alphas.tolist().index(alpha)] == min(errors)
    unsmoothed = smoothed_output_error(layer, steps, torch.ones(16))
    assert min(errors) < 0.5 * unsmoothed
    assert alpha > 0  # the outlier is migrated into the weight
