"""TuneQDM: fine-tune only the quantization scales, separable per output and input channel, with one
set of scales per timestep interval.

Ryu et al., "Memory-Efficient Fine-Tuning for Quantized Diffusion Model", ECCV 2024
(https://arxiv.org/abs/2401.04339; code https://github.com/ugonfor/TuneQDM). The integer weights are
frozen; the dequantized weight is ``W^ = (W_int - z) * s_out[e] * s_in[e]``:

* **multi-channel-wise scale update**: the PEQA baseline trains only the per-output-channel scale
  ``s_out``; TuneQDM also trains a per-input-channel scale ``s_in`` (initialised to 1), so the
  update can follow the inter-channel patterns that full fine-tuning shows;
* **timestep-aware scales**: ``num_experts`` copies of both scales (4 in the authors' script), the
  copy ``e = floor(t * N / T)`` serving timesteps ``t`` of its interval (``T``: training timesteps).

Only the scales get gradients (biases optionally), hence the small memory footprint. Every training
mini-batch is drawn from one timestep interval, since a layer computes with one weight per call;
``dataset`` inputs are not supported by this stage. Learning rate: the authors' 3e-6 is for
DreamBooth personalisation (400 steps at batch 1); for recovering quantization error by distilling
the FP model here, 1e-4 is the default. Activations are quantized as the recipe says, with the
ranges of the earlier stages, and not trained (TuneQDM is weight-only). Storage: ``num_experts``
step sizes per output channel and per input channel, in fp16 (counted by the bits accounting).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from qsearch.calibration import CalibrationSet
from qsearch.models import current_timestep
from qsearch.quant import grid
from qsearch.quant.modules import QuantMixin
from qsearch.quant.quantizers import WeightQuantizer
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer

from methods.lsq import (
    Batch,
    FineTuneConfig,
    InitMode,
    InputPool,
    distill_loss,
    ensure_ranges,
    fine_tune,
    layers_with_weights,
    recompute_weights,
    trajectory_inputs,
)


def expert_index(t: torch.Tensor, experts: int, train_steps: int) -> torch.Tensor:
    """``floor(t * N / T)``, clipped to ``[0, N - 1]``."""
    return torch.clamp(t.long() * experts // train_steps, 0, experts - 1)


class TuneQDMQuantizer(WeightQuantizer):
    """Frozen codes; ``(q - z) * s_out[e] * s_in[e]`` with expert ``e`` chosen by the timestep."""

    def __init__(self, layer: QuantMixin, experts: int, train_steps: int) -> None:
        super().__init__(layer.spec, layer.weight.shape)
        if self.format != "int" or self.bits < 2:
            raise ValueError("TuneQDM fine-tunes the scales of integer grids of 2 bits or more")
        base = layer.weight_quantizer
        self.to(layer.weight.device)
        self.experts, self.train_steps = experts, train_steps
        with torch.no_grad():
            self.zero_point.copy_(base.zero_point)
            # the frozen codes are re-derived from the unchanged weight on the original grid
            self.register_buffer("base_scale", base.scale.detach().clone())
        self._buffers.pop("scale")
        self.scale = nn.Parameter(base.scale.detach().unsqueeze(0).repeat(experts, 1, 1, 1))
        self.in_scale = nn.Parameter(torch.ones(experts, layer.weight.shape[1], device=layer.weight.device))
        self._expert: int | None = None

    def expert(self) -> int:
        """The expert of the current denoiser call (remembered for checkpoint recomputation)."""
        t = current_timestep.get()
        if t is not None:
            e = expert_index(t, self.experts, self.train_steps)
            if bool((e != e[0]).any()):
                raise ValueError("a TuneQDM layer computes with one expert per call: batch one interval")
            self._expert = int(e[0])
        if self._expert is None:
            raise RuntimeError("TuneQDM quantizer used outside a denoiser call")
        return self._expert

    def dequantize(self, codes: torch.Tensor, e: int) -> torch.Tensor:
        g, pad = self.grouped(codes)
        w = grid.ungroup((g - self.zero_point) * self.scale[e], pad, codes.shape)
        return w * self.in_scale[e].view((1, -1) + (1,) * (codes.dim() - 2))

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """The frozen integer codes: ``w`` on the original grid (fine-tuning changes only scales)."""
        g, pad = self.grouped(w.detach())
        return grid.ungroup(grid.int_encode(g, self.base_scale, self.zero_point, self.bits), pad, w.shape)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return self.dequantize(q, self.expert())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.encode(w), self.expert())

    @torch.no_grad()
    def round_for_export(self) -> None:
        self.scale.copy_(grid.to_fp16_grid(self.scale))
        self.in_scale.copy_(self.in_scale.half().float())


def drop_cached_weight(layer: QuantMixin, _args) -> None:
    """Forward pre-hook: the layer's weight depends on the timestep, so its cache must not serve.

    The core caches a layer's quantized weight keyed on tensor versions only; a timestep-dependent
    weight quantizer needs it recomputed on every call.
    """
    layer._cache_key = None


class IntervalPool(InputPool):
    """Trajectory inputs, each mini-batch from one expert's timestep interval (chosen uniformly)."""

    def __init__(self, inputs: CalibrationSet, experts: int, train_steps: int) -> None:
        self.inputs = inputs
        owner = expert_index(inputs.t, experts, train_steps)
        self.members = [(owner == e).nonzero().squeeze(1) for e in range(experts)]
        self.members = [m for m in self.members if len(m)]

    def batch(self, size: int, generator: torch.Generator, device: torch.device) -> Batch:
        members = self.members[int(torch.randint(len(self.members), (1,), generator=generator))]
        idx = members[torch.randint(len(members), (size,), generator=generator)]
        x, t, cond = next(self.inputs.subset(idx).batches(size, device))
        return x, t, cond, None


@register("tuneqdm")
class TuneQDM(Quantizer):
    """Scale-only fine-tuning: per-output x per-input channel scales, one set per timestep interval."""

    paper = "Ryu et al., Memory-Efficient Fine-Tuning for Quantized Diffusion Model (ECCV 2024)"

    class Config(FineTuneConfig):
        lr: float = Field(1e-4, gt=0, description="learning rate of the scales")
        num_experts: int = Field(4, ge=1, description="timestep intervals with their own scales (TAS)")
        train_in_scale: bool = Field(True, description="also train the per-input-channel scale")
        train_bias: bool = Field(False, description="also train the biases")
        init: InitMode = Field("auto", description="auto: earlier stage's ranges, else MSE clipping")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        if cfg.dataset:
            raise ValueError("tuneqdm draws interval-wise batches from the trajectory; no dataset")
        ensure_ranges(ctx, cfg.init)
        train_steps = ctx.sampler.num_train_timesteps
        layers = layers_with_weights(ctx)
        params = []
        for layer in layers.values():
            wq = TuneQDMQuantizer(layer, cfg.num_experts, train_steps)
            layer.weight_quantizer = wq
            layer.register_forward_pre_hook(drop_cached_weight)
            params.append(wq.scale)
            if cfg.train_in_scale:
                params.append(wq.in_scale)
            if cfg.train_bias and layer.bias is not None:
                params.append(layer.bias)
        inputs = ctx.require_calibration(self.name) if cfg.data == "calibration" else trajectory_inputs(ctx)
        pool = IntervalPool(inputs, cfg.num_experts, train_steps)
        with recompute_weights(list(layers.values())):
            fine_tune(ctx, self.name, [{"params": params, "lr": cfg.lr}], cfg, distill_loss(ctx), pool=pool)
        for layer in layers.values():
            layer.weight_quantizer.round_for_export()
