"""HQ-DiT: FP4 (FP6/FP8) weights and activations with a Hadamard transform and a per-layer format.

Liu & Zhang, "HQ-DiT: Efficient Diffusion Transformer with FP4 Hybrid Quantization", arXiv 2405.19751
(2024). The authors released no code (none is linked from the paper or indexed publicly); this module
is written from the paper.

Why each part:

* **Hadamard transform** (the paper's "universal identity mathematical transform"): the activations of
  DiT linears carry a few outlier channels that set the whole tensor's FP scale. Multiplying the input
  by an orthogonal Hadamard matrix ``H`` spreads every outlier over all channels; the inverse is folded
  into the weight (``W <- W H``, exact because ``H H^T = I``), so ``x W^T = (x H)(W H)^T`` and the
  full-precision output is unchanged. ``H`` is the normalized Sylvester matrix of the largest power of
  two dividing the channel count, used block-diagonally when the count is not a power of two (a layer
  whose count is odd, e.g. a 3-channel patch embedding, is left unrotated). Only layers whose
  activations are quantized are rotated: the transform exists for the activation outliers.
* **Hybrid FP format**: "hybrid" means each layer gets its own sign/exponent/mantissa split. Data with
  heavy tails needs exponent bits (range); flat data needs mantissa bits (resolution). For every layer,
  the weights and the input activations each try all splits of their width (FP4: E1M2, E2M1, E3M0;
  FP8: E1M6..E5M2) and keep the one with the least quantization MSE on the data (the weight itself;
  calibration inputs after the rotation).
* **Clipping range selection**: for each candidate format, the maximum of the FP grid (its scale) is
  searched as a fraction of the data's absolute maximum, per weight group and per activation tensor,
  minimizing the same MSE; format and clipping are chosen jointly.

What is partial: the stored copies of the paper available while writing this held its abstract and
summaries only, not Section 4. So the selection *criterion* above (least MSE over formats and clipping
ratios, the joint search of LLM-FP4, Liu et al., EMNLP 2023, which HQ-DiT builds on) is this module's
reading of "chooses the FP format and clipping range from the data distribution", not a transcription
of the paper's equation. HQ-DiT also rounds weights with GPTQ adapted to FP grids; that is not part of
this stage (weights are rounded to nearest on the chosen grid). Integer-format layers in a recipe get
the rotation and min-max ranges only.

It is one ``Quantizer`` stage rather than a reparameterizer plus a quantizer because the rotation, the
format choice and the ranges are one calibration: the activation format is chosen on rotated inputs, so
the rotation must precede it inside the same stage. The chosen exponent bits are written back to the
layer's spec (``ctx.specs``), so bits accounting and export see the format actually used.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from methods.clipping import search_act_clipping, search_weight_clipping
from qsearch.calibration import capture_inputs
from qsearch.quant.hadamard import rotate_channels, rotation_block
from qsearch.quant.modules import QuantModule
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer, StageConfig

MAX_EXPONENT_BITS = 5  # QuantSpec's bound (E5M2 is the widest-range 8-bit format)


class HadamardRotation(nn.Module):
    """Multiplies the channel axis by ``blockdiag(H, ..., H)``: the last axis of linear inputs, axis 1 of
    conv inputs. Only the block size is kept: the matrix follows from it (``qsearch.quant.hadamard``)."""

    def __init__(self, channels: int, channel_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.channel_dim = channel_dim
        self.block = rotation_block(channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, block={self.block}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate_channels(x, self.block, self.channel_dim)


@torch.no_grad()
def rotate_layer(layer: QuantModule) -> bool:
    """Rotate the layer's input channels and fold the inverse into its weight; False if not rotatable.

    Input channels are axis 1 of both Linear (out, in) and Conv2d (out, in, kh, kw) weights, and
    ``(x R)(W R)^T = x W^T`` for the orthogonal, symmetric ``R``.
    """
    if layer.branch is not None:
        raise ValueError("hq_dit cannot rotate a layer that already has a low-rank branch")
    conv = isinstance(layer, nn.Conv2d)
    if conv and layer.groups != 1:
        return False
    channels = layer.weight.shape[1]
    if rotation_block(channels) == 1:
        return False
    rotation = HadamardRotation(channels, channel_dim=1 if conv else -1)
    layer.weight.copy_(rotate_channels(layer.weight, rotation.block, channel_dim=1))
    layer.pre = rotation if layer.pre is None else nn.Sequential(layer.pre, rotation)
    return True


def exponent_choices(bits: int) -> list[int]:
    """Exponent widths of a ``bits``-wide minifloat (sign, >= 1 exponent bit, >= 0 mantissa bits)."""
    return list(range(1, min(bits - 1, MAX_EXPONENT_BITS) + 1))


@torch.no_grad()
def fit_weight_format(layer: QuantModule, ratios: torch.Tensor, select_format: bool) -> QuantSpec:
    """Set the layer's weight quantizer to the FP format and per-group clipping of least MSE.

    Returns the layer's spec with the chosen ``w_exponent_bits``.
    """
    spec, w = layer.spec, layer.weight.detach()
    choices = exponent_choices(spec.w_bits) if select_format else [spec.weight_exponent_bits]
    best: tuple[float, WeightQuantizer, QuantSpec] | None = None
    for e in choices:
        candidate = QuantSpec(**{**spec.model_dump(), "w_exponent_bits": e})
        layer.weight_quantizer = WeightQuantizer(candidate, w.shape).to(w.device)
        layer.weight_quantizer.init_minmax(w)
        search_weight_clipping(layer, ratios, p=2.0)
        err = (layer.weight_quantizer(w) - w).pow(2).sum().item()
        if best is None or err < best[0]:
            best = (err, layer.weight_quantizer, candidate)
    layer.weight_quantizer = best[1]
    return best[2]


@torch.no_grad()
def fit_act_format(spec: QuantSpec, rows: torch.Tensor, ratios: torch.Tensor, select_format: bool) -> tuple[
    ActQuantizer, QuantSpec
]:
    """The FP activation quantizer (format, and clipping when static) of least MSE on ``rows``."""
    choices = exponent_choices(spec.a_bits) if select_format else [spec.act_exponent_bits]
    best: tuple[float, ActQuantizer, QuantSpec] | None = None
    for e in choices:
        candidate = QuantSpec(**{**spec.model_dump(), "a_exponent_bits": e})
        aq = ActQuantizer(candidate).to(rows.device)
        if not aq.dynamic:
            search_act_clipping(aq, rows, ratios, p=2.0)
        err = (aq(rows) - rows).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, aq, candidate)
    return best[1], best[2]


@register("hq_dit")
class HQDiT(Quantizer):
    """HQ-DiT: Hadamard-rotated activations, per-layer FP format and clipping chosen from the data."""

    paper = "Liu & Zhang, HQ-DiT: Efficient Diffusion Transformer with FP4 Hybrid Quantization, arXiv 2024"

    class Config(StageConfig):
        rotate: bool = Field(True, description="Hadamard-rotate the inputs of activation-quantized layers")
        select_format: bool = Field(
            True, description="choose each layer's exponent/mantissa split (false: the spec's format)"
        )
        clip_grid: int = Field(20, ge=1, description="clipping ratios tried, evenly in [min_clip, 1]")
        min_clip: float = Field(0.5, gt=0, le=1, description="smallest fraction of the absmax tried")
        max_rows: int = Field(4096, ge=16, description="calibration rows kept per layer")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ratios = torch.linspace(cfg.min_clip, 1.0, cfg.clip_grid) if cfg.clip_grid > 1 else torch.ones(1)
        layers = ctx.layers()
        if cfg.rotate:
            for layer in layers.values():
                if layer.act_quantizer is not None:
                    rotate_layer(layer)
        for name, layer in layers.items():
            wq = layer.weight_quantizer
            if wq is None:
                continue
            if wq.format == "fp":
                ctx.specs[name] = layer.spec = fit_weight_format(layer, ratios.to(ctx.device), cfg.select_format)
            else:
                wq.init_minmax(layer.weight)
        quantizers = {n: l.act_quantizer for n, l in layers.items() if l.act_quantizer is not None}
        if not quantizers:
            return
        calib = ctx.require_calibration(self.name)
        inputs = capture_inputs(ctx.denoiser, quantizers, calib, max_rows=cfg.max_rows,
                                batch_size=ctx.batch_size, seed=ctx.seed)
        for name, aq in quantizers.items():
            if name not in inputs:  # a layer the calibration inputs never reach keeps its spec
                continue
            rows = inputs[name].to(ctx.device)
            layer = layers[name]
            if aq.format == "fp":
                layer.act_quantizer, spec = fit_act_format(layer.spec, rows, ratios.to(ctx.device),
                                                           cfg.select_format)
                ctx.specs[name] = layer.spec = spec
            elif not aq.dynamic:
                aq.set_range(rows.amin(), rows.amax())
