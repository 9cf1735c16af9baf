"""QuEST: progressive selective fine-tuning of the layers that hold temporal information, then the
activation-sensitive ones, with time-wise activation quantizers.

Wang et al., "QuEST: Low-bit Diffusion Model Quantization via Efficient Selective Finetuning",
2024 (https://arxiv.org/abs/2402.03666; code https://github.com/hatchetProject/QuEST). The paper
observes that fine-tuning helps quantized diffusion models because it reshapes the imbalanced
activation distributions, and that two kinds of layers matter most: those that carry the
*temporal* information (the time-embedding projections, whose errors misplace the whole denoising
schedule) and those *sensitive* to low-bit activations (the attention projections). Only those are
fine-tuned, progressively, as in the authors' ``qdiff/post_layer_recon.py``:

1. temporal phase: the time-embedding projections' weights (Adam, 1e-5) and their activation step
   sizes (1e-5), loss = MSE of these layers' outputs + MSE of the noise prediction against the FP
   model (``pd_optimize_timeembed``);
2. sensitive phase: the attention q/k/v projections' weights (1e-5) and the time-wise activation
   step sizes of every other layer (1e-4), loss = MSE of the noise prediction
   (``pd_optimize_timewise``).

Activation quantizers are time-wise (one step size per sampler timestep, ``TemporalActQuantizer``).
Layer selection uses name patterns: ``*time_emb_proj`` (U-Net ``emb_layers``), ``*norm1.linear`` and
``proj_out_1`` (DiT adaLN modulation, which projects the timestep/class embedding) as temporal;
``*to_q``, ``*to_k``, ``*to_v`` (the authors' ``qkv``) as sensitive. Deviation: the authors loop
over timesteps (all batches of one timestep, then the next); here mini-batches mix timesteps.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from pydantic import Field

from qsearch.quant.quantizers import WeightQuantizer
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer

from methods.lsq import (
    Batch,
    FeatureTap,
    FineTuneConfig,
    InitMode,
    LSQWeightQuantizer,
    distill_loss,
    ensure_ranges,
    fine_tune,
    freeze_quantizers,
    teacher_eps,
    use_temporal_acts,
)

TEMPORAL = ["*time_emb_proj", "*norm1.linear", "proj_out_1"]
SENSITIVE = ["*to_q", "*to_k", "*to_v"]


def select(names: list[str], patterns: list[str]) -> list[str]:
    """The names matching any glob pattern, in model order."""
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@register("quest")
class QuEST(Quantizer):
    """Progressive selective fine-tuning: time-embedding layers, then attention projections."""

    paper = ("Wang et al., QuEST: Low-bit Diffusion Model Quantization via Efficient Selective "
             "Finetuning (2024)")

    class Config(FineTuneConfig):
        temporal_layers: list[str] = Field(default_factory=lambda: list(TEMPORAL),
                                           description="globs of the layers holding temporal information")
        sensitive_layers: list[str] = Field(default_factory=lambda: list(SENSITIVE),
                                            description="globs of the activation-sensitive layers")
        temporal_steps: int = Field(200, ge=0, description="optimizer steps of the temporal phase")
        lr: float = Field(1e-5, gt=0, description="learning rate of the selected weights")
        temporal_act_lr: float = Field(1e-5, ge=0, description="time-embedding activation step sizes")
        act_lr: float = Field(1e-4, ge=0, description="other activation step sizes (second phase)")
        init: InitMode = Field("auto", description="auto: earlier stage's ranges, else MSE clipping")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        use_temporal_acts(ctx)
        layers = ctx.layers()
        temporal = select(list(layers), cfg.temporal_layers)
        sensitive = [n for n in select(list(layers), cfg.sensitive_layers) if n not in temporal]
        for name in temporal + sensitive:  # LSQ's STE (gradient also at the extreme codes), step fixed
            layer = layers[name]
            if type(layer.weight_quantizer) is WeightQuantizer and layer.weight_quantizer.bits > 1:
                layer.weight_quantizer = LSQWeightQuantizer.from_layer(layer)
                layer.weight_quantizer.scale.requires_grad_(False)

        def act_scales(names):
            return [layers[n].act_quantizer.scale for n in names
                    if layers[n].act_quantizer is not None and layers[n].act_quantizer.scale.dim() == 1]

        if temporal and cfg.temporal_steps:
            groups = [{"params": self.weights(layers, temporal), "lr": cfg.lr},
                      {"params": act_scales(temporal), "lr": cfg.temporal_act_lr}]
            with FeatureTap(ctx, temporal) as tap:
                fine_tune(ctx, f"{self.name}/temporal", groups, cfg, self.temporal_loss(ctx, tap),
                          steps=cfg.temporal_steps)
        others = [n for n in layers if n not in temporal]
        groups = [{"params": self.weights(layers, sensitive), "lr": cfg.lr},
                  {"params": act_scales(others), "lr": cfg.act_lr}]
        fine_tune(ctx, f"{self.name}/sensitive", groups, cfg, distill_loss(ctx))
        freeze_quantizers(ctx)

    @staticmethod
    def weights(layers: dict, names: list[str]) -> list[torch.nn.Parameter]:
        """Weights and biases of the named layers."""
        return [p for n in names for p in (layers[n].weight, layers[n].bias) if p is not None]

    @staticmethod
    def temporal_loss(ctx: QuantContext, tap: FeatureTap):
        """Outputs of the time-embedding layers and the noise prediction, against the FP model."""

        def loss(batch: Batch) -> torch.Tensor:
            x, t, cond, _ = batch
            out = F.mse_loss(ctx.denoiser.forward(x, t, cond), teacher_eps(ctx, x, t, cond))
            return out + sum(F.mse_loss(s, t_) for _, s, t_ in tap.pairs())

        return loss
