"""APQ-DM: distribution-aware activation quantization, one grid per searched group of timesteps.

Activation distributions differ across timesteps, yet a grid per timestep would overfit the few
calibration inputs of each step. APQ-DM partitions the timesteps into groups that share a
quantization function, and finds the partition by differentiable search:

* every quantized activation has G group grids ``Q_g`` (step ``s_g``, zero point ``z_g``) and, for
  every timestep ``t``, importance weights ``pi_t = softmax(alpha_t)`` over the groups;
* during the search an activation at timestep ``t`` is quantized by all groups in parallel and the
  results are mixed, ``x_hat = sum_g pi_t,g Q_g(x)``; the group steps and the importance weights are
  optimized jointly on the quantization error, with the entropy of the importance weights as a
  regulariser, which drives each ``pi_t`` towards one group;
* after the search timestep ``t`` belongs to group ``argmax_g pi_t,g``, and at sampling time it uses
  that group's grid alone (a ``TimestepActQuantizer`` lookup, no overhead).

How this is set up here: the groups start as G contiguous runs of the sampler's timesteps, each with
the L_p-searched clipping range (``mse_clip``'s search) of the inputs of its timesteps, and with
(nearly) uniform importance weights (the authors' code fills ``alpha`` with one constant; here each
timestep's starting group gets a 0.01 edge, which only decides an inconclusive search); the
quantization error minimized is BRECQ's block-output reconstruction loss (``methods.brecq``, block
by block, everything quantized, ``L_2.4``, Adam with cosine decay); G = 8 as in the authors' code
(``group_num``). A timestep absent from the calibration set joins the group of the nearest present
one. The weight of the entropy term and the learning rate of ``alpha`` are our choices (the
sources available to us do not give them). Zero points stay fixed, as in the other learned-step
stages.

Partial: composite activation quantizers (``qdiff_split``'s two-part grids) keep their static
grids, and weights keep the ranges of an earlier quantize stage, or get ``mse_clip``'s (``init``).
APQ-DM's second part, the structural-risk-minimization selection of the timesteps at which
calibration images are generated, is the calibration sampler ``apq_dm_srm``
(``methods/apq_dm_srm.py``): compose the two for the whole method (any other calibration stage also
works). The authors interleave that selection with this search; here the calibration set is fixed
before any quantizer runs, so ``apq_dm_srm`` drives its choice with a search of its own, and this
stage searches afresh on the inputs it chose.

Paper: C. Wang, Z. Wang, X. Xu, Y. Tang, J. Zhou, J. Lu, "Towards Accurate Post-training
Quantization for Diffusion Models", CVPR 2024 (arXiv:2305.18723). Code:
https://github.com/ChangyuanWang17/APQ-DM (``utils/quant_util.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from qsearch.calibration import CalibrationSet, input_hooks
from qsearch.quant.quantizers import ActQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer, StageConfig

from methods.brecq import ActTraining, Reconstruction, Unit, calibration_subset
from methods.clipping import search_act_clipping
from methods.lsq import ensure_ranges, timestep_index
from methods.tdq import TimestepActQuantizer, per_example


TIE_BREAK = 0.01
"""Logit edge of a timestep's starting group: the mixture starts (nearly) uniform, as the authors' code
(``alpha`` filled with 0.01), but a timestep whose search stays inconclusive keeps its contiguous
starting group instead of an arbitrary one."""


class GroupSearchActQuantizer(TimestepActQuantizer):
    """G group grids mixed by per-timestep importance weights (the search), then one group per t."""

    def __init__(
        self, spec: QuantSpec, timesteps: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
        initial: torch.Tensor | None = None,
    ) -> None:
        """``initial`` (K,): each timestep's starting group, favoured by ``TIE_BREAK`` in its logits."""
        k = len(timesteps)
        super().__init__(spec, timesteps, scale, zero_point, torch.zeros(k, dtype=torch.long))
        alpha = torch.zeros(k, scale.numel())
        if initial is not None:
            alpha[torch.arange(k), initial.long()] = TIE_BREAK
        self.alpha: nn.Parameter | None = nn.Parameter(alpha.to(self.timesteps.device))
        self.register_buffer("seen", torch.zeros(k, dtype=torch.bool, device=self.timesteps.device))

    def reconstruction_parameters(self) -> Iterator[torch.Tensor]:
        """Group steps and importance logits while searching (none afterwards)."""
        return iter((self.scale, self.alpha)) if self.alpha is not None else iter(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.batch_index(x.shape[0])
        if self.alpha is None:
            return self.quantize_at(x, idx)
        self.seen[idx] = True
        weights = torch.softmax(self.alpha[idx], dim=-1)  # (B, G)
        return sum(
            per_example(weights[:, g], x) * self.fake_quant(x, self.scale[g], self.zero_point[g])
            for g in range(self.scale.numel())
        )

    def entropy(self) -> torch.Tensor:
        """Mean entropy of the importance weights of the timesteps seen so far."""
        h = importance_entropy(self.alpha)
        return (h * self.seen).sum() / self.seen.sum().clamp_min(1)

    @torch.no_grad()
    def assign(self) -> None:
        """End the search: each timestep to its most important group (unseen: nearest seen's)."""
        if self.alpha is None:
            return
        seen = self.seen.nonzero().squeeze(1)
        if seen.numel() == 0:
            raise RuntimeError("the group search saw no timestep: no calibration input reached this layer")
        group = self.alpha.argmax(-1)
        nearest = seen[timestep_index(self.timesteps[seen], self.timesteps)]
        self.group_of.copy_(group[nearest])
        self.alpha = None
        del self.seen


def importance_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the importance weights ``softmax(logits)`` over the groups (last axis)."""
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def contiguous_groups(k: int, groups: int) -> torch.Tensor:
    """Initial partition: G runs of consecutive sampler timesteps (group of each of the K steps)."""
    return torch.arange(k) * groups // k


@torch.no_grad()
def rows_by_timestep(
    ctx: QuantContext, quantizers: dict[str, nn.Module], calib: CalibrationSet, max_rows: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_rows`` input rows per quantizer, each with the index of its sampler timestep."""
    timesteps = ctx.sampler.timesteps.to(ctx.device)
    per_example = max(1, max_rows // max(len(calib), 1))
    g = torch.Generator().manual_seed(seed)
    store: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in quantizers}
    current: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        rows = x.permute(0, 2, 3, 1).flatten(1, 2) if x.dim() == 4 else x.reshape(x.shape[0], -1, x.shape[-1])
        pick = torch.randint(rows.shape[1], (rows.shape[0], per_example), generator=g).to(rows.device)
        chosen = torch.gather(rows, 1, pick.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
        steps = current["step"].repeat_interleave(per_example)
        store[name].append((chosen.reshape(-1, rows.shape[-1]).cpu(), steps.cpu()))

    with input_hooks(quantizers, keep):
        for x, t, cond in calib.batches(ctx.batch_size, ctx.device):
            current["step"] = timestep_index(timesteps, t)
            ctx.denoiser.forward(x, t, cond)
    return {n: (torch.cat([r for r, _ in v]), torch.cat([s for _, s in v])) for n, v in store.items() if v}


@register("apq_dm")
class APQDM(Quantizer):
    """APQ-DM: timesteps grouped by differentiable search, one activation grid per group."""

    paper = "Wang et al., Towards Accurate Post-training Quantization for Diffusion Models (CVPR 2024)"

    class Config(StageConfig):
        groups: int = Field(8, ge=1, description="activation grids per layer (authors' code: 8)")
        iters: int = Field(250, ge=0, description="search iterations per block")
        lr: float = Field(4e-4, gt=0, description="Adam learning rate of the group steps (cosine decay)")
        alpha_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the importance logits")
        entropy_weight: float = Field(0.01, ge=0, description="weight of the importance-weight entropy")
        p: float = Field(2.4, gt=0, description="L_p norm of the block reconstruction loss")
        batch_size: int = Field(32, ge=1)
        samples: int = Field(1024, ge=1, description="calibration inputs kept for the search (random subset)")
        max_rows: int = Field(4096, ge=16, description="input rows per layer for the initial group ranges")
        init: Literal["auto", "mse_clip", "keep"] = Field(
            "auto", description="starting ranges: keep an earlier quantize stage's, or mse_clip's"
        )
        seed: int = 0

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        calib = calibration_subset(ctx, self.name, cfg.samples, cfg.seed)
        layers = {
            n: m for n, m in ctx.layers().items()
            if type(m.act_quantizer) is ActQuantizer and not m.act_quantizer.dynamic and m.act_quantizer.calibrated
        }
        timesteps = ctx.sampler.timesteps.to(ctx.device)
        groups = min(cfg.groups, len(timesteps))
        chunk = contiguous_groups(len(timesteps), groups)
        rows = rows_by_timestep(ctx, {n: m.act_quantizer for n, m in layers.items()}, calib, cfg.max_rows, cfg.seed)
        ratios = torch.linspace(0.3, 1.0, 40, device=ctx.device)  # mse_clip's default search
        searched: list[GroupSearchActQuantizer] = []
        for name, layer in layers.items():
            old = layer.act_quantizer
            scale, zero = old.scale.repeat(groups), old.zero_point.repeat(groups)
            x, step = rows.get(name, (torch.empty(0), torch.empty(0, dtype=torch.long)))
            for g in range(groups):
                part = x[chunk[step] == g].to(ctx.device)
                if part.numel():
                    scratch = ActQuantizer(layer.spec).to(ctx.device)
                    search_act_clipping(scratch, part, ratios, 2.4)
                    scale[g], zero[g] = scratch.scale, scratch.zero_point
            layer.act_quantizer = GroupSearchActQuantizer(layer.spec, timesteps, scale, zero, chunk)
            searched.append(layer.act_quantizer)

        def entropy_of(unit: Unit):
            qs = [m.act_quantizer for m in unit.layers.values() if isinstance(m.act_quantizer, GroupSearchActQuantizer)]
            return (lambda: cfg.entropy_weight * sum(q.entropy() for q in qs)) if qs else None

        rec = Reconstruction.prepare(ctx, self.name, cfg.samples, cfg.seed)
        rec.activations(
            ActTraining(cfg.iters, cfg.lr, cfg.p, cfg.batch_size, cfg.seed),
            regularizer_for=entropy_of, lr_of={id(q.alpha): cfg.alpha_lr for q in searched},
        )
        for q in searched:
            q.assign()
        rec.report["groups"] = {n: m.act_quantizer.group_of.tolist() for n, m in layers.items()}
