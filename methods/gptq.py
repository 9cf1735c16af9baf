"""GPTQ: weight rounding that compensates each column's error with the inputs' second moments.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv 2210.17323); authors' code:
https://github.com/IST-DASLab/gptq (``gptq.py``, ``GPTQ.fasterquant``). Q-DiT's final weights use it
(``quant_main.sh`` of https://github.com/Juanerx/Q-DiT).

Round-to-nearest minimises each weight's own error; what matters is the layer's output error
``||X W^T - X Q^T||^2``, whose Hessian in the weights is ``H = 2 X^T X``. GPTQ quantizes the columns
(input features) one at a time and spreads each column's rounding error over the columns not yet
quantized, in proportion to the inverse Hessian (Optimal Brain Quantization): with
``Hinv = chol(H^-1)`` (upper), column ``i`` quantized to ``q`` moves the later columns by
``-(w_i - q) / Hinv[i,i] * Hinv[i, i:]``. The paper's defaults: dampening 1% of the mean of
``diag(H)``, updates applied lazily in blocks of 128 columns, columns of a zero input (``H[i,i] = 0``)
set to zero; ``act_order`` (the authors' ``--act-order``) quantizes the columns of largest
``H[i,i]`` first. When ``H`` is diagonal (uncorrelated inputs) no error can be compensated and GPTQ
is round-to-nearest on the same grid.

The grid is fixed before the column pass: min-max per group, or shrunk by the ``mse_clip`` search
(the default; the authors' ``static_groups`` with their MSE grid option), so the rounded weights
lie exactly on the layer's grid and export bit-exactly; activations are then calibrated as in
``mse_clip``, with the GPTQ weights in place. The stage sets every weight grid itself, so a grid an
earlier stage chose is replaced: after ``q_dit`` (``weights: false``) the min-max group grids are
the ones Q-DiT uses, which is how Q-DiT's final recipe composes (its groups, then GPTQ). For convolutions ``X`` are the unfolded input patches,
one column per (input channel, kernel position), in the order of ``weight.flatten(1)``.

What differs from the authors' code: the Hessians come from one calibration pass of the
full-precision model for all layers at once (the authors run the model block by block, each block's
inputs computed by the already-quantized blocks before it); memory is one ``in_features^2`` float
matrix per quantized layer for the pass. Grouped convolutions, binary and FP-format weights are left
at round-to-nearest on their grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn

from methods.clipping import MSEClipping
from qsearch.calibration import input_hooks, run_calibration
from qsearch.quant import grid
from qsearch.quant.modules import QuantConv2d, full_precision
from qsearch.quant.quantizers import WeightQuantizer
from qsearch.registry import register
from qsearch.stages import QuantContext


def eligible(layer: nn.Module) -> bool:
    """Layers whose weight GPTQ can round: integer grids of 2 bits or more, ungrouped convolutions."""
    wq = layer.weight_quantizer
    if wq is None or wq.format != "int" or wq.bits < 2:
        return False
    return not (isinstance(layer, QuantConv2d) and layer.groups != 1)


def input_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of ``weight.flatten(1)``'s columns (patches for a convolution)."""
    if layer.pre is not None:
        x = layer.pre(x)
    if isinstance(layer, QuantConv2d):
        if layer.padding_mode != "zeros":
            raise ValueError("gptq: only zero-padded convolutions are supported")
        patches = nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


class HessianAccumulator:
    """Running ``H = 2/N sum x x^T`` of each layer's input columns (the paper's ``add_batch``)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    @torch.no_grad()
    def add(self, name: str, x: torch.Tensor) -> None:
        cols = input_columns(self.layers[name], x.detach()).float()
        n, seen = cols.shape[0], self.counts.get(name, 0)
        if name not in self.hessians:
            self.hessians[name] = torch.zeros(cols.shape[1], cols.shape[1], device=cols.device)
        h = self.hessians[name]
        h.mul_(seen / (seen + n))
        cols = cols * (2.0 / (seen + n)) ** 0.5
        h.addmm_(cols.T, cols)
        self.counts[name] = seen + n


ColumnRounder = Callable[[torch.Tensor, int], torch.Tensor]
"""``round(w, j)``: column ``j`` of a weight rounded on its grid."""


def column_rounder(wq: WeightQuantizer, rows: int) -> ColumnRounder:
    """``round(w, j)``: column ``j`` of the flattened weight rounded on the quantizer's own grid."""
    scale = wq.scale.expand(rows, -1, -1)[..., 0]  # (rows, groups)
    zero_point = wq.zero_point.expand(rows, -1, -1)[..., 0]
    per_group = wq.granularity == "group"
    top = grid.code_max(wq.bits)

    def round_column(w: torch.Tensor, j: int) -> torch.Tensor:
        g = j // wq.group_size if per_group else 0
        s, z = scale[:, g], zero_point[:, g]
        return (torch.clamp(torch.round(w / s) + z, 0, top) - z) * s

    return round_column


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, round_column: ColumnRounder, *, damp: float = 0.01,
    block_size: int = 128, act_order: bool = False,
) -> torch.Tensor:
    """GPTQ's column pass over ``weight`` (rows x cols); returns the rounded weight, same layout."""
    w = weight.detach().float().clone()
    h = hessian.clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block, errors, hb = w[:, start:stop].clone(), torch.zeros_like(w[:, start:stop]), hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, i]
            rounded = round_column(column, int(order[start + i]))
            q[:, start + i] = rounded
            err = (column - rounded) / hb[i, i]
            block[:, i:] -= err.unsqueeze(1) @ hb[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return q[:, torch.argsort(order)]


@register("gptq")
class GPTQ(MSEClipping):
    """GPTQ: columns rounded in turn, each one's error compensated by the not-yet-rounded columns."""

    paper = "Frantar et al., GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers (ICLR 2023)"

    class Config(MSEClipping.Config):
        damp: float = Field(0.01, gt=0, description="dampening, a fraction of mean diag(H) (paper: 0.01)")
        block_size: int = Field(128, ge=1, description="columns per lazy batch update (paper: 128)")
        act_order: bool = Field(False, description="round columns in decreasing diag(H) order")

    def apply(self, ctx: QuantContext) -> None:
        self.set_weight_grids(ctx)
        layers = {n: m for n, m in ctx.layers().items() if eligible(m)}
        hessians = self.collect_hessians(ctx, layers)
        cfg = self.config
        for name, layer in layers.items():
            if name not in hessians:  # a layer the calibration pass never reached keeps RTN
                continue
            flat = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            rounder = column_rounder(layer.weight_quantizer, flat.shape[0])
            q = gptq_round(flat, hessians.pop(name), rounder, damp=cfg.damp,
                           block_size=cfg.block_size, act_order=cfg.act_order)
            with torch.no_grad():
                layer.weight.copy_(q.reshape(layer.weight.shape).to(layer.weight.dtype))
        self.calibrate_activations(ctx)

    def collect_hessians(self, ctx: QuantContext, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """One pass of the full-precision model (quantization off) over the calibration set."""
        acc = HessianAccumulator(layers)
        with full_precision(ctx.layers()), input_hooks(layers, acc.add):
            run_calibration(ctx.denoiser, ctx.require_calibration(self.name), ctx.batch_size)
        return acc.hessians
