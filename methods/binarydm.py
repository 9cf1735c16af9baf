"""BinaryDM: 1-bit weights with the Evolvable-Basis Binarizer and low-rank representation mimicking.

Zheng et al., "BinaryDM: Accurate Weight Binarization for Efficient Diffusion Models", ICLR 2025
(https://arxiv.org/abs/2404.05662; code https://github.com/Xingyu-Zheng/BinaryDM).

* **EBB** (Evolvable-Basis Binarizer): ``w_b = s1 sign(w) + s2 sign(w - s1 sign(w))``, per output
  channel, both scales learned (initialised to ``mean|w|`` and ``mean|w - s1 sign(w)|`` as in the
  authors' code), sign with the clipped straight-through estimator (gradient 1 for ``|x| <= 1``).
  The second basis is regularised, ``0.09 * sum(s2^2)``, so that the binarizer *evolves* from two
  bases to one; at ``evolve_at`` of the training the second basis is dropped and training goes on
  with one basis, so the result is a plain 1-bit layer (``evolve_at: 1`` keeps both bases: 2 bits
  of storage per weight, which ``weight_quantizer.bits = 2`` accounts for). As in the paper the
  evolution happens only in the *head and tail* of the network (default: the outer half of the
  U-Net levels on each side, or the first and last quarter of the transformer blocks); the other
  binary layers use one basis throughout.
* **LRM** (Low-rank Representation Mimicking): the outputs of the denoiser's blocks are projected
  onto the principal components of the FP model's block outputs (PCA of the channel dimension,
  rank ``C/4``, at least 2, fixed from the first batch) and the quantized model's projections mimic
  the FP ones (MSE, weight 1e-4 as in the authors' code).
* The other terms: the noise prediction mimics the FP model's (data-free; the authors train on the
  dataset with the diffusion loss, which ``dataset`` restores, replacing this term by
  ``||eps - eps_Q||^2``); activations use LSQ quantizers (W1A4, W1A8); layers the recipe keeps at
  more bits (the first and last layers, 8-bit in the paper) are trained with LSQ.

Not reproduced: the authors' code also adds a learnable full-precision shortcut to every binarized
convolution (``y + shortcut * |alpha|``); that is an architecture change outside the quantized-layer
model of qsearch, so it is left out (the reported results of the paper include it).
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qsearch.calibration import as_rows
from qsearch.quant import grid
from qsearch.quant.modules import QuantMixin
from qsearch.quant.quantizers import WeightQuantizer
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer

from methods.lsq import (
    Batch,
    FeatureTap,
    FineTuneConfig,
    InitMode,
    block_names,
    ensure_ranges,
    fine_tune,
    freeze_quantizers,
    layers_with_weights,
    teacher_eps,
    use_lsq_acts,
    use_lsq_weights,
)


class SignSTE(torch.autograd.Function):
    """``sign`` (zero maps to +1, so the codes stay binary) with the clipped identity gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class EBBQuantizer(WeightQuantizer):
    """``s1 sign(w) [+ s2 sign(w - s1 sign(w))]`` with learned scales per weight group.

    ``scale`` is ``s1`` (so the bits accounting counts it as the step size) and ``second`` is
    ``s2``; with two bases the codes are 2 bits (``bit0 + 2 bit1``), with one they are the core's
    1-bit codes.
    """

    def __init__(self, layer: QuantMixin, two_bases: bool) -> None:
        super().__init__(layer.spec, layer.weight.shape)
        self.to(layer.weight.device)
        g, _ = self.grouped(layer.weight.detach())
        s1 = g.abs().mean(-1, keepdim=True)
        s2 = (g - s1 * torch.where(g >= 0, 1.0, -1.0)).abs().mean(-1, keepdim=True)
        self._buffers.pop("scale")
        self.scale = nn.Parameter(s1)
        self.second = nn.Parameter(s2 if two_bases else torch.zeros_like(s2), requires_grad=two_bases)
        self.zero_point.fill_(0.5)
        self.two_bases = two_bases
        self.bits = 2 if two_bases else 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g, pad = self.grouped(w)
        out = self.scale * SignSTE.apply(g)
        if self.two_bases:
            out = out + self.second * SignSTE.apply(g - out)
        return grid.ungroup(out, pad, w.shape)

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        g, pad = self.grouped(w)
        bit0 = (g >= 0).to(g.dtype)
        q = bit0
        if self.two_bases:
            q = q + 2 * (g - self.scale * (2 * bit0 - 1) >= 0).to(g.dtype)
        return grid.ungroup(q, pad, w.shape)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        g, pad = self.grouped(q)
        bit0, bit1 = torch.remainder(g, 2), torch.div(g, 2, rounding_mode="floor")
        w = self.scale * (2 * bit0 - 1)
        if self.two_bases:
            w = w + self.second * (2 * bit1 - 1)
        return grid.ungroup(w, pad, q.shape)

    @torch.no_grad()
    def evolve(self) -> None:
        """Drop the second basis: from here on a plain sign binarizer (1 bit)."""
        self.two_bases = False
        self.bits = 1
        self.second.zero_()
        self.second.requires_grad_(False)

    @torch.no_grad()
    def frozen(self, spec) -> WeightQuantizer:
        """One basis: the core 1-bit quantizer (``+-scale/2``); two: itself, scales in fp16."""
        if self.two_bases:
            self.scale.requires_grad_(False)
            self.scale.copy_(self.scale.half().float())
            self.second.copy_(self.second.half().float())
            return self
        plain = WeightQuantizer(spec, self.weight_shape).to(self.scale.device)
        plain.set_range(-self.scale.detach(), self.scale.detach())  # 1-bit grid: scale = 2 s1
        return plain


