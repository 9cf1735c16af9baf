"""TFMQ-DM: temporal features reconstructed as one block, and one activation grid per timestep.

A U-Net turns the timestep into a *temporal feature* for every residual block: the time embedding
(``time_proj`` then the ``time_embedding`` MLP) followed by each block's ``time_emb_proj`` on
``SiLU(temb)``. These modules see only ``t``, never ``x_t``; block reconstruction treats them as
parts of unrelated units (the MLP as lone layers, each projection inside its ResBlock) and so
fits them to the wrong targets, which disturbs the temporal features and the denoising
trajectory. TFMQ-DM groups them into the Temporal Information Block (TIB) and handles it apart:

* TIAR (temporal information aware reconstruction): the TIB's weights are learned-rounded (AdaRound,
  ``methods.brecq``) on its own loss, the sum over all residual blocks ``i`` of
  ``||emb_t,i - emb_hat_t,i||^2`` (``LossFuncTimeEmbedding`` of the authors' code), on the timesteps
  of the calibration set; the rest of the model then gets BRECQ with the TIB layers left alone;
* FSC (finite set calibration): ``t`` takes finitely many values, and for a given ``t`` the TIB's
  activations are fixed vectors, so each TIB layer gets one activation grid per sampler timestep, at
  that timestep's min-max range (no clipping error; the authors' code sets these ranges from running
  min/max per timestep); at sampling time the quantizer looks up the current timestep
  (``methods.tdq.TimestepActQuantizer``). The other activations keep BRECQ's learned step sizes.

Hyper-parameters are those of ``brecq`` (the authors run TIAR and the block reconstruction with the
same settings: 20,000 iterations, batch 32, lambda 0.01, warm-up 0.2).

Scope: U-Nets whose time embedding depends on ``t`` alone (``UNet2DModel``,
``UNet2DConditionModel`` without class or added embeddings). A DiT mixes the class label into its
adaLN embedding in every block, so it has no ``x``- and label-free temporal block; ``tfmq_dm``
refuses it. The authors' public code also gives every *other* activation a grid per timestep; the
paper's FSC covers the temporal features only, and so does this stage.

Paper: Y. Huang, R. Gong, J. Liu, T. Chen, X. Liu, "TFMQ-DM: Temporal Feature Maintenance
Quantization for Diffusion Models", CVPR 2024 (arXiv:2311.16503). Code:
https://github.com/ModelTC/TFMQ-DM (``quant/reconstruction.py``: ``tib_reconstruction``;
``quant/reconstruction_util.py``: ``LossFuncTimeEmbedding``; ``quant/calibration.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from qsearch.calibration import CalibrationSet, input_hooks
from qsearch.quant.modules import QuantMixin, activations_off
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer

from methods.brecq import (
    BlockConfig, Reconstruction, act_training, can_round, learn_rounding, lp_loss,
    timestep_context,
)
from methods.lsq import ensure_ranges
from methods.tdq import TimestepActQuantizer


@dataclass
class TemporalBlock:
    """A U-Net's temporal information block: its time embedding and every ``time_emb_proj``."""

    model: nn.Module
    resnets: list[nn.Module]
    layer_names: list[str]  # in execution order: the embedding MLP, then the projections

    @classmethod
    def of(cls, model: nn.Module) -> "TemporalBlock":
        """The TIB of ``model``; an error for models whose temporal features depend on more than t."""
        name = type(model).__name__
        if name not in ("UNet2DModel", "UNet2DConditionModel"):
            raise TypeError(f"tfmq_dm needs a U-Net with a t-only time embedding, not {name}")
        for extra in ("class_embedding", "add_embedding", "time_embed_act"):
            if getattr(model, extra, None) is not None:
                raise TypeError(f"tfmq_dm: the time embedding of this {name} also depends on {extra}")
        resnets, names = [], []
        for n, m in model.named_modules():
            if n.startswith("time_embedding.") and isinstance(m, nn.Linear):
                names.append(n)
        for n, m in model.named_modules():
            if type(m).__name__ == "ResnetBlock2D" and m.time_emb_proj is not None:
                resnets.append(m)
                names.append(f"{n}.time_emb_proj")
        return cls(model, resnets, names)

    def embedding(self, t: torch.Tensor) -> torch.Tensor:
        """``temb``, the time embedding every residual block receives."""
        t_emb = self.model.time_proj(t).to(dtype=next(self.model.parameters()).dtype)
        return self.model.time_embedding(t_emb)

    def __call__(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The temporal features ``emb_t,i``: each block's ``time_emb_proj`` output at timesteps ``t``."""
        with timestep_context(t):
            emb = self.embedding(t)
            return [r.time_emb_proj(emb if r.skip_time_act else r.nonlinearity(emb)) for r in self.resnets]

    def layers(self, model_layers: dict[str, QuantMixin]) -> dict[str, QuantMixin]:
        """The TIB's quantized layers (those not kept in full precision)."""
        return {n: model_layers[n] for n in self.layer_names if n in model_layers}


def temporal_reconstruction(
    ctx: QuantContext, calib: CalibrationSet, cfg: BlockConfig, timesteps: str = "calibration"
) -> dict[str, float] | None:
    """TIAR: AdaRound on the TIB against the sum of the temporal-feature errors (``learn_rounding``'s record).

    ``timesteps``: ``calibration`` fits the temporal features at the calibration inputs' timesteps (the
    paper's, a few distinct values); ``sampler`` at every timestep the sampler visits, which the TIB's
    input (``t`` alone) makes free to do.
    """
    tib = TemporalBlock.of(ctx.model)
    layers = {n: m for n, m in tib.layers(ctx.layers()).items() if can_round(m)}
    if not layers:
        return None
    t = (calib.t if timesteps == "calibration" else ctx.sampler.timesteps).to(ctx.device)
    with torch.no_grad():
        targets = TemporalBlock.of(ctx.fp_denoiser.model)(t)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        return sum(lp_loss(f, target[idx], cfg.p) for f, target in zip(tib(t[idx]), targets))

    return learn_rounding(layers, len(t), loss_fn, cfg)


@torch.no_grad()
def finite_set_calibration(ctx: QuantContext) -> list[str]:
    """FSC: each TIB layer's activations get one min-max grid per sampler timestep.

    Layers are calibrated in execution order, so each sees the already quantized features upstream.
    """
    tib = TemporalBlock.of(ctx.model)
    timesteps = ctx.sampler.timesteps.to(ctx.device)
    calibrated = []
    for name, layer in tib.layers(ctx.layers()).items():
        old = layer.act_quantizer
        if old is None or old.dynamic:
            continue
        seen: dict[str, torch.Tensor] = {}
        with input_hooks({name: old}, lambda _n, x: seen.setdefault("x", x.detach().float())):
            tib(timesteps)
        x = seen["x"].reshape(len(timesteps), -1)
        scale, zero_point = old.qparams(x.amin(1), x.amax(1))
        layer.act_quantizer = TimestepActQuantizer(layer.spec, timesteps, scale, zero_point)
        calibrated.append(name)
    return calibrated


@register("tfmq_dm")
class TFMQDM(Quantizer):
    """TFMQ-DM: temporal block (time embedding + time_emb_proj) reconstructed apart, per-t act grids."""

    paper = "Huang et al., TFMQ-DM: Temporal Feature Maintenance Quantization for Diffusion Models (CVPR 2024)"

    class Config(BlockConfig):
        tiar_timesteps: Literal["calibration", "sampler"] = Field(
            "calibration",
            description="timesteps TIAR fits the temporal features at: the calibration set's (paper) or "
            "every sampler step",
        )

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        tib = TemporalBlock.of(ctx.model)  # refuse unsupported models before any work
        ensure_ranges(ctx, cfg.init)
        frozen = frozenset(tib.layers(ctx.layers()))
        rec = Reconstruction.prepare(ctx, self.name, cfg.samples, cfg.seed, frozen=frozen)
        with activations_off(ctx.layers()):
            rec.report["temporal"] = temporal_reconstruction(ctx, rec.calib, cfg, cfg.tiar_timesteps)
        rec.weights(cfg)
        rec.report["finite_set"] = finite_set_calibration(ctx)
        rec.activations(act_training(cfg))
