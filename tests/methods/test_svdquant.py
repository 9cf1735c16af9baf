"""SVDQuant: exact decomposition, unchanged FP output, lower W4A4 error than RTN on outliers."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import tiny_recipe
from methods.svdquant import (
    branch_rank, decompose, install, output_error, refine, search_decomposition, smoothing_candidates,
)
from qsearch.engine import Session
from qsearch.quant import QuantLinear, QuantSpec
from qsearch.recipe import parse_recipe

W4A4 = QuantSpec(w_bits=4, a_bits=4)


def _outlier_layer() -> tuple[nn.Linear, torch.Tensor]:
    """A linear layer whose inputs have a few huge channels and whose weight has a few huge entries."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight[:, 5] *= 20
        linear.weight[7, :] *= 10
    x = torch.randn(512, 64)
    x[:, [3, 30, 41]] *= 40
    return linear, x


def test_low_rank_plus_residual_is_the_smoothed_weight() -> None:
    torch.manual_seed(0)
    w, smoothing = torch.randn(48, 64), torch.rand(64) + 0.5
    d = decompose(w, smoothing, rank=8)
    assert d.up.shape == (48, 8) and d.down.shape == (8, 64)
    assert torch.linalg.matrix_rank(d.up @ d.down) == 8
    assert torch.allclose(d.up @ d.down + d.residual, w * smoothing, atol=1e-5)
    # the branch takes the top singular directions: the residual's spectrum is the tail
    assert torch.allclose(torch.linalg.svdvals(d.residual)[:40], torch.linalg.svdvals(w * smoothing)[8:], atol=1e-4)


def test_search_space_is_the_authors() -> None:
    grid = smoothing_candidates(None, 20)
    assert len(grid) == 39 and grid[0] == (0.0, 0.0)
    assert (0.5, 0.0) in grid and (0.25, 0.75) in grid
    assert smoothing_candidates(0.3, 20) == [(0.3, 0.7)]
    # rank 32 at the paper's 1152-wide PixArt-Sigma, scaled with the smaller dimension, in [1, min / 4]
    assert branch_rank(32, torch.empty(4608, 1152)) == 32 and branch_rank(32, torch.empty(1024, 256)) == 7
    assert branch_rank(32, torch.empty(32, 32)) == 1 and branch_rank(32, torch.empty(32, 32), None) == 8


def test_full_precision_output_unchanged_and_w4a4_error_below_rtn() -> None:
    linear, x = _outlier_layer()
    y = linear(x).detach()

    rtn = QuantLinear.from_float(nn.Linear(64, 48), W4A4)
    rtn.load_state_dict(linear.state_dict(), strict=False)
    rtn.weight_quantizer.init_minmax(rtn.weight)
    rtn.act_quantizer.set_range(x.min(), x.max())
    rtn_err = (rtn(x) - y).pow(2).mean()

    svd = QuantLinear.from_float(nn.Linear(64, 48), W4A4)
    svd.load_state_dict(linear.state_dict(), strict=False)
    install(svd, search_decomposition(x, svd.weight, svd.spec, rank=8, candidates=smoothing_candidates(None, 10)))
    svd.quant_enabled = False
    assert torch.allclose(svd(x), y, atol=1e-3 * y.abs().max())
    svd.quant_enabled = True
    svd.weight_quantizer.init_minmax(svd.weight)
    smoothed = svd.pre(x)
    svd.act_quantizer.set_range(smoothed.min(), smoothed.max())
    svd_err = (svd(x) - y).pow(2).mean()
    assert svd_err < 0.5 * rtn_err


def test_refinement_lowers_the_output_error_and_stays_exact() -> None:
    linear, x = _outlier_layer()
    w = linear.weight.detach()
    y = x @ w.T
    spec = QuantSpec(w_bits=3, a_bits=None)
    start = decompose(w, torch.ones(64), rank=4)
    refined, errors = refine(x, y, start, spec, iters=10)
    assert errors[0] == output_error(x, y, start, spec) and len(errors) > 1  # at least one step helped
    assert all(b < a for a, b in zip(errors, errors[1:])) and output_error(x, y, refined, spec) == errors[-1]
    assert torch.allclose(refined.up @ refined.down + refined.residual, w, atol=1e-4)  # still W_hat exactly
    assert refined.up.shape == start.up.shape
    unrefined = search_decomposition(x, w, spec, 4, [(0.0, 0.0)])
    assert torch.equal(unrefined.up, start.up)  # refine_iters=0 is the paper's single SVD
    chosen = search_decomposition(x, w, spec, 4, [(0.0, 0.0)], refine_iters=10)
    assert output_error(x, y, chosen, spec) == errors[-1]


def test_stage_on_a_tiny_dit_keeps_the_fp_output(tiny_model_dir) -> None:
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir("dit"),
        quant={"w_bits": 4, "a_bits": 4, "a_dynamic": True, "a_granularity": "token"},
        stages=[{"method": "uniform", "n_samples": 4},
                {"method": "svdquant", "grid": 2, "max_rows": 128, "rank": 8, "reference_width": None}, {"method": "rtn"}],
    ))
    ctx = Session(recipe).quantize(recipe)
    layers = ctx.layers()
    for name, layer in layers.items():
        decomposed = isinstance(layer, nn.Linear)
        assert (layer.branch is not None) == decomposed and (layer.pre is not None) == decomposed, name
    assert layers["transformer_blocks.0.ff.net.0.proj"].branch.down.shape == (8, 32)
    x, t, cond = next(ctx.calibration.batches(4))
    quantized = ctx.denoiser.forward(x, t, cond)
    for layer in layers.values():
        layer.quant_enabled = False
    assert torch.allclose(ctx.denoiser.forward(x, t, cond), ctx.fp_denoiser.forward(x, t, cond), atol=1e-4)
    assert torch.isfinite(quantized).all()