def head_and_tail(model: nn.Module) -> list[str]:
    """Layer-name patterns of the outer blocks, where EBB keeps two bases while evolving.

    The authors' LDM U-Net: input blocks 0-5 and output blocks 6-11 of 12 (the outer half of the
    levels on each side); for transformers, the first and last quarter of the blocks.
    """
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        n = len(model.down_blocks)
        k = math.ceil(n / 2)
        return (["conv_in", "conv_out"] + [f"down_blocks.{i}.*" for i in range(k)]
                + [f"up_blocks.{i}.*" for i in range(n - k, n)])
    if hasattr(model, "transformer_blocks"):
        n = len(model.transformer_blocks)
        k = max(1, n // 4)
        return (["pos_embed.*", "proj_out*"] + [f"transformer_blocks.{i}.*" for i in range(k)]
                + [f"transformer_blocks.{i}.*" for i in range(n - k, n)])
    return []


class LowRankMimicking:
    """LRM: MSE between block outputs projected on the FP model's principal components."""

    def __init__(self, tap: FeatureTap, rank_ratio: float) -> None:
        self.tap = tap
        self.rank_ratio = rank_ratio
        self.bases: dict[str, torch.Tensor] = {}

    def projection(self, name: str, teacher_rows: torch.Tensor) -> torch.Tensor:
        """PCA basis ``(C, q)`` of the FP block output, computed on the first batch and kept."""
        if name not in self.bases:
            q = max(2, int(teacher_rows.shape[1] * self.rank_ratio))
            q = min(q, *teacher_rows.shape)
            self.bases[name] = torch.pca_lowrank(teacher_rows, q=q, center=True, niter=2)[2].detach()
        return self.bases[name]

    def loss(self) -> torch.Tensor:
        terms = []
        for name, s, t in self.tap.pairs():
            s_rows, t_rows = as_rows(s), as_rows(t)
            k = self.projection(name, t_rows)
            terms.append(F.mse_loss(s_rows @ k, t_rows @ k))
        return torch.stack(terms).mean()


@register("binarydm")
class BinaryDM(Quantizer):
    """1-bit weights: Evolvable-Basis Binarizer + low-rank representation mimicking."""

    paper = "Zheng et al., BinaryDM: Accurate Weight Binarization for Efficient Diffusion Models (ICLR 2025)"

    class Config(FineTuneConfig):
        lr: float = Field(1e-4, gt=0, description="learning rate of weights and binarizer scales")
        quant_lr: float = Field(1e-4, gt=0, description="learning rate of LSQ step sizes")
        lrm_weight: float = Field(1e-4, ge=0, description="weight of the LRM loss")
        lrm_rank: float = Field(0.25, gt=0, le=1, description="PCA rank as a fraction of the channels")
        l2_weight: float = Field(0.09, ge=0, description="L2 regularization of the second EBB basis")
        evolve_at: float = Field(
            0.5, ge=0, le=1, description="fraction of training after which the second basis is dropped"
        )
        ebb_layers: list[str] | None = Field(
            None, description="layer globs with two bases while evolving (null: head and tail)"
        )
        init: InitMode = Field("auto", description="auto: earlier stage's ranges, else MSE clipping")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        patterns = cfg.ebb_layers if cfg.ebb_layers is not None else head_and_tail(ctx.model)
        scales = use_lsq_weights(ctx) + use_lsq_acts(ctx)  # the multi-bit layers
        binary = layers_with_weights(ctx, min_bits=1, max_bits=1)
        ebbs = []
        for name, layer in binary.items():
            two = any(fnmatch.fnmatchcase(name, p) for p in patterns) and cfg.evolve_at > 0
            layer.weight_quantizer = EBBQuantizer(layer, two)
            ebbs.append(layer.weight_quantizer)
        binarizer = [p for q in ebbs for p in (q.scale, q.second) if p.requires_grad]
        ids = {id(p) for p in scales + binarizer}
        weights = [p for p in ctx.model.parameters() if id(p) not in ids]
        groups = [{"params": scales, "lr": cfg.quant_lr}, {"params": weights + binarizer, "lr": cfg.lr}]
        evolve_step = round(cfg.evolve_at * cfg.steps) if cfg.evolve_at < 1 else -1

        def on_step(i: int) -> None:
            if i + 1 == evolve_step:
                for q in ebbs:
                    q.evolve()

        with FeatureTap(ctx, block_names(ctx.model)) as tap:
            lrm = LowRankMimicking(tap, cfg.lrm_rank)
            fine_tune(ctx, self.name, groups, cfg, self.loss(ctx, lrm, ebbs), on_step=on_step)
        for name, layer in binary.items():
            layer.weight_quantizer = layer.weight_quantizer.frozen(layer.spec)
        freeze_quantizers(ctx)

    def loss(self, ctx: QuantContext, lrm: LowRankMimicking, ebbs: list[EBBQuantizer]):
        cfg = self.config

        def loss(batch: Batch) -> torch.Tensor:
            x, t, cond, noise = batch
            eps = ctx.denoiser.forward(x, t, cond)
            fp = teacher_eps(ctx, x, t, cond)  # also fills the teacher side of the feature tap
            target = noise if noise is not None else fp
            total = F.mse_loss(eps, target) + cfg.lrm_weight * lrm.loss()
            second = [q.second for q in ebbs if q.two_bases]
            if second and cfg.l2_weight:
                total = total + cfg.l2_weight * torch.cat([s.flatten() for s in second]).square().sum()
            return total

        return loss
