"""Round-to-nearest with min-max ranges: the baseline quantizer of every survey table.

Weights: each group's (tensor's, channel's, group's) min/max sets its grid. Static activations: the
min/max of each layer's input over the calibration set. Dynamic activations need no calibration.
"""

from __future__ import annotations

import torch

from qsearch.calibration import LayerStats, input_hooks, run_calibration
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer, StageConfig


def init_weights_minmax(ctx: QuantContext) -> None:
    """Min-max grids for every quantized weight."""
    for layer in ctx.layers().values():
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.init_minmax(layer.weight)


def static_act_quantizers(ctx: QuantContext) -> dict[str, torch.nn.Module]:
    """Activation quantizers that need calibrated ranges, by layer name."""
    return {
        name: layer.act_quantizer
        for name, layer in ctx.layers().items()
        if layer.act_quantizer is not None and not layer.act_quantizer.dynamic
    }


@torch.no_grad()
def calibrate_minmax(ctx: QuantContext, stage: str) -> None:
    """Static activation ranges from the min/max each quantizer sees on the calibration set.

    The hooks sit on the activation quantizers themselves, so they see inputs after any
    reparameterization (smoothing, rotation) and after the layers before them were quantized.
    """
    quantizers = static_act_quantizers(ctx)
    if not quantizers:
        return
    calib = ctx.require_calibration(stage)
    stats = LayerStats()
    with input_hooks(quantizers, stats.update):
        run_calibration(ctx.denoiser, calib, ctx.batch_size)
    for name, aq in quantizers.items():
        aq.set_range(stats.lo[name], stats.hi[name])


@register("rtn")
class RoundToNearest(Quantizer):
    """Round-to-nearest, min-max ranges for weights and calibrated activations."""

    paper = "baseline; e.g. Jacob et al., CVPR 2018 (integer-arithmetic-only inference)"

    class Config(StageConfig):
        pass

    def apply(self, ctx: QuantContext) -> None:
        init_weights_minmax(ctx)
        calibrate_minmax(ctx, self.name)
