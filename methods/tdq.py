"""TDQ: Temporal Dynamic Quantization, activation intervals predicted from the timestep.

The activations of a diffusion model change their range along the sampling trajectory, so one
static interval per layer is a compromise over all timesteps. TDQ gives every activation quantizer
a small network that maps the timestep to the quantization interval (step size) ``s(t)``:

* input: the geometric Fourier encoding of ``t`` (sin/cos at frequencies ``10000^(-i/(d/2))``,
  ``d = 64``), the sinusoidal encoding diffusion U-Nets use for their own time embedding (the
  reference code feeds the U-Net's own, of the model's channel width: 64 for the zoo U-Net);
* network: 4 linear layers of width 64 with ReLU, then softplus, so ``s(t) > 0``;
* initialisation: the output is the interval of the static quantizer it replaces, for every ``t``
  (last layer's weight zero, its bias ``softplus^-1(s_0)``), so training starts from the static
  PTQ solution;
* training (PTQ): the networks are trained on the reconstruction loss of the PTQ method they extend;
  here BRECQ/Q-Diffusion's block-wise output reconstruction, block by block, with everything
  quantized (``methods.brecq``: ``L_2.4`` loss, Adam 4e-4 with cosine decay, as for LSQ step sizes);
  the zero point stays that of the static quantizer (TDQ varies the interval only).

Because ``t`` takes only the sampler's values, the intervals are computed once for every sampling
timestep after training and stored as a lookup table (``TimestepActQuantizer``); at sampling time
the quantizer reads the current timestep (``qsearch.models.current_timestep``) and indexes the
table, no network runs, and the networks are dropped from the model.

``TimestepActQuantizer`` (a grid per group of timesteps) also serves APQ-DM (one grid per timestep
group) and TFMQ-DM's finite-set calibration (one grid per timestep).

Differences from the paper: the reference module has a dropout (0.2) before its last layer; it is
left out (PTQ trains on a few hundred inputs and a deterministic network is what gets tabulated).
Weights are not TDQ's concern: they keep the ranges of an earlier quantize stage, or get
``mse_clip``'s when none ran (``init``).

Paper: J. So, J. Lee, D. Ahn, H. Kim, E. Park, "Temporal Dynamic Quantization for Diffusion
Models", NeurIPS 2023 (arXiv:2306.02316). Code: https://github.com/sally20921/LDM-Q
(``ldm/modules/diffusionmodules/lsq.py``: ``TDQ_Module``), linked from the paper's README.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qsearch.models import current_timestep
from qsearch.quant import grid
from qsearch.quant.modules import QuantMixin
from qsearch.quant.quantizers import ActQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer, StageConfig

from methods.brecq import ActTraining, Reconstruction
from methods.lsq import ensure_ranges, timestep_index


class TimestepActQuantizer(ActQuantizer):
    """Static activation quantizer whose grid depends on the denoising timestep (a lookup table).

    ``timesteps`` (K,) are the sampler's timesteps; ``group_of`` (K,) maps each to one of G grids
    (``scale``/``zero_point``, shape (G,)). A call at timestep ``t`` uses the grid of the nearest
    listed timestep; a batch may mix timesteps (one grid per example).
    """

    def __init__(
        self, spec: QuantSpec, timesteps: torch.Tensor, scale: torch.Tensor,
        zero_point: torch.Tensor, group_of: torch.Tensor | None = None,
    ) -> None:
        super().__init__(spec)
        if spec.a_dynamic:
            raise ValueError("a timestep-dependent grid is a static quantizer (a_dynamic must be false)")
        if group_of is None:
            group_of = torch.arange(len(timesteps))
        self.register_buffer("timesteps", timesteps.detach().float().clone())
        self.register_buffer("group_of", group_of.detach().long().to(self.timesteps.device))
        self.scale = scale.detach().float().clone().to(self.timesteps.device)
        self.zero_point = zero_point.detach().float().clone().to(self.timesteps.device)
        self.calibrated = True

    def extra_repr(self) -> str:
        return f"timesteps={len(self.timesteps)}, grids={self.scale.numel()}, " + super().extra_repr()

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise RuntimeError(
            "set_range would replace the per-timestep grids of a timestep-aware quantizer by one "
            "static grid: run range-setting stages before tdq/apq_dm/tfmq_dm, or with init: keep"
        )

    def batch_index(self, batch: int) -> torch.Tensor:
        """Index into ``timesteps`` of each example of the current denoiser call."""
        t = current_timestep.get()
        if t is None:
            raise RuntimeError("a timestep-aware quantizer was called outside a denoiser call")
        idx = timestep_index(self.timesteps, t.to(self.timesteps.device).reshape(-1))
        if idx.numel() == batch:
            return idx
        if idx.numel() == 1:
            return idx.expand(batch)
        raise ValueError(f"input batch {batch} does not match the {idx.numel()} current timesteps")

    def quantize_at(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``x`` quantized on the grid of each example's timestep (``idx`` into ``timesteps``)."""
        group = self.group_of[idx]
        return self.fake_quant(x, per_example(self.scale[group], x), per_example(self.zero_point[group], x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_at(x, self.batch_index(x.shape[0]))


def per_example(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) vector shaped to broadcast over the batch dimension of ``x``."""
    return v.view((-1,) + (1,) * (x.dim() - 1))


def fourier_encoding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Geometric Fourier (sinusoidal) features of ``t``: ``[sin(t w_i), cos(t w_i)]``, ``w_i`` geometric."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class IntervalNet(nn.Module):
    """TDQ's module: Fourier(t) -> 4 linear layers (ReLU) -> softplus = quantization interval."""

    def __init__(self, initial: float, encoding: int = 64, hidden: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.encoding = encoding
        widths = [encoding] + [hidden] * (layers - 1)
        blocks: list[nn.Module] = []
        for i in range(layers - 1):
            blocks += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
        last = nn.Linear(widths[-1], 1)
        with torch.no_grad():  # the static interval for every t at the start
            last.weight.zero_()
            last.bias.fill_(math.log(math.expm1(initial)))
        self.net = nn.Sequential(*blocks, last)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.net(fourier_encoding(t, self.encoding))).squeeze(-1)


class TDQActQuantizer(TimestepActQuantizer):
    """A static quantizer whose interval comes from ``IntervalNet(t)`` while trained, then from a table."""

    def __init__(
        self, spec: QuantSpec, timesteps: torch.Tensor, scale: float, zero_point: float,
        encoding: int = 64, hidden: int = 64,
    ) -> None:
        k = len(timesteps)
        super().__init__(spec, timesteps, torch.full((k,), scale), torch.full((k,), zero_point))
        self.interval: IntervalNet | None = IntervalNet(scale, encoding, hidden).to(self.timesteps.device)

    def reconstruction_parameters(self) -> Iterator[nn.Parameter]:
        """The interval network's weights (none once tabulated)."""
        return iter(self.interval.parameters()) if self.interval is not None else iter(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.batch_index(x.shape[0])
        if self.interval is None:
            return self.quantize_at(x, idx)
        scale = self.interval(self.timesteps[idx])
        return self.fake_quant(x, per_example(scale, x), per_example(self.zero_point[idx], x))

    @torch.no_grad()
    def tabulate(self) -> None:
        """Intervals of every sampler timestep into the table (fp16, as exported); drop the network."""
        if self.interval is None:
            return
        self.scale.copy_(grid.to_fp16_grid(self.interval(self.timesteps)))
        self.interval = None


def static_grids(layer: QuantMixin) -> list[tuple[nn.Module, str, ActQuantizer]]:
    """``(parent, name, quantizer)`` of every plain static ``ActQuantizer`` of a layer's input.

    The layer's own, or the parts of a composite quantizer (e.g. a split quantizer's two halves).
    """
    found = []
    aq = layer.act_quantizer
    if aq is None:
        return found
    if type(aq) is ActQuantizer:
        return [(layer, "act_quantizer", aq)] if (not aq.dynamic and aq.calibrated) else []
    for parent in aq.modules():
        for name, child in parent.named_children():
            if type(child) is ActQuantizer and not child.dynamic and child.calibrated:
                found.append((parent, name, child))
    return found


@register("tdq")
class TDQ(Quantizer):
    """TDQ: each activation interval predicted from t by a small MLP, tabulated per sampler timestep."""

    paper = "So et al., Temporal Dynamic Quantization for Diffusion Models (NeurIPS 2023)"

    class Config(StageConfig):
        iters: int = Field(250, ge=0, description="training iterations per block (BRECQ's act phase: 5000)")
        lr: float = Field(4e-4, gt=0, description="Adam learning rate of the interval networks (cosine decay)")
        p: float = Field(2.4, gt=0, description="L_p norm of the block reconstruction loss")
        batch_size: int = Field(32, ge=1)
        samples: int = Field(1024, ge=1, description="calibration inputs kept for training (random subset)")
        encoding: int = Field(64, ge=2, description="dimension of the Fourier encoding of t")
        hidden: int = Field(64, ge=1, description="width of the interval network")
        init: Literal["auto", "mse_clip", "keep"] = Field(
            "auto", description="starting ranges: keep an earlier quantize stage's, or mse_clip's"
        )
        seed: int = 0

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        timesteps = ctx.sampler.timesteps.to(ctx.device)
        quantizers: list[TDQActQuantizer] = []
        for layer in ctx.layers().values():
            for parent, name, old in static_grids(layer):
                new = TDQActQuantizer(
                    layer.spec, timesteps, float(old.scale), float(old.zero_point), cfg.encoding, cfg.hidden
                )
                setattr(parent, name, new)
                quantizers.append(new)
        rec = Reconstruction.prepare(ctx, self.name, cfg.samples, cfg.seed)
        rec.activations(ActTraining(cfg.iters, cfg.lr, cfg.p, cfg.batch_size, cfg.seed))
        for q in quantizers:
            q.tabulate()
