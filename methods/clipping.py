"""Clipping-range search: min-max ranges shrunk to minimise quantization error (MSE or percentile).

Min-max ranges waste grid points on rare outliers; at 4 bits that dominates the error. The common
remedy of the PTQ literature (e.g. the MSE-based range setting of Banner et al. / Nagel et al.'s
white paper, used as the initial range by Q-Diffusion, PTQ4DM and BRECQ) searches, per weight group
and per activation tensor, the clipping ratio that minimises the L_p error of the quantized tensor.
Activations may instead be clipped at a percentile of the calibration inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from qsearch.calibration import capture_inputs
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer, StageConfig

from methods.rtn import init_weights_minmax, static_act_quantizers


@torch.no_grad()
def search_weight_clipping(layer, ratios: torch.Tensor, p: float) -> None:
    """Per group, the clip ratio of the min-max range with the least L_p weight error."""
    wq = layer.weight_quantizer
    g, _ = wq.grouped(layer.weight.detach())
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for r in ratios:
        wq.set_range(lo * r, hi * r)
        deq, _ = wq.grouped(wq(layer.weight.detach()))
        err = (deq - g).abs().pow(p).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo * r, best_lo), torch.where(better, hi * r, best_hi)
    wq.set_range(best_lo, best_hi)


@torch.no_grad()
def search_act_clipping(aq, rows: torch.Tensor, ratios: torch.Tensor, p: float) -> None:
    """The per-tensor clip ratio of the activation range with the least L_p error on ``rows``."""
    lo, hi = rows.amin(), rows.amax()
    best = (float("inf"), lo, hi)
    for r in ratios:
        aq.set_range(lo * r, hi * r)
        err = (aq(rows) - rows).abs().pow(p).mean().item()
        if err < best[0]:
            best = (err, lo * r, hi * r)
    aq.set_range(best[1], best[2])


@register("mse_clip")
class MSEClipping(Quantizer):
    """Round-to-nearest with clipping ranges searched to minimise L_p error (or percentiles)."""

    paper = "Banner et al., ACIQ (NeurIPS 2019); Nagel et al., A White Paper on Neural Network Quantization (2021)"

    class Config(StageConfig):
        weights: bool = Field(True, description="search weight clipping per group")
        activations: Literal["mse", "percentile", "minmax"] = "mse"
        p: float = Field(2.4, gt=0, description="L_p norm of the error (2.4 as in Nagel et al.)")
        grid: int = Field(40, ge=2, description="clip ratios tried, evenly in [min_ratio, 1]")
        min_ratio: float = Field(0.3, gt=0, le=1)
        percentile: float = Field(99.99, gt=50, le=100)
        max_rows: int = Field(4096, ge=16, description="calibration rows kept per layer")

    def apply(self, ctx: QuantContext) -> None:
        self.set_weight_grids(ctx)
        self.calibrate_activations(ctx)

    def set_weight_grids(self, ctx: QuantContext) -> None:
        """Min-max weight grids, each group's range then shrunk by the clipping search."""
        init_weights_minmax(ctx)
        if self.config.weights:
            ratios = torch.linspace(self.config.min_ratio, 1.0, self.config.grid)
            for layer in ctx.layers().values():
                if layer.weight_quantizer is not None and layer.weight_quantizer.bits > 1:
                    search_weight_clipping(layer, ratios.to(layer.weight.device), self.config.p)

    def calibrate_activations(self, ctx: QuantContext) -> None:
        """Static activation ranges from calibration inputs seen through the quantized weights."""
        cfg = self.config
        quantizers = static_act_quantizers(ctx)
        if not quantizers:
            return
        ratios = torch.linspace(cfg.min_ratio, 1.0, cfg.grid)
        calib = ctx.require_calibration(self.name)
        inputs = capture_inputs(ctx.denoiser, quantizers, calib, max_rows=cfg.max_rows,
                                batch_size=ctx.batch_size, seed=ctx.seed)
        for name, aq in quantizers.items():
            rows = inputs[name].to(ctx.device)
            if cfg.activations == "mse":
                search_act_clipping(aq, rows, ratios.to(ctx.device), cfg.p)
            elif cfg.activations == "percentile":
                flat = rows.flatten()
                k = max(1, int(flat.numel() * (1 - cfg.percentile / 100)))
                aq.set_range(flat.kthvalue(k).values, flat.kthvalue(flat.numel() - k + 1).values)
            else:
                aq.set_range(rows.amin(), rows.amax())
