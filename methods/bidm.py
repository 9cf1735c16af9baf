"""BiDM-style W1A1: binary weights *and* activations, trained with space patched distillation.

Zheng et al., "BiDM: Pushing the Limit of Quantization for Diffusion Models", NeurIPS 2024
(https://arxiv.org/abs/2412.05926; code https://github.com/Xingyu-Zheng/BiDM). What is implemented,
following the authors' code (``bidm-cifar/models/util_bidm.py``, ``runners/diffusion_bidm.py``):

* weights: ``mean|w| * sign(w)`` per output channel (scale recomputed from the latent weights,
  detached), clipped straight-through estimator; the result is the core's 1-bit quantizer;
* activations (the *learnable activation binarizer* of the Timestep-friendly Binary Structure):
  ``sign(x + tau)`` with a learned threshold ``tau`` per input channel, Bi-Real's piecewise
  quadratic ApproxSign gradient, rescaled per token by ``mean_c |x|`` (XNOR-Net's activation scale,
  which the authors' code applies to binary convolutions);
* SPD (Space Patched Distillation): block outputs split into 4x4 spatial patches; per patch the
  attention-like map ``A A^T`` (over the last spatial axis), normalised by its Frobenius norm, of the
  quantized model is matched to the FP model's (loss weight 1e-2), next to the noise-prediction loss.

Missing (so this is BiDM-*style*, not BiDM): the *cross-timestep feature connection* of TBS, which
feeds each block the cached features of the previous sampling step (a stateful change of the
sampling loop and of the model's forward, outside qsearch's quantized-layer model), and the
learnable full-precision shortcut the authors add to every binary convolution. Deviation: the
activation scale is applied to the binarized input per token (pixel) *before* the convolution; the
authors apply a k x k box-filtered scale to the convolution's output (XNOR-Net's ``K``), which a
quantized layer here cannot express. For linear layers both are the same. The activation
binarizer replaces a binarized layer's activation quantizer whatever the recipe's ``a_bits`` (a
QuantSpec cannot say 1-bit activations); layers the recipe keeps at more weight bits (first and
last) keep their activation quantizer and are trained with LSQ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qsearch.quant import grid
from qsearch.quant.modules import QuantMixin
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer

from methods.binarydm import SignSTE
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


class ApproxSign(torch.autograd.Function):
    """``sign`` forward; Bi-Real Net's gradient ``2 - 2|x|`` on ``|x| < 1``, zero outside."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.clamp(2 - 2 * x.abs(), min=0)


