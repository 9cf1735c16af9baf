"""Q-DM: timestep-aware quantization (TaQ) and noise-estimating mimicking (NeM).

Li, Xu, Cao, Sun and Zhang, "Q-DM: An Efficient Low-bit Quantized Diffusion Model", NeurIPS 2023
(proceedings.neurips.cc, NeurIPS 2023 papers). No code was released. The paper finds two bottlenecks of low-bit QAT of diffusion models: the
activation distribution *oscillates* across timesteps, and quantization error *accumulates* along
the denoising steps. Its answers, as implemented here:

* **TaQ**: each quantized activation is normalized with statistics of its own timestep before the
  quantizer, ``x~ = (x - mu_t) / sigma_t``, quantized with one learned LSQ step size on the now
  timestep-stable distribution, and de-normalized, ``x^ = sigma_t Q(x~) + mu_t``. ``mu_t, sigma_t``
  are per-tensor statistics of the layer input at each sampler timestep, measured before training
  by running the quantized model (weights quantized, the other activation quantizers as calibrated:
  what the layer sees at inference) on the FP trajectory inputs, and then fixed (deployment: a
  per-timestep step ``sigma_t s`` and offset ``mu_t``, stored in fp16).
* **NeM**: the quantized noise estimator mimics the FP one, ``L_NeM = ||eps_FP(x_t,t) - eps_Q(x_t,t)||^2``
  on inputs along the FP sampling trajectory (all timesteps), added to the usual denoising loss
  ``||eps - eps_Q||^2`` when a ``dataset`` is given (``L = L_simple + nem_weight * L_NeM``), alone
  otherwise (data-free).
* Training is LSQ-based QAT of the whole network (weights, weight step sizes, TaQ step sizes).

Partial / unverified: the paper's full text was not available here (only its abstract and method
summary); the TaQ normalization statistics (per tensor, per sampler timestep, measured once) and
the NeM form above are reconstructed from that summary, not checked against the paper's equations.
The paper trains with DDPM's own settings (dataset images, every training timestep, long
schedules); the recipes here fine-tune for minutes on the sampler's timesteps, data-free.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from pydantic import Field

from qsearch.calibration import as_rows, input_hooks, run_calibration
from qsearch.models import current_timestep
from qsearch.quant.quantizers import ActQuantizer
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer

from methods.clipping import search_act_clipping
from methods.lsq import (
    Batch,
    FineTuneConfig,
    InitMode,
    LSQActQuantizer,
    ensure_ranges,
    fine_tune,
    freeze_quantizers,
    static_act_layers,
    teacher_eps,
    timestep_index,
    trajectory_inputs,
    use_lsq_weights,
)


class TaQActQuantizer(LSQActQuantizer):
    """``x^ = sigma_t * Q((x - mu_t) / sigma_t) + mu_t`` with one learned step size for ``Q``."""

    def __init__(self, spec, timesteps: torch.Tensor) -> None:
        super().__init__(spec)
        steps = len(timesteps)
        self.register_buffer("timesteps", timesteps.detach().clone().float())
        self.register_buffer("mean", torch.zeros(steps))
        self.register_buffer("std", torch.ones(steps))
        self._index: torch.Tensor | None = None

    def index(self, batch: int) -> torch.Tensor:
        """Timestep index per example (remembered for gradient-checkpointing recomputation)."""
        t = current_timestep.get()
        if t is not None:
            idx = timestep_index(self.timesteps, t.to(self.timesteps.device))
            self._index = idx.expand(batch) if idx.numel() == 1 else idx
        if self._index is None:
            raise RuntimeError("TaQ quantizer called outside a denoiser call")
        return self._index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            return x
        idx = self.index(x.shape[0])
        view = (-1,) + (1,) * (x.dim() - 1)
        mu, sigma = self.mean[idx].view(view), self.std[idx].view(view)
        return sigma * self.fake_quant((x - mu) / sigma, self.step_size(x), self.zero_point) + mu

    @torch.no_grad()
    def round_for_export(self) -> None:
        """Step size and statistics to fp16, as export stores them."""
        super().round_for_export()
        self.mean.copy_(self.mean.half().float())
        self.std.copy_(self.std.half().float())


@torch.no_grad()
def timestep_statistics(
    ctx: QuantContext, names: list[str], samples_per_step: int, max_rows: int = 4096
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-timestep mean and std of each named layer's quantizer input, and normalized rows.

    Runs the quantized model (activation quantizers still as calibrated) on the first
    ``samples_per_step`` pool samples at every sampler timestep. Returns ``(mean, std, rows)``:
    ``(T,)`` statistics per layer and up to ``max_rows`` normalized input rows per layer.
    """
    layers = ctx.layers()
    quantizers = {n: layers[n].act_quantizer for n in names}
    timesteps = ctx.sampler.timesteps.to(ctx.device)
    steps = len(timesteps)
    inputs = trajectory_inputs(ctx)
    keep = torch.arange(len(inputs)) % ctx.trajectory.num_samples < samples_per_step
    calib = inputs.subset(keep.nonzero().squeeze(1))
    acc = {n: torch.zeros(3, steps, dtype=torch.float64, device=ctx.device) for n in names}

    def accumulate(name: str, x: torch.Tensor) -> None:
        idx = timestep_index(timesteps, current_timestep.get().to(ctx.device))
        flat = x.detach().double().reshape(x.shape[0], -1)
        idx = idx.expand(x.shape[0]) if idx.numel() == 1 else idx
        a = acc[name]
        a[0].index_add_(0, idx, torch.full_like(idx, flat.shape[1], dtype=torch.float64))
        a[1].index_add_(0, idx, flat.sum(1))
        a[2].index_add_(0, idx, flat.square().sum(1))

    with input_hooks(quantizers, accumulate):
        run_calibration(ctx.denoiser, calib, ctx.batch_size)
    mean, std = {}, {}
    for n, (count, s1, s2) in acc.items():
        m = s1 / count.clamp(min=1)
        var = (s2 / count.clamp(min=1) - m.square()).clamp(min=0)
        mean[n], std[n] = m.float(), var.sqrt().float().clamp(min=1e-5)

    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    per_batch = max(1, max_rows // max(1, -(-len(calib) // ctx.batch_size)))
    gen = torch.Generator().manual_seed(ctx.seed)

    def normalized(name: str, x: torch.Tensor) -> None:
        idx = timestep_index(timesteps, current_timestep.get().to(ctx.device))
        idx = idx.expand(x.shape[0]) if idx.numel() == 1 else idx
        view = (-1,) + (1,) * (x.dim() - 1)
        z = as_rows((x.detach() - mean[name][idx].view(view)) / std[name][idx].view(view))
        rows[name].append(z[torch.randperm(z.shape[0], generator=gen)[:per_batch].to(z.device)])

    with input_hooks(quantizers, normalized):
        run_calibration(ctx.denoiser, calib, ctx.batch_size)
    return mean, std, {n: torch.cat(v)[:max_rows] for n, v in rows.items()}


def use_taq(ctx: QuantContext, samples_per_step: int) -> list[torch.nn.Parameter]:
    """Swap every calibrated static activation quantizer for TaQ; returns the step sizes."""
    layers = static_act_layers(ctx)
    mean, std, rows = timestep_statistics(ctx, list(layers), samples_per_step)
    timesteps = ctx.sampler.timesteps.to(ctx.device)
    ratios = torch.linspace(0.3, 1.0, 40, device=ctx.device)
    scales = []
    for name, layer in layers.items():
        probe = ActQuantizer(layer.spec).to(ctx.device)  # MSE range of the normalized input
        search_act_clipping(probe, rows[name].to(ctx.device), ratios, 2.4)
        taq = TaQActQuantizer(layer.spec, timesteps).to(ctx.device)
        with torch.no_grad():
            taq.mean.copy_(mean[name])
            taq.std.copy_(std[name])
            taq.scale.copy_(probe.scale)
            taq.zero_point.copy_(probe.zero_point)
        taq.calibrated = True
        layer.act_quantizer = taq
        scales.append(taq.scale)
    return scales


@register("q_dm")
class QDM(Quantizer):
    """Timestep-aware quantization (TaQ) + noise-estimating mimicking (NeM), LSQ-based QAT."""

    paper = "Li et al., Q-DM: An Efficient Low-bit Quantized Diffusion Model (NeurIPS 2023)"

    class Config(FineTuneConfig):
        lr: float = Field(1e-5, gt=0, description="learning rate of the weights")
        quant_lr: float = Field(1e-5, gt=0, description="learning rate of the step sizes")
        nem_weight: float = Field(1.0, ge=0, description="weight of L_NeM next to L_simple (dataset)")
        stat_samples: int = Field(8, ge=1, description="pool samples per timestep for TaQ statistics")
        init: InitMode = Field("auto", description="auto: earlier stage's ranges, else MSE clipping")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        scales = use_lsq_weights(ctx, init_lsq=cfg.init == "lsq") + use_taq(ctx, cfg.stat_samples)
        ids = {id(s) for s in scales}
        weights = [p for p in ctx.model.parameters() if id(p) not in ids]
        groups = [{"params": scales, "lr": cfg.quant_lr}, {"params": weights, "lr": cfg.lr}]
        fine_tune(ctx, self.name, groups, cfg, self.loss(ctx))
        freeze_quantizers(ctx)

    def loss(self, ctx: QuantContext):
        """``L_NeM``, plus ``L_simple`` when the inputs are noised dataset images."""

        def loss(batch: Batch) -> torch.Tensor:
            x, t, cond, noise = batch
            eps = ctx.denoiser.forward(x, t, cond)
            nem = F.mse_loss(eps, teacher_eps(ctx, x, t, cond))
            if noise is None:
                return nem
            return F.mse_loss(eps, noise) + self.config.nem_weight * nem

        return loss
