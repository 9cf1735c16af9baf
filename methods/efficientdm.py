"""Low-rank adapters trained on quantized weights and merged: EfficientDM (QALoRA), QA-LoRA, IntLoRA.

**EfficientDM** (He et al., "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit
Diffusion Models", ICLR 2024, https://arxiv.org/abs/2310.03270; code
https://github.com/ThisisBillhe/EfficientDM). Its quantization-aware low-rank adapter (QALoRA) adds
a LoRA update to the weight *inside* the weight quantizer, ``W_hat = Q(W + B A)``, so merging is
free: after training ``W <- W + B A`` and the layer is a plain quantized layer on the learned grid.
Defaults of the authors' code: rank 32 (for a convolution ``A`` is a convolution with the layer's
kernel and ``B`` a 1x1 convolution, i.e. ``B A`` in weight space), LoRA learning rate = mean weight
step size / 2500 per layer, weight step sizes trained at 1e-6, temporal activation LSQ (TALSQ, one
activation step size per sampling timestep) at 5e-4, AdamW with linear decay. The loss is the
data-free distillation of the paper: MSE between the quantized and the FP model's noise predictions
on the FP model's sampling trajectory. Deviation: the authors take one optimizer step per denoising
step while running the FP DDIM trajectory; here mini-batches are drawn at random from the recorded
FP trajectory inputs (the same inputs, in shuffled order), and EfficientDM's real-valued learned
activation zero points are kept integer (see ``methods.lsq.TemporalActQuantizer``).

**QA-LoRA** variant (``merge: zero_point``; Xu et al., "QA-LoRA: Quantization-Aware Low-Rank
Adaptation of Large Language Models", ICLR 2024, https://arxiv.org/abs/2309.14717; code
https://github.com/yuhuixu1993/qa-lora). With group-wise weight quantization the adapter sees the
input averaged over each quantization group, so ``B A / group_size`` adds one constant ``c`` per
(output channel, group) to the dequantized weight, which merges exactly into the group's zero
point: ``s (q - z) + c = s (q - (z - c/s))``. Weights and step sizes stay frozen; the merged zero
points are real numbers, stored in fp16 (``ZeroPointQuantizer``, bits accounted as asymmetric).

**IntLoRA** (stage ``intlora``; Guo et al., "IntLoRA: Integral Low-rank Adaptation of Quantized
Diffusion Models", 2024, https://arxiv.org/abs/2410.21759; code https://github.com/csguoh/IntLoRA),
the multiplicative form IntLoRA-MUL: an auxiliary matrix ``R`` (Laplace(0, 0.5), rescaled per row
by ``max|W|^1.5 / min(|max R|, |min R|)^1.5``) is subtracted before quantization, ``W_int = Q(W -
R) - z``; the adapter acts on the step size, ``U = s + (R + B A) / W_int``, which is quantized per
output channel to ``lora_bits`` (``U_int``, step ``s2``), and the merged weight is
``s2 * (U_int * W_int)``: integer codes ``U_int * W_int`` on one fp16 step per output channel, so the
merge lands exactly on an integer grid. The product needs up to ``w_bits + lora_bits`` bits; the
merged layer's ``weight_quantizer.bits`` is the width its codes actually need, so the bits
accounting shows the cost honestly. IntLoRA-SHIFT (log2-quantized ``U``) is not implemented.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from qsearch.quant import grid
from qsearch.quant.modules import QuantMixin
from qsearch.quant.quantizers import WeightQuantizer, round_ste
from qsearch.quant.spec import QuantSpec
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer

from methods.lsq import (
    FineTuneConfig,
    InitMode,
    LSQWeightQuantizer,
    distill_loss,
    ensure_ranges,
    fine_tune,
    freeze_quantizers,
    layers_with_weights,
    recompute_weights,
    use_lsq_acts,
    use_temporal_acts,
)


def lora_pair(
    rows: int, fan_in: int, rank: int, device: torch.device, generator: torch.Generator | None = None
) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA factors ``A`` (rank x fan_in, Kaiming-uniform) and ``B`` (rows x rank, zeros)."""
    a = torch.empty(rank, fan_in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return nn.Parameter(a.to(device)), nn.Parameter(torch.zeros(rows, rank, device=device))


class QALoRAQuantizer(LSQWeightQuantizer):
    """EfficientDM's QALoRA: ``Q(W + B A)`` with learned step sizes."""

    def __init__(
        self, spec: QuantSpec, weight_shape: torch.Size, rank: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(spec, weight_shape)
        rows, fan_in = weight_shape[0], weight_shape[1:].numel()
        rank = min(rank, rows, fan_in)
        self.lora_a, self.lora_b = lora_pair(rows, fan_in, rank, self.scale.device, generator)

    @classmethod
    def from_layer(
        cls, layer: QuantMixin, rank: int = 32, generator: torch.Generator | None = None
    ) -> "QALoRAQuantizer":
        new = cls(layer.spec, layer.weight.shape, rank, generator).to(layer.weight.device)
        with torch.no_grad():
            new.scale.copy_(layer.weight_quantizer.scale)
            new.zero_point.copy_(layer.weight_quantizer.zero_point)
        return new

    def delta(self) -> torch.Tensor:
        """``B A`` in the weight's shape."""
        return (self.lora_b @ self.lora_a).view(self.weight_shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return super().forward(w + self.delta())

    @torch.no_grad()
    def merge(self, layer: QuantMixin) -> WeightQuantizer:
        """Fold ``B A`` into ``layer.weight``; the plain quantizer that reproduces the adapter."""
        self.round_scales()
        layer.weight.add_(self.delta())
        return self.frozen()


class ZeroPointQuantizer(WeightQuantizer):
    """An integer weight grid with real-valued (fp16) zero points: ``x_hat = (q - z) * s``.

    Codes are ``round(x / s + z)``; for integer zero points this is the core quantizer exactly.
    """

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        g, pad = self.grouped(w)
        q = torch.clamp(torch.round(g / self.scale + self.zero_point), 0, grid.code_max(self.bits))
        return grid.ungroup(q, pad, w.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g, pad = self.grouped(w)
        q = torch.clamp(round_ste(g / self.scale + self.zero_point), 0, grid.code_max(self.bits))
        return grid.ungroup((q - self.zero_point) * self.scale, pad, w.shape)


class GroupLoRAQuantizer(WeightQuantizer):
    """QA-LoRA: frozen codes plus a group-pooled adapter, one constant per (row, group)."""

    def __init__(
        self, spec: QuantSpec, weight_shape: torch.Size, rank: int, generator: torch.Generator | None = None
    ) -> None:
        if spec.w_granularity != "group":
            raise ValueError("QA-LoRA merges into group zero points: use w_granularity 'group'")
        super().__init__(spec, weight_shape)
        rows, groups = self.scale.shape[0], self.scale.shape[1]
        self.register_buffer("codes", torch.zeros(weight_shape))
        rank = min(rank, rows, groups)
        self.lora_a, self.lora_b = lora_pair(rows, groups, rank, self.scale.device, generator)

    @classmethod
    def from_layer(
        cls, layer: QuantMixin, rank: int, generator: torch.Generator | None = None
    ) -> "GroupLoRAQuantizer":
        new = cls(layer.spec, layer.weight.shape, rank, generator).to(layer.weight.device)
        with torch.no_grad():
            new.scale.copy_(layer.weight_quantizer.scale)
            new.zero_point.copy_(layer.weight_quantizer.zero_point)
            new.codes.copy_(new.encode(layer.weight))
        return new

    def offsets(self) -> torch.Tensor:
        """``B A / group_size`` per (row, group), shaped like ``scale``."""
        return (self.lora_b @ self.lora_a / self.group_size).unsqueeze(-1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g, pad = self.grouped(self.codes)
        return grid.ungroup((g - self.zero_point) * self.scale + self.offsets(), pad, w.shape)

    @torch.no_grad()
    def merge(self, layer: QuantMixin) -> ZeroPointQuantizer:
        """Offsets into the zero points: ``z' = z - c / s`` (fp16); the weight becomes the decode."""
        spec = QuantSpec(**{**layer.spec.model_dump(), "w_symmetric": False})
        merged = ZeroPointQuantizer(spec, self.weight_shape).to(self.scale.device)
        merged.scale.copy_(self.scale)
        merged.zero_point.copy_((self.zero_point - self.offsets() / self.scale).half().float())
        layer.weight.copy_(merged.decode(self.codes))
        return merged


class IntLoRAQuantizer(WeightQuantizer):
    """IntLoRA-MUL: ``s2 * (U_int * W_int)`` with ``U = s + (R + B A) / W_int`` (per output channel)."""

    def __init__(
        self, spec: QuantSpec, weight: torch.Tensor, rank: int, lora_bits: int, alpha: float,
        generator: torch.Generator,
    ) -> None:
        per_channel = QuantSpec(**{**spec.model_dump(), "w_granularity": "channel", "group_size": None})
        super().__init__(per_channel, weight.shape)
        self.to(weight.device)
        self.lora_bits = lora_bits
        flat = weight.detach().reshape(weight.shape[0], -1)
        aux = laplace(flat.shape, 0.5, generator).to(weight.device)
        aux_absmax = torch.minimum(aux.amax(1, keepdim=True).abs(), aux.amin(1, keepdim=True).abs())
        aux = aux * flat.abs().amax(1, keepdim=True) ** alpha / (aux_absmax + 1e-8) ** alpha
        self.init_minmax(flat - aux)
        w_int = self.encode(flat - aux) - self.zero_point.view(-1, 1)
        self.register_buffer("aux", aux)
        self.register_buffer("w_int", w_int)
        self.lora_a, self.lora_b = lora_pair(flat.shape[0], flat.shape[1], rank, weight.device, generator)
        u = self.updates().detach()
        self.register_buffer("u_scale", torch.ones(flat.shape[0], 1, device=weight.device))
        self.register_buffer("u_zero", torch.zeros(flat.shape[0], 1, device=weight.device))
        scale, zero = grid.int_qparams(u.amin(1, keepdim=True), u.amax(1, keepdim=True), lora_bits, False)
        self.u_scale.copy_(scale)
        self.u_zero.copy_(zero)

    def updates(self) -> torch.Tensor:
        """``U = s + (R + B A) / W_int`` (where ``W_int = 0`` the division is by 1, as in IntLoRA)."""
        nonzero = torch.where(self.w_int == 0, torch.ones_like(self.w_int), self.w_int)
        return self.scale.view(-1, 1) + (self.aux + self.lora_b @ self.lora_a) / nonzero

    def merged_codes(self) -> torch.Tensor:
        """``U_int * W_int``: integer (float-typed) codes of the merged weight, STE through ``U``."""
        qmax = grid.code_max(self.lora_bits)
        u = torch.clamp(round_ste(self.updates() / self.u_scale) + self.u_zero, 0, qmax)
        return (u - self.u_zero) * self.w_int

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (self.u_scale * self.merged_codes()).view(w.shape)

    @torch.no_grad()
    def merge(self, layer: QuantMixin) -> WeightQuantizer:
        """A plain symmetric per-channel quantizer holding the merged integer codes exactly."""
        codes = self.merged_codes()
        bits = max(2, math.ceil(math.log2(float(codes.abs().max()) + 1)) + 1)
        spec = QuantSpec(**{**self.spec_fields(layer), "w_bits": min(bits, 8)})
        merged = WeightQuantizer(spec, self.weight_shape).to(codes.device)
        merged.bits = bits  # may exceed the 8 bits a recipe spec allows: U_int * W_int is wider
        merged.scale.copy_(self.u_scale.view(-1, 1, 1))
        merged.zero_point.fill_(float(1 << (bits - 1)))
        layer.weight.copy_((self.u_scale * codes).view(self.weight_shape))
        return merged

    @staticmethod
    def spec_fields(layer: QuantMixin) -> dict:
        return {**layer.spec.model_dump(), "w_granularity": "channel", "group_size": None,
                "w_symmetric": True, "w_format": "int"}


def laplace(shape: torch.Size, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Laplace(0, scale) samples by inverting the CDF (torch.distributions takes no generator)."""
    u = torch.rand(shape, generator=generator) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7))


@register("efficientdm")
class EfficientDM(Quantizer):
    """LoRA on quantized weights (QALoRA) + temporal activation LSQ, distilled and merged."""

    paper = "He et al., EfficientDM (ICLR 2024); QA-LoRA variant: Xu et al. (ICLR 2024)"

    class Config(FineTuneConfig):
        optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
        schedule: Literal["cosine", "linear"] = "linear"
        rank: int = Field(32, ge=1, description="LoRA rank")
        lora_lr: float | None = Field(
            None, gt=0, description="LoRA learning rate; null: mean weight step size / 2500 per layer"
        )
        scale_lr: float = Field(1e-6, ge=0, description="learning rate of the weight step sizes")
        act_lr: float = Field(5e-4, ge=0, description="learning rate of the activation step sizes")
        temporal: bool = Field(True, description="one activation step size per timestep (TALSQ)")
        merge: Literal["requant", "zero_point"] = Field(
            "requant", description="requant: EfficientDM's Q(W + BA); zero_point: QA-LoRA (group grids)"
        )
        init: InitMode = Field("auto", description="auto: earlier stage's ranges, else MSE clipping")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        acts = use_temporal_acts(ctx) if cfg.temporal else use_lsq_acts(ctx)
        groups = [{"params": acts, "lr": cfg.act_lr}]
        layers = layers_with_weights(ctx)
        gen = torch.Generator().manual_seed(cfg.seed)
        for layer in layers.values():
            if cfg.merge == "zero_point":
                wq = GroupLoRAQuantizer.from_layer(layer, cfg.rank, gen)
            else:
                wq = QALoRAQuantizer.from_layer(layer, cfg.rank, gen)
                groups.append({"params": [wq.scale], "lr": cfg.scale_lr})
            lora_lr = cfg.lora_lr or float(wq.scale.detach().mean()) / 2500
            groups.append({"params": [wq.lora_a, wq.lora_b], "lr": lora_lr})
            layer.weight_quantizer = wq
        with recompute_weights(list(layers.values())):
            fine_tune(ctx, self.name, groups, cfg, distill_loss(ctx))
        for layer in layers.values():
            layer.weight_quantizer = layer.weight_quantizer.merge(layer)
        freeze_quantizers(ctx)


@register("intlora")
class IntLoRA(Quantizer):
    """IntLoRA-MUL: adapters on the step size, merged into integer weight codes."""

    paper = "Guo et al., IntLoRA: Integral Low-rank Adaptation of Quantized Diffusion Models (2024)"

    class Config(FineTuneConfig):
        rank: int = Field(4, ge=1, description="LoRA rank")
        lora_bits: int = Field(8, ge=2, le=8, description="bits of the quantized step-size update U")
        alpha: float = Field(1.5, gt=0, description="exponent of the auxiliary-matrix rescaling")
        lr: float = Field(1e-4, gt=0, description="learning rate of the adapters")
        init: InitMode = Field("auto", description="activation ranges: earlier stage's, else MSE clipping")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        gen = torch.Generator().manual_seed(cfg.seed)
        layers = layers_with_weights(ctx)
        params = []
        for layer in layers.values():
            wq = IntLoRAQuantizer(layer.spec, layer.weight, cfg.rank, cfg.lora_bits, cfg.alpha, gen)
            layer.weight_quantizer = wq
            params += [wq.lora_a, wq.lora_b]
        with recompute_weights(list(layers.values())):
            fine_tune(ctx, self.name, [{"params": params, "lr": cfg.lr}], cfg, distill_loss(ctx))
        for layer in layers.values():
            layer.weight_quantizer = layer.weight_quantizer.merge(layer)