class BinaryWeight(WeightQuantizer):
    """``mean|w| * sign(w)`` per group, the scale following the latent weights (detached)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g, pad = self.grouped(w)
        return grid.ungroup(g.detach().abs().mean(-1, keepdim=True) * SignSTE.apply(g), pad, w.shape)

    def frozen(self, w: torch.Tensor) -> WeightQuantizer:
        plain = WeightQuantizer(self.spec, self.weight_shape).to(w.device)
        plain.init_minmax(w.detach())  # 1-bit: the same mean|w| scale
        return plain

    @classmethod
    def for_layer(cls, layer: QuantMixin) -> "BinaryWeight":
        new = cls(layer.spec, layer.weight.shape).to(layer.weight.device)
        new.spec = layer.spec
        return new


class BinaryActivation(ActQuantizer):
    """``sign(x + tau) * mean_c|x|`` per token, ``tau`` learned per input channel."""

    def __init__(self, spec, channels: int) -> None:
        super().__init__(spec)
        self.bits = 1
        self.dynamic = True  # the per-token scale is computed per call
        self.calibrated = True
        self.threshold = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if x.dim() == 4 else -1
        shape = [1] * x.dim()
        shape[dim] = -1
        signs = ApproxSign.apply(x + self.threshold.view(shape))
        return signs * x.abs().mean(dim, keepdim=True)

    def extra_repr(self) -> str:
        return f"bits=1, sign(x + tau) * mean|x| per token, channels={self.threshold.numel()}"


def patch_similarity_loss(student: torch.Tensor, teacher: torch.Tensor, patches: int = 4) -> torch.Tensor:
    """SPD: ``|| A_s A_s^T / ||.|| - A_t A_t^T / ||.|| ||`` averaged over ``patches x patches`` patches.

    ``A`` is a patch ``(B, C, h, w)`` of a block output and ``A A^T`` multiplies over its last axis
    (the authors' ``att_map_r2b``). Token outputs ``(B, N, C)`` with square ``N`` are laid out as
    images first.
    """
    if student.dim() == 3:
        side = int(round(student.shape[1] ** 0.5))
        if side * side != student.shape[1]:
            raise ValueError("SPD needs square token grids")
        student = student.transpose(1, 2).reshape(student.shape[0], -1, side, side)
        teacher = teacher.transpose(1, 2).reshape(teacher.shape[0], -1, side, side)
    h, w = student.shape[-2:]
    ph, pw = max(1, h // patches), max(1, w // patches)
    terms = []
    for i in range(0, h - ph + 1, ph):
        for j in range(0, w - pw + 1, pw):
            s = student[..., i:i + ph, j:j + pw]
            t = teacher[..., i:i + ph, j:j + pw]
            qs, qt = s @ s.transpose(-1, -2), t @ t.transpose(-1, -2)
            diff = qs / (qs.norm() + 1e-12) - qt / (qt.norm() + 1e-12)
            terms.append(torch.linalg.vector_norm(diff))
    return torch.stack(terms).mean()


@register("bidm")
class BiDM(Quantizer):
    """BiDM-style W1A1: learnable activation binarizers + space patched distillation."""

    paper = "Zheng et al., BiDM: Pushing the Limit of Quantization for Diffusion Models (NeurIPS 2024)"

    class Config(FineTuneConfig):
        lr: float = Field(1e-4, gt=0, description="learning rate of weights and thresholds")
        quant_lr: float = Field(1e-4, gt=0, description="learning rate of LSQ step sizes (multi-bit layers)")
        spd_weight: float = Field(1e-2, ge=0, description="weight of the space patched distillation")
        patches: int = Field(4, ge=1, description="patches per side for SPD")
        init: InitMode = Field("auto", description="auto: earlier stage's ranges, else MSE clipping")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        binary = layers_with_weights(ctx, min_bits=1, max_bits=1)
        for layer in binary.values():
            layer.weight_quantizer = BinaryWeight.for_layer(layer)
            channels = layer.weight.shape[1] * getattr(layer, "groups", 1)
            spec = layer.spec if layer.spec.a_bits else layer.spec.model_copy(update={"a_bits": 8})
            layer.act_quantizer = BinaryActivation(spec, channels).to(layer.weight.device)
        scales = use_lsq_weights(ctx) + use_lsq_acts(ctx)  # the layers kept at more bits
        thresholds = [m.act_quantizer.threshold for m in binary.values()]
        ids = {id(p) for p in scales}
        weights = [p for p in ctx.model.parameters() if id(p) not in ids]
        groups = [{"params": scales, "lr": cfg.quant_lr}, {"params": weights, "lr": cfg.lr}]
        with FeatureTap(ctx, block_names(ctx.model)) as tap:
            fine_tune(ctx, self.name, groups, cfg, self.loss(ctx, tap))
        for layer in binary.values():
            layer.weight_quantizer = layer.weight_quantizer.frozen(layer.weight)
        with torch.no_grad():
            for tau in thresholds:
                tau.copy_(tau.half().float())
        freeze_quantizers(ctx)

    def loss(self, ctx: QuantContext, tap: FeatureTap):
        cfg = self.config

        def loss(batch: Batch) -> torch.Tensor:
            x, t, cond, noise = batch
            eps = ctx.denoiser.forward(x, t, cond)
            fp = teacher_eps(ctx, x, t, cond)  # also fills the teacher side of the tap
            target = noise if noise is not None else fp
            spd = torch.stack([patch_similarity_loss(s, tt, cfg.patches) for _, s, tt in tap.pairs()])
            return F.mse_loss(eps, target) + cfg.spd_weight * spd.mean()

        return loss
