"""SVDQuant: smooth activation outliers into the weights, then absorb them in a 16-bit low-rank branch.

Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models", ICLR 2025
(arXiv 2411.05007); authors' code: https://github.com/mit-han-lab/deepcompressor (calibration,
``deepcompressor/calib/smooth.py``, ``calib/lowrank.py``, ``examples/diffusion/configs/svdquant``) and
https://github.com/mit-han-lab/nunchaku (inference).

At 4 bits both operands of ``X W^T`` have outliers. SVDQuant moves them where they cost nothing:

1. **Smoothing** migrates activation outliers into the weight: ``X_hat = X diag(lambda)^-1`` and
   ``W_hat = W diag(lambda)``, with ``lambda_j = max|X_j|^alpha / max|W_j|^beta`` per input channel
   (SmoothQuant's migration; ``beta = 1 - alpha`` there).
2. **Low-rank branch**: the smoothed weight now has the outliers; its top singular directions hold them.
   ``W_hat = L1 L2 + R`` with ``L1 L2`` the rank-``r`` truncated SVD (``L1 = U S``, ``L2 = V^T``), kept
   in 16 bits and applied to the *unquantized* smoothed input; only the residual ``R`` (small, flat
   spectrum) and ``X_hat`` are quantized: ``X W^T ~ Q(X_hat) Q(R)^T + X_hat L2^T L1^T``.

Here the smoothing is the layer's ``pre`` (``x / lambda``), the branch is ``layer.branch`` and ``R`` is
written into ``layer.weight``; all exact in full precision. The quantize stage that follows (``rtn``,
``mse_clip``) sets the grids of ``R`` and of the smoothed input.

``alpha``: the paper follows SmoothQuant's migration strength; the authors' released configuration
(``svdquant/__default__.yaml``: ``alpha: 0.5, beta: -2, num_grids: 20, allow_low_rank: true``,
objective ``OutputsError``) grid-searches it per layer over ``{(0, 0)} + {(a, 0)} + {(a, 1 - a)}`` for
``a = 1/20 .. 19/20``, scoring each candidate by the layer's output error *with the low-rank branch and
both quantizers in the loop*. That search is the default here (``alpha: null``); a number fixes
``(alpha, 1 - alpha)`` instead.

Rank: 32 in the paper on every model, whose narrowest diffusion transformer is PixArt-Sigma (hidden size
1152). A 256-wide layer at rank 32 would carry a branch that costs as many stored bits as its 4-bit
weight, which is no longer the paper's trade-off; so ``rank`` is the rank at ``reference_width`` (1152)
and scales with the layer's smaller dimension, keeping the branch's share of the layer's storage roughly
as in the paper (rank 7 for the 256-wide zoo DiT); ``reference_width: null`` uses ``rank`` unscaled. The rank
is always at least 1 and at most a quarter of the smaller weight dimension.

Refinement: the paper takes one SVD; the authors' code refines the branch iteratively
(``L <- SVD_r(W_hat - Q(W_hat - L))``, up to 100 iterations, early stop on the output error), here
``refine_iters`` (default 0, the paper) applied to the searched smoothing only; the authors refine
inside their search, for every candidate.

Only Linear layers are decomposed (as in the authors' diffusion configs, which skip embeddings and
convolutions). The paper's activation quantizer works per token and group of 64 channels: the
quant spec's ``a_granularity: group, a_group_size: 64`` (the first benchmark rows used per-token
scales, ``*_g64`` recipes the paper's groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qsearch.calibration import capture_inputs
from qsearch.quant.modules import QuantLinear
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.registry import register
from qsearch.stages import QuantContext, Reparameterizer, StageConfig

SPAN_FLOOR = 1e-5  # channel ranges below this (dead channels) would make lambda 0 or inf
REFERENCE_WIDTH = 1152  # hidden size of PixArt-Sigma, the narrowest DiT the paper runs at rank 32


class ChannelSmoothing(nn.Module):
    """``x / lambda`` over the last (channel) axis; the weight holds ``W diag(lambda)``."""

    def __init__(self, smoothing: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("smoothing", smoothing.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.smoothing.to(x.dtype)


class LowRankBranch(nn.Module):
    """``x L2^T L1^T``: the full-precision rank-r part of the smoothed weight (no bias).

    Plain parameters, not ``nn.Linear`` children, so that the branch is never mistaken for a
    quantizable layer; bits accounting counts it as fp16 extra storage.
    """

    def __init__(self, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.up = nn.Parameter(up.clone())  # L1 = U_r S_r, (out, r)
        self.down = nn.Parameter(down.clone())  # L2 = V_r^T, (r, in)

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


@dataclass
class Decomposition:
    """One candidate: smoothing factors, low-rank factors and residual of a layer's weight."""

    smoothing: torch.Tensor  # (in,)
    up: torch.Tensor  # (out, r)
    down: torch.Tensor  # (r, in)
    residual: torch.Tensor  # (out, in)


