"""PTQ4DiT: channel-wise salience balancing, calibrated over timesteps by Spearman's rho.

Wu, Wang, Shang, Shah & Yan, "PTQ4DiT: Post-training Quantization for Diffusion Transformers",
NeurIPS 2024 (arXiv 2405.16005); authors' code: https://github.com/adreamwu/PTQ4DiT.

In DiT linears a few input channels carry extreme values ("salient channels"), in the activations *or*
in the weights, rarely in both: the two are complementary. PTQ4DiT moves salience between them.

* **Salience** of input channel ``j``: ``s(X_j) = max|X_j|`` over tokens, ``s(W_j) = max|W_j|`` over
  output channels (for ``to_q/to_k/to_v``, which read the same input, over the fused QKV weight).
* **Channel-wise Salience Balancing (CSB)**: ``X~ = X B``, ``W~ = B^-1 W`` with the diagonal
  ``B = diag(b_j)``, ``b_j = sqrt(s(X_j) s(W_j)) / s(X_j)``. Then ``s(X~_j) = s(W~_j) =
  sqrt(s(X_j) s(W_j))``: both operands get the geometric mean of the two saliences, and the product
  ``X W`` is unchanged.
* **Spearman's-rho-guided Salience Calibration (SSC)**: activation salience changes over the denoising
  steps; the complementarity matters most where activation and weight salience are least alike. With
  ``rho_t`` Spearman's rank correlation between ``s(X^(t))`` and ``s(W)`` over channels, the timesteps
  are weighted ``eta_t = exp(-rho_t) / sum_tau exp(-rho_tau)`` and CSB uses the calibrated salience
  ``s_rho(X_j) = sum_t eta_t s(X_j^(t))``.
* **Re-parameterization** (no inference cost): the ``B`` of the post-adaLN linears (QKV, FC1, DiT's
  final projection) is folded into the adaLN modulation that produces their input
  (``(1 + scale) * b - 1`` and ``shift * b``, i.e. rows and bias of the adaLN linear); the ``B`` of the
  attention output projection into the rows of ``to_v`` (``softmax(QK^T) (V B) = (softmax(QK^T) V) B``).
  ``B^-1`` goes into the layer's weight.

Where no preceding layer can absorb ``B`` (FC2 after the GELU; PixArt's adaLN-single, whose modulation
is shared by all blocks; cross-attention inputs) the scaling is the layer's exact ``pre`` transform
(one elementwise multiply at run time).

This module also holds the balancing machinery that DiTAS and ViDiT-Q reuse: detection of the layers
that read one input tensor, per-timestep input statistics of the full-precision model, and folding of
a per-channel multiplier into a preceding layer or a ``pre``.

What is partial: the authors' pipeline follows CSB/SSC with BRECQ-style block reconstruction
(AdaRound weights, learned activation steps); that is a separate quantize stage, not part of this
reparameterizer (the benchmark rows use MSE-searched ranges, the authors' range initialization).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from pydantic import Field
from torch import nn

from qsearch.calibration import as_rows, input_hooks, run_calibration
from qsearch.quant.apply import quantizable_layers
from qsearch.quant.modules import QuantMixin, full_precision
from qsearch.registry import register
from qsearch.stages import QuantContext, Reparameterizer, StageConfig

# Linears of DiT blocks (attention projections, feed-forward) and the final projections of DiT
# (proj_out_2) and PixArt (proj_out): the layers PTQ4DiT, DiTAS and ViDiT-Q balance.
DIT_LINEARS = ("*attn*.to_*", "*ff.net.*", "proj_out", "proj_out_2")

SALIENCE_FLOOR = 1e-5  # dead channels (max |x| = 0) would make the balancing factor 0 or inf


class ChannelScale(nn.Module):
    """``x * multiplier`` over the channel (last) axis; the layer's weight holds ``W / multiplier``."""

    def __init__(self, multiplier: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("multiplier", multiplier.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.multiplier.to(x.dtype)


def append_pre(layer: QuantMixin, transform: nn.Module) -> None:
    """Add ``transform`` after the layer's existing input transform (if any)."""
    layer.pre = transform if layer.pre is None else nn.Sequential(layer.pre, transform)


class Absorber(Protocol):
    """A preceding layer that can multiply the balanced layers' input channels by a vector."""

    def fold(self, multiplier: torch.Tensor) -> None: ...


@dataclass
class ModulationFold:
    """adaLN modulation ``norm(x) * (1 + scale) + shift`` computed by ``linear`` (chunks of its output).

    Multiplying the modulated tensor by ``m`` is ``scale <- scale * m + m - 1``, ``shift <- shift * m``:
    the rows (and bias) of those two chunks of the linear.
    """

    linear: nn.Linear
    shift_chunk: int
    scale_chunk: int
    chunks: int

    @torch.no_grad()
    def fold(self, multiplier: torch.Tensor) -> None:
        d = multiplier.numel()
        if self.linear.out_features != self.chunks * d:
            raise ValueError(f"adaLN linear has {self.linear.out_features} outputs, not {self.chunks} x {d}")
        w, b, m = self.linear.weight, self.linear.bias, multiplier.to(self.linear.weight)
        shift = slice(self.shift_chunk * d, (self.shift_chunk + 1) * d)
        scale = slice(self.scale_chunk * d, (self.scale_chunk + 1) * d)
        w[shift] *= m[:, None]
        b[shift] *= m
        w[scale] *= m[:, None]
        b[scale] = b[scale] * m + (m - 1)


@dataclass
class ValueFold:
    """The value projection of an attention: its output channels are the output projection's input."""

    to_v: nn.Linear

    @torch.no_grad()
    def fold(self, multiplier: torch.Tensor) -> None:
        m = multiplier.to(self.to_v.weight)
        self.to_v.weight *= m[:, None]
        if self.to_v.bias is not None:
            self.to_v.bias *= m


def _plain_attention(attn: nn.Module) -> bool:
    """A diffusers attention computing ``to_out(softmax(q k^T) v)`` on its raw input, nothing else."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (
        type(attn.processor) in (AttnProcessor, AttnProcessor2_0)
        and getattr(attn, "spatial_norm", None) is None
        and getattr(attn, "group_norm", None) is None
        and not getattr(attn, "residual_connection", False)
        and getattr(attn, "added_kv_proj_dim", None) is None
        and isinstance(attn.to_v, nn.Linear)
    )


def find_absorbers(model: nn.Module) -> dict[frozenset[str], Absorber]:
    """Preceding layers that can absorb a balancing vector, keyed by the set of layers they feed.

    Recognized: adaLN-Zero modulation of DiT blocks (QKV of ``attn1``, FC1) and of DiT's final layer
    (``proj_out_2``), and the value projection of a plain attention (its ``to_out.0``).
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    found: dict[frozenset[str], Absorber] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, Attention) and _plain_attention(mod):
            found[frozenset({f"{prefix}to_out.0"})] = ValueFold(mod.to_v)
        if (
            isinstance(mod, BasicTransformerBlock) and mod.norm_type == "ada_norm_zero"
            and mod.pos_embed is None and mod.norm1.linear.bias is not None
        ):
            if _plain_attention(mod.attn1) and not mod.only_cross_attention:
                qkv = frozenset(f"{prefix}attn1.{p}" for p in ("to_q", "to_k", "to_v"))
                found[qkv] = ModulationFold(mod.norm1.linear, shift_chunk=0, scale_chunk=1, chunks=6)
            if isinstance(getattr(mod.ff.net[0], "proj", None), nn.Linear) and mod._chunk_size is None:
                found[frozenset({f"{prefix}ff.net.0.proj"})] = ModulationFold(
                    mod.norm1.linear, shift_chunk=3, scale_chunk=4, chunks=6
                )
    if type(model).__name__ == "DiTTransformer2DModel" and model.proj_out_1.bias is not None:
        found[frozenset({"proj_out_2"})] = ModulationFold(
            model.proj_out_1, shift_chunk=0, scale_chunk=1, chunks=2
        )
    return found


@dataclass
class BalancingGroup:
    """Layers that read one input tensor and get one balancing vector (folded into ``absorber``, or
    applied as each layer's ``pre`` when there is none)."""

    names: list[str]
    layers: dict[str, nn.Linear]
    absorber: Absorber | None = None

    @property
    def representative(self) -> str:
        return self.names[0]

    def weight_salience(self) -> torch.Tensor:
        """``s(W_j)``: max |weight| of input channel ``j`` over every output row of the group."""
        return torch.stack([l.weight.detach().abs().amax(0) for l in self.layers.values()]).amax(0)

    @torch.no_grad()
    def apply(self, multiplier: torch.Tensor) -> None:
        """Multiply the group's input channels by ``multiplier`` and divide the weights' columns by it."""
        m = multiplier.to(next(iter(self.layers.values())).weight)
        if self.absorber is not None:
            self.absorber.fold(m)
        for layer in self.layers.values():
            if self.absorber is None and not isinstance(layer, QuantMixin):
                continue  # its input is not transformed
            layer.weight /= m
            if self.absorber is None:
                append_pre(layer, ChannelScale(m))


@torch.no_grad()
def shared_inputs(ctx: QuantContext, stage: str) -> list[list[str]]:
    """Conv2d/Linear layers grouped by the input tensor they read (one FP forward of one input).

    The tensors are kept alive during the forward, so equal ``id`` means the very same tensor.
    """
    modules = quantizable_layers(ctx.model)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:  # a hook returning a tensor would replace the input
        seen.setdefault(name, x)

    calib = ctx.require_calibration(stage)
    x, t, cond = next(calib.subset(torch.arange(1)).batches(1, ctx.device))
    with full_precision(ctx.layers()), input_hooks(modules, keep):
        ctx.denoiser.forward(x, t, cond)
    groups: dict[int, list[str]] = {}
    for name, tensor in seen.items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def balancing_groups(ctx: QuantContext, patterns: Iterable[str], stage: str) -> list[BalancingGroup]:
    """The groups to balance: Linear layers reading one input, whose quantized members match ``patterns``.

    A group whose consumers are exactly the layers a preceding layer feeds gets that absorber; the
    others are split per parent module (e.g. one vector for a cross-attention's K and V) and balanced
    through ``pre``. A layer that already has a ``pre`` is balanced alone, after it.

    Groups come in forward order; balance them backwards. A fold changes the rows of a *preceding*
    layer (``to_v`` for the output projection), whose own balancing must see the changed weight. The
    input statistics of the FP model stay valid throughout: every fold is undone in the weights of the
    layers it feeds, so no group's input changes except by its own vector.
    """
    patterns = tuple(patterns)
    absorbers = find_absorbers(ctx.model)
    modules = quantizable_layers(ctx.model)
    groups: list[BalancingGroup] = []
    for members in shared_inputs(ctx, stage):
        quantized = [n for n in members if isinstance(modules[n], QuantMixin)
                     and (modules[n].weight_quantizer is not None or modules[n].act_quantizer is not None)]
        if not quantized or not all(isinstance(modules[n], nn.Linear) for n in members):
            continue
        if not all(any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in quantized):
            continue
        has_pre = any(getattr(modules[n], "pre", None) is not None for n in members)
        absorber = None if has_pre else absorbers.get(frozenset(members))
        if absorber is not None:
            groups.append(BalancingGroup(members, {n: modules[n] for n in members}, absorber))
            continue
        split: dict[str, list[str]] = {}
        for n in quantized:
            key = n if has_pre else n.rpartition(".")[0]
            split.setdefault(key, []).append(n)
        groups += [BalancingGroup(names, {n: modules[n] for n in names}) for names in split.values()]
    return groups


@dataclass
class TimestepStats:
    """Input statistics of layers per denoising timestep of the calibration set (FP model)."""

    timesteps: torch.Tensor  # (T,)
    absmax: dict[str, torch.Tensor]  # name -> (T, channels): max |x_j| at each timestep
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> T tensors of rows


@torch.no_grad()
def timestep_stats(
    ctx: QuantContext, layers: Mapping[str, nn.Module], stage: str, *, max_rows: int = 0
) -> TimestepStats:
    """Per-timestep channel absmax of each layer's (``pre``-transformed) input, quantization off.

    With ``max_rows``, up to ``max_rows / T`` input rows per timestep are also kept (CPU), drawn
    uniformly, for methods that measure a layer's output error.
    """
    calib = ctx.require_calibration(stage)
    timesteps = calib.t.unique()
    per_step = max(1, max_rows // len(timesteps)) if max_rows else 0
    g = torch.Generator().manual_seed(ctx.seed)
    absmax: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    step_max: dict[str, torch.Tensor] = {}
    step_rows: dict[str, list[torch.Tensor]] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        pre = getattr(layers[name], "pre", None)
        r = as_rows((pre(x) if pre is not None else x).detach().float())
        m = r.abs().amax(0)
        step_max[name] = torch.maximum(step_max[name], m) if name in step_max else m
        if per_step:
            pick = torch.randperm(r.shape[0], generator=g)[:per_step].to(r.device)
            step_rows.setdefault(name, []).append(r[pick].cpu())

    with full_precision(ctx.layers()), input_hooks(layers, observe):
        for t in timesteps:
            step_max.clear()
            step_rows.clear()
            run_calibration(ctx.denoiser, calib.subset(calib.t == t), ctx.batch_size)
            for n in layers:
                absmax[n].append(step_max[n])
                if per_step:
                    rows[n].append(torch.cat(step_rows[n])[:per_step])
    return TimestepStats(timesteps, {n: torch.stack(v) for n, v in absmax.items()}, rows if per_step else {})


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of two vectors (average ranks for ties)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return (ra @ rb) / denom if denom > 0 else torch.zeros((), dtype=torch.float64)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    _, inverse, counts = x.unique(return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=x.dtype, device=x.device).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def ssc_weights(act_salience: torch.Tensor, weight_salience: torch.Tensor) -> torch.Tensor:
    """``eta_t = softmax_t(-rho_t)``, rho_t = Spearman(s(X^(t)), s(W)); ``act_salience`` is (T, C)."""
    rho = torch.stack([spearman(s, weight_salience) for s in act_salience])
    return torch.softmax(-rho, dim=0).to(act_salience.dtype)


def calibrated_salience(act_salience: torch.Tensor, weight_salience: torch.Tensor) -> torch.Tensor:
    """SSC: ``s_rho(X_j) = sum_t eta_t s(X_j^(t))``."""
    return ssc_weights(act_salience, weight_salience) @ act_salience


def balancing_multiplier(act_salience: torch.Tensor, weight_salience: torch.Tensor) -> torch.Tensor:
    """CSB's ``b_j = sqrt(s(X_j) s(W_j)) / s(X_j)``: both saliences become their geometric mean."""
    sx = act_salience.clamp(min=SALIENCE_FLOOR)
    sw = weight_salience.to(sx).clamp(min=SALIENCE_FLOOR)
    return (sx * sw).sqrt() / sx


@register("ptq4dit")
class PTQ4DiT(Reparameterizer):
    """Channel-wise salience balancing of DiT linears, calibrated over timesteps by Spearman's rho."""

    paper = ("Wu, Wang, Shang, Shah & Yan, PTQ4DiT: Post-training Quantization for Diffusion "
             "Transformers, NeurIPS 2024")

    class Config(StageConfig):
        layers: list[str] = Field(
            default_factory=lambda: list(DIT_LINEARS), description="glob patterns of the layers balanced"
        )
        ssc: bool = Field(
            True, description="Spearman-guided salience over timesteps; false: max over all timesteps"
        )

    def apply(self, ctx: QuantContext) -> None:
        groups = balancing_groups(ctx, self.config.layers, self.name)
        stats = timestep_stats(ctx, {g.representative: g.layers[g.representative] for g in groups}, self.name)
        for group in reversed(groups):  # backwards: see ``balancing_groups``
            sw = group.weight_salience()
            salience = stats.absmax[group.representative].to(sw)
            sx = calibrated_salience(salience, sw) if self.config.ssc else salience.amax(0)
            group.apply(balancing_multiplier(sx, sw))
