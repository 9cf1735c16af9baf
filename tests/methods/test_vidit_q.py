"""ViDiT-Q: exact scaling + rotation, orthogonal randomized Hadamard, metric-decoupled sensitivity."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_recipe
from methods.ptq4dit import timestep_stats
from methods.vidit_q import (
    ScaledRotation, decoupled_sensitivity, layer_sensitivity, metric_sensitivity, smoothing_multiplier,
)
from qsearch.engine import Session
from qsearch.quant import full_precision
from qsearch.recipe import parse_recipe

TOKEN_DYNAMIC = {"w_bits": 4, "a_bits": 8, "a_dynamic": True, "a_granularity": "token"}


def recipe(model_dir, *stages: dict, **fields):
    return parse_recipe(tiny_recipe(model_dir, stages=[{"method": "uniform", "n_samples": 8}, *stages,
                                                       {"method": "rtn"}], **fields))


@pytest.mark.parametrize("channels", [1, 5, 8, 32, 96])
def test_rotation_is_orthogonal(channels) -> None:
    signs = torch.randint(0, 2, (channels,)) * 2.0 - 1
    r = ScaledRotation(torch.ones(channels), signs).rotation()
    eye = torch.eye(channels)
    assert torch.allclose(r @ r.T, eye, atol=1e-6) and torch.allclose(r.T @ r, eye, atol=1e-6)


def test_rotation_spreads_a_channel_outlier() -> None:
    x = 0.01 * torch.randn(16, 64)
    x[:, 7] = 100.0
    rotated = ScaledRotation(torch.ones(64), torch.ones(64))(x)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert rotated.abs().amax() < 100.0 / 64**0.5 + 1.0  # the outlier's energy is spread evenly


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_balancing_leaves_fp_output_unchanged(tiny_model_dir, kind) -> None:
    session = Session(recipe(tiny_model_dir(kind), quant=TOKEN_DYNAMIC))
    ctx = session.quantize(recipe(tiny_model_dir(kind), {"method": "vidit_q"}, quant=TOKEN_DYNAMIC))
    rotated = [l for l in ctx.layers().values() if isinstance(l.pre, ScaledRotation)]
    assert len(rotated) >= 8
    x, t, cond = next(ctx.calibration.batches(8))
    with torch.no_grad(), full_precision(ctx.layers()):
        out, ref = ctx.denoiser.forward(x, t, cond), session.fp.forward(x, t, cond)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item())


def test_static_part_is_smoothquant_scaling(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("dit")
    session = Session(recipe(model_dir, quant=TOKEN_DYNAMIC))
    plain = session.quantize(recipe(model_dir, quant=TOKEN_DYNAMIC))
    balanced = session.quantize(recipe(model_dir, {"method": "vidit_q", "alpha": 0.3}, quant=TOKEN_DYNAMIC))
    names = [n for n, l in balanced.layers().items() if isinstance(l.pre, ScaledRotation)]
    stats = timestep_stats(plain, {n: plain.layers()[n] for n in names}, "test")
    for name in names:
        fp_weight = plain.layers()[name].weight
        expected = smoothing_multiplier(stats.absmax[name].amax(0), fp_weight.abs().amax(0), 0.3)
        assert torch.allclose(balanced.layers()[name].pre.scale.float(), expected, rtol=1e-5), name


def test_decoupled_sensitivity_keeps_each_metrics_top_layer() -> None:
    per_metric = {"quality": {"a": 10.0, "b": 1.0, "c": 0.5}, "alignment": {"a": 0.01, "b": 0.02, "c": 0.01}}
    score = decoupled_sensitivity(per_metric)
    assert score == {"a": 1.0, "b": 1.0, "c": 0.5}  # b: barely visible in quality, top in alignment


def test_layer_sensitivity_measures_quantization_damage(tiny_model_dir) -> None:
    base = recipe(tiny_model_dir("dit"), quant={"w_bits": 8, "a_bits": 8, "a_dynamic": True,
                                                 "a_granularity": "token"})
    session = Session(base)
    low = metric_sensitivity(session, base, low_bits=2, n_samples=2)
    high = metric_sensitivity(session, base, low_bits=8, n_samples=2)
    assert set(low) == {"quality", "alignment"}  # class-conditional: the alignment metric applies
    weighted = {n for n, l in session.quantize(base).layers().items() if l.weight_quantizer is not None}
    assert set(low["quality"]) == set(low["alignment"]) == weighted
    for metric in low:
        assert sum(low[metric].values()) > sum(high[metric].values())
    scores = layer_sensitivity(session, base, low_bits=2, n_samples=2)
    assert set(scores) == weighted and max(scores.values()) == 1.0 and min(scores.values()) >= 0.0