def smoothing_candidates(alpha: float | None, grid: int) -> list[tuple[float, float]]:
    """``(alpha, beta)`` exponents to try: the authors' search space, or one fixed migration strength."""
    if alpha is not None:
        return [(alpha, 1.0 - alpha)]
    steps = [i / grid for i in range(1, grid)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in steps] + [(a, 1.0 - a) for a in steps]


def branch_rank(rank: int, weight: torch.Tensor, reference_width: int | None = REFERENCE_WIDTH) -> int:
    """``rank`` scaled from ``reference_width`` to the layer's smaller dimension, in [1, min(shape) / 4]."""
    width = min(weight.shape)
    scaled = rank if reference_width is None else round(rank * width / reference_width)
    return max(1, min(scaled, width // 4))


@torch.no_grad()
def decompose(weight: torch.Tensor, smoothing: torch.Tensor, rank: int) -> Decomposition:
    """``W diag(lambda) = L1 L2 + R`` with ``L1 L2`` its rank-``rank`` truncated SVD."""
    smoothed = weight * smoothing
    u, s, vh = torch.linalg.svd(smoothed, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    return Decomposition(smoothing, up, down, smoothed - up @ down)


@torch.no_grad()
def quantized_residual(residual: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(R)`` on the min-max grid the quantize stage will give it."""
    if spec.w_bits is None:
        return residual
    wq = WeightQuantizer(spec, residual.shape).to(residual.device)
    wq.init_minmax(residual)
    return wq(residual)


@torch.no_grad()
def output_error(x: torch.Tensor, y: torch.Tensor, d: Decomposition, spec: QuantSpec) -> float:
    """Mean squared error of the quantized layer's output (two quantizers and the branch) against ``y``."""
    x_hat = x / d.smoothing
    r_q = quantized_residual(d.residual, spec)
    x_q = x_hat
    if spec.a_bits is not None:
        aq = ActQuantizer(spec).to(x.device)
        if not aq.dynamic:
            aq.set_range(x_hat.amin(), x_hat.amax())
        x_q = aq(x_hat)
    y_hat = x_q @ r_q.T + (x_hat @ d.down.T) @ d.up.T
    return (y_hat - y).pow(2).mean().item()


@torch.no_grad()
def refine(
    x: torch.Tensor, y: torch.Tensor, d: Decomposition, spec: QuantSpec, iters: int
) -> tuple[Decomposition, list[float]]:
    """The authors' refinement: ``L <- SVD_r(W_hat - Q(W_hat - L))`` re-fits the branch to what the
    quantized residual misses, kept while the output error falls (their early stop). Returns the
    best decomposition and the error of each accepted step (the first is the unrefined one's)."""
    smoothed = d.up @ d.down + d.residual
    rank = d.up.shape[1]
    errors = [output_error(x, y, d, spec)]
    for _ in range(iters):
        u, s, vh = torch.linalg.svd(smoothed - quantized_residual(d.residual, spec), full_matrices=False)
        up, down = u[:, :rank] * s[:rank], vh[:rank]
        candidate = Decomposition(d.smoothing, up, down, smoothed - up @ down)
        err = output_error(x, y, candidate, spec)
        if err >= errors[-1]:
            break
        d = candidate
        errors.append(err)
    return d, errors


@torch.no_grad()
def search_decomposition(
    x: torch.Tensor, weight: torch.Tensor, spec: QuantSpec, rank: int, candidates: list[tuple[float, float]],
    refine_iters: int = 0,
) -> Decomposition:
    """The smoothing (with its low-rank split) of least output error on the calibration rows ``x``,
    its branch then refined by up to ``refine_iters`` steps."""
    weight = weight.float()
    y = x @ weight.T
    x_span = x.abs().amax(0).clamp(min=SPAN_FLOOR)
    w_span = weight.abs().amax(0).clamp(min=SPAN_FLOOR)
    best: tuple[float, Decomposition] | None = None
    for alpha, beta in candidates:
        d = decompose(weight, x_span.pow(alpha) / w_span.pow(beta), rank)
        err = output_error(x, y, d, spec)
        if best is None or err < best[0]:
            best = (err, d)
    return refine(x, y, best[1], spec, refine_iters)[0] if refine_iters else best[1]


@torch.no_grad()
def install(layer: QuantLinear, d: Decomposition) -> None:
    """Make the layer compute ``(x / lambda) R^T + branch(x / lambda)``, which equals ``x W^T``."""
    layer.weight.copy_(d.residual.to(layer.weight.dtype))
    layer.pre = ChannelSmoothing(d.smoothing.to(layer.weight.dtype))
    layer.branch = LowRankBranch(d.up.to(layer.weight.dtype), d.down.to(layer.weight.dtype))


@register("svdquant")
class SVDQuant(Reparameterizer):
    """SVDQuant: smoothing plus a 16-bit low-rank branch that absorbs the outliers before 4-bit rounding."""

    paper = "Li et al., SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models, ICLR 2025"

    class Config(StageConfig):
        rank: int = Field(32, ge=1, description="rank of the 16-bit branch on a reference_width-wide layer")
        reference_width: int | None = Field(
            REFERENCE_WIDTH, ge=1,
            description="layer width at which `rank` applies, scaled with min(out, in); null: unscaled",
        )
        alpha: float | None = Field(
            None, ge=0, le=1,
            description="fixed migration strength (beta = 1 - alpha); null: the authors' per-layer search",
        )
        grid: int = Field(20, ge=2, description="search grid: alpha in 1/grid .. (grid-1)/grid")
        max_rows: int = Field(4096, ge=16, description="calibration rows per layer for the search")
        refine_iters: int = Field(
            0, ge=0, description="branch refinement steps on the chosen smoothing (paper: 0; authors' code: up to 100)"
        )

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        layers = {n: l for n, l in ctx.layers().items()
                  if isinstance(l, QuantLinear) and l.weight_quantizer is not None}
        for name, layer in layers.items():
            if layer.pre is not None or layer.branch is not None:
                raise ValueError(f"svdquant: layer {name!r} is already reparameterized")
        calib = ctx.require_calibration(self.name)
        # The FP model's inputs: the layers being reparameterized have no grids yet.
        fp_layers = {n: ctx.fp_denoiser.model.get_submodule(n) for n in layers}
        inputs = capture_inputs(ctx.fp_denoiser, fp_layers, calib, max_rows=cfg.max_rows,
                                batch_size=ctx.batch_size, seed=ctx.seed)
        candidates = smoothing_candidates(cfg.alpha, cfg.grid)
        for name, layer in layers.items():
            if name not in inputs:
                continue
            x = inputs[name].to(ctx.device)
            rank = branch_rank(cfg.rank, layer.weight, cfg.reference_width)
            install(layer, search_decomposition(x, layer.weight, layer.spec, rank, candidates, cfg.refine_iters))
