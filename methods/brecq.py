"""AdaRound and BRECQ: learned weight rounding by reconstructing layer or block outputs.

Round-to-nearest is not the best rounding: what matters is the error of a layer's (or block's)
*output*, and rounding some weights the other way can cancel the errors of others. AdaRound
(layer-wise) and BRECQ (block-wise) learn, for every weight, whether to round down or up:

* weight ``w`` on a grid of step ``s`` and zero point ``z`` becomes
  ``w_hat = s * (clamp(floor(w / s) + h(V) + z, 0, 2^b - 1) - z)`` with the rectified sigmoid
  ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``;
  ``V`` starts where ``h(V)`` equals the fractional part of ``w / s`` (so ``w_hat = w`` at first);
* the loss is the reconstruction error ``||f(x) - f_hat(x_hat)||_p^p`` (summed over channels,
  averaged over the rest, as the authors' ``lp_loss``) plus the rounding regulariser
  ``lambda * sum(1 - |2 h(V) - 1|^beta)``, off for the first 20% of the iterations (warm-up), then
  with ``beta`` annealed linearly from 20 to 2 so that every ``h(V)`` is pushed to 0 or 1;
* Adam at learning rate 1e-3 on ``V``; at the end the rounding is made hard, ``h = [V >= 0]``.

The unit of reconstruction is a layer for ``adaround`` and a block for ``brecq``. Blocks are the
diffusers building blocks, as in BRECQ's and Q-Diffusion's code: ``ResnetBlock2D``, the attention
block (``Attention``), ``BasicTransformerBlock`` and the up/down-sampling convolutions; a
quantized layer outside every block (the first and last convolution, the time-embedding MLP, the
DiT patch embedding and output projections) is reconstructed on its own. Units are processed in the
order the model runs them. The inputs of a unit are captured from the *quantized* model (everything
before it already reconstructed) and its target outputs from the full-precision model
(``ctx.fp_denoiser``), Q-Diffusion's ``asym`` setting; both on ``ctx.device``, for at most
``samples`` calibration inputs (a random subset: that bounds memory), with the forward pass stopped
as soon as the unit is reached.

BRECQ then (as Q-Diffusion's diffusion version of it) learns the activation step sizes, LSQ-style:
with weights fixed at their learned rounding and activations quantized everywhere, each block's
activation scales are trained on the same reconstruction loss (``L_2.4``, Adam at 4e-4 with cosine
decay), the zero points fixed.

Both stages start from the ranges of ``mse_clip`` (L_p-searched clipping of weights and activations,
the initialisation of the authors' code), or keep those of an earlier quantize stage.

At the end the learned rounding is baked into the weights: each weight is replaced by its
dequantized value ``w_hat``, so that the layer's own round-to-nearest quantizer, with the same
scale, reproduces exactly the learned codes (checked; an exported model needs nothing else).

Defaults are the papers' (``lambda`` 0.01, ``beta`` 20 -> 2, warm-up 0.2, Adam 1e-3 for ``V``,
4e-4 for activation scales, batch 32, ``p`` 2 for weights and 2.4 for activations) except the
number of iterations: the papers run 20,000 (weights) and 5,000 (activations) per unit, a budget
of hours; the defaults here are 1,000 and 250, and the knobs ``iters``/``act_iters`` restore them.
With a short schedule raise ``lr`` with it: the rounding variables must travel a fixed distance
(on a zoo ResBlock, 100 iterations at 2e-2 reach the error of 1,000 at 1e-3; on the zoo's
``down_blocks.1.resnets.1`` at W4 the block loss falls from 2.14 at mse_clip RTN to 0.87 / 0.75 /
0.67 with 50 @ 4e-2 / 100 @ 2e-2 / 300 @ 1e-2, with 49% / 57% / 79% of the ``h(V)`` hard when
training stops). ``ctx.state["reconstruction"][stage]`` records each unit's loss before/after and
how many rounding variables ended hard (0 or 1): far below 1 means the schedule was too short for
the regulariser to decide every weight before the final ``[V >= 0]``.

Not implemented: BRECQ's Fisher-weighted losses (``opt_mode`` fisher_diag/fisher_full of its
code; its released ImageNet script and Q-Diffusion run the MSE mode used here), rounding of
minifloat (fp) or 1-bit weights (those layers keep their round-to-nearest grid), and quantization
of the attention matmuls (qsearch quantizes only the inputs of Conv2d/Linear layers).

Papers: M. Nagel, R. A. Amjad, M. van Baalen, C. Louizos, T. Blankevoort, "Up or Down? Adaptive
Rounding for Post-Training Quantization", ICML 2020 (arXiv:2004.10568); Y. Li, R. Gong, X. Tan,
Y. Yang, P. Hu, Q. Zhang, F. Yu, W. Wang, S. Gu, "BRECQ: Pushing the Limit of Post-Training
Quantization by Block Reconstruction", ICLR 2021 (arXiv:2102.05426); X. Li et al., "Q-Diffusion:
Quantizing Diffusion Models", ICCV 2023. Code: https://github.com/yhhhli/BRECQ (``quant/``),
https://github.com/Xiuyu-Li/q-diffusion (``qdiff/adaptive_rounding.py``, ``qdiff/block_recon.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from qsearch.calibration import CalibrationSet
from qsearch.models import Denoiser, current_timestep
from qsearch.quant import grid
from qsearch.quant.modules import QuantMixin, activations_off
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer, StageConfig

from methods.lsq import ensure_ranges

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (AdaRound, Sec. 3.3)

BLOCK_TYPES = frozenset(
    {"ResnetBlock2D", "Attention", "BasicTransformerBlock", "Downsample2D", "Upsample2D"}
)
"""diffusers modules reconstructed as one unit by BRECQ (its ResBlock/attention/transformer units)."""


# ------------------------------------------------------------------------------------------------
# learned rounding
# ------------------------------------------------------------------------------------------------
class AdaRoundQuantizer(WeightQuantizer):
    """AdaRound on the grid of an integer weight quantizer: ``floor(w / s) + h(V)``, V learned.

    It stands in for ``base`` (the layer's quantizer) while the rounding is learned. The grid is
    read element-wise from ``base.decode`` (``decode(q) = (q - z) s`` is affine in the codes), so any
    granularity and any code layout of ``base`` (grouped, split) is supported unchanged.
    """

    def __init__(self, base: WeightQuantizer, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)
        if base.format != "int" or base.bits < 2:
            raise ValueError("AdaRound needs an integer grid of at least 2 bits")
        for attr in ("bits", "format", "exponent_bits", "granularity", "group_size", "symmetric"):
            setattr(self, attr, getattr(base, attr))
        self.weight_shape = torch.Size(weight.shape)
        self.base = base
        with torch.no_grad():
            w = weight.detach()
            at_zero = base.decode(torch.zeros_like(w))  # -z s
            scale = base.decode(torch.ones_like(w)) - at_zero
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", torch.round(-at_zero / scale))
            rest = w / scale - torch.floor(w / scale)  # in [0, 1): h(V) = rest at the start
            alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, learned rounding"

    def rounding(self) -> torch.Tensor:
        """``h(V)`` in [0, 1]: the soft up-rounding of each weight."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: zero only when every ``h(V)`` is 0 or 1."""
        return (1 - (2 * self.rounding() - 1).abs().pow(beta)).sum()

    def codes(self, w: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``clamp(floor(w / s) + up + z)``: codes for a given up-rounding."""
        return torch.clamp(torch.floor(w / self.scale) + up + self.zero_point, 0, grid.code_max(self.bits))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` on the grid with the soft rounding ``h(V)`` (what reconstruction trains)."""
        return (self.codes(w, self.rounding()) - self.zero_point) * self.scale

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Codes with the hard rounding ``[V >= 0]`` (the learned rounding)."""
        return self.codes(w, (self.alpha >= 0).to(w.dtype))

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return self.base.decode(q)


def can_round(layer: QuantMixin) -> bool:
    """Whether AdaRound applies: an integer weight grid of 2 bits or more."""
    wq = layer.weight_quantizer
    return wq is not None and wq.format == "int" and wq.bits >= 2


@torch.no_grad()
def bake_rounding(layer: QuantMixin) -> None:
    """Write the learned rounding into the weight and give the layer back its own quantizer.

    The weight becomes ``(q - z) s``; the layer's round-to-nearest quantizer on the same grid maps it
    back to exactly the codes ``q`` (``(q - z) s / s`` is exact: small integers times fp16 scales).
    """
    ada = layer.weight_quantizer
    if not isinstance(ada, AdaRoundQuantizer):
        raise TypeError("bake_rounding needs a layer whose weight quantizer is an AdaRoundQuantizer")
    codes = ada.encode(layer.weight)
    layer.weight.copy_((codes - ada.zero_point) * ada.scale)
    layer.weight_quantizer = ada.base
    if not torch.equal(ada.base.encode(layer.weight), codes):
        raise RuntimeError("baked weights do not reproduce the learned codes under round-to-nearest")


def rounding_beta(step: int, iters: int, warmup: float, start: float, end: float) -> float:
    """Regulariser exponent at ``step`` (1-based): ``start`` until the warm-up ends, then linear to ``end``.

    As ``LinearTempDecay`` of the authors' code (``rel_start_decay = warmup``).
    """
    start_decay = warmup * iters
    if step < start_decay:
        return start
    rel = (step - start_decay) / max(iters - start_decay, 1)
    return end + (start - end) * max(0.0, 1 - rel)


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """``|pred - target|^p`` summed over dim 1 (channels), averaged over the rest (authors' lp_loss)."""
    return (pred - target).abs().pow(p).sum(1).mean()


# ------------------------------------------------------------------------------------------------
# units and their captured inputs
# ------------------------------------------------------------------------------------------------
@contextmanager
def timestep_context(t: torch.Tensor) -> Iterator[None]:
    """Make ``t`` the current timestep, as a denoiser call would (timestep-aware quantizers read it)."""
    token = current_timestep.set(t)
    try:
        yield
    finally:
        current_timestep.reset(token)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@dataclass
class Unit:
    """A reconstruction unit: a block (or a lone layer) and the quantized layers inside it."""

    name: str
    module: nn.Module
    layers: dict[str, QuantMixin]
    calls: int = 1  # times the model calls it per forward pass (early stopping needs 1)


def reconstruction_units(
    denoiser: Denoiser, probe: CalibrationSet, *, blocks: bool = True
) -> list[Unit]:
    """Blocks (or, with ``blocks=False``, layers) holding quantized layers, in execution order.

    A quantized layer outside every block is a unit of its own. The order comes from one forward
    pass on the first calibration input; units it never reaches are dropped.
    """
    model = denoiser.model
    candidates: dict[str, nn.Module] = {}

    def collect(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, QuantMixin) or (blocks and type(child).__name__ in BLOCK_TYPES):
                candidates[full] = child
            else:
                collect(child, f"{full}.")

    collect(model, "")
    calls: dict[str, int] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, _n=name: calls.__setitem__(_n, calls.get(_n, 0) + 1))
        for name, m in candidates.items()
    ]
    try:
        with torch.no_grad():
            x, t, cond = next(probe.subset(torch.arange(1)).batches(1, denoiser.device))
            denoiser.forward(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    units = []
    for name in calls:  # dicts keep insertion order: the order of first calls
        module = candidates[name]
        layers = (
            {name: module} if isinstance(module, QuantMixin)
            else {f"{name}.{n}": m for n, m in module.named_modules() if isinstance(m, QuantMixin)}
        )
        if layers:
            units.append(Unit(name, module, layers, calls[name]))
    return units


Call = tuple[tuple, dict, torch.Tensor]
"""One captured call of a unit: positional arguments, keyword arguments, timesteps of the batch."""


@dataclass
class UnitData:
    """A unit's captured inputs (tensors of the batch, and constants), their timesteps and targets."""

    batched: dict[tuple, torch.Tensor]
    const: dict[tuple, Any]
    n_args: int
    timesteps: torch.Tensor
    target: torch.Tensor

    @classmethod
    def from_calls(cls, calls: Sequence[Call], outputs: Sequence[torch.Tensor]) -> "UnitData":
        """Concatenate captured calls: a tensor whose first dimension is the batch is per example,
        anything else (``None``, flags, unbatched tensors) is taken from the first call."""
        batched: dict[tuple, list[torch.Tensor]] = {}
        const: dict[tuple, Any] = {}
        for args, kwargs, t in calls:
            items = [(("a", i), v) for i, v in enumerate(args)] + [(("k", k), v) for k, v in kwargs.items()]
            for key, value in items:
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == t.shape[0]:
                    batched.setdefault(key, []).append(value.detach())
                else:
                    const.setdefault(key, value)
        return cls(
            {k: torch.cat(v) for k, v in batched.items()}, const, len(calls[0][0]),
            torch.cat([t for _, _, t in calls]), torch.cat(list(outputs)),
        )

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def call(self, module: nn.Module, index: torch.Tensor) -> torch.Tensor:
        """The unit's output on the captured inputs at ``index`` (first output of a tuple)."""
        values = {k: v[index] for k, v in self.batched.items()} | self.const
        args = [values[("a", i)] for i in range(self.n_args)]
        kwargs = {k[1]: v for k, v in values.items() if k[0] == "k"}
        with timestep_context(self.timesteps[index]):
            out = module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _run(denoiser: Denoiser, calib: CalibrationSet, batch_size: int) -> None:
    """The denoiser over the calibration set, each batch stopped where a hook says so."""
    with torch.no_grad():
        for x, t, cond in calib.batches(batch_size, denoiser.device):
            try:
                denoiser.forward(x, t, cond)
            except _Stop:
                pass


def capture_unit(
    ctx: QuantContext, unit: Unit, calib: CalibrationSet, batch_size: int
) -> UnitData:
    """Inputs of ``unit`` in the quantized model and its outputs in the FP model, on ``ctx.device``."""
    calls: list[Call] = []
    outputs: list[torch.Tensor] = []
    early = unit.calls == 1

    def grab_input(module, args, kwargs):
        calls.append((args, kwargs, current_timestep.get().detach()))
        if early:
            raise _Stop

    def grab_output(module, args, kwargs, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())
        if early:
            raise _Stop

    handle = unit.module.register_forward_pre_hook(grab_input, with_kwargs=True)
    try:
        _run(ctx.denoiser, calib, batch_size)
    finally:
        handle.remove()
    fp_module = ctx.fp_denoiser.model.get_submodule(unit.name)
    handle = fp_module.register_forward_hook(grab_output, with_kwargs=True)
    try:
        _run(ctx.fp_denoiser, calib, batch_size)
    finally:
        handle.remove()
    return UnitData.from_calls(calls, outputs)


def calibration_subset(ctx: QuantContext, stage: str, samples: int, seed: int) -> CalibrationSet:
    """At most ``samples`` calibration inputs, drawn at random (bounds the captured memory)."""
    calib = ctx.require_calibration(stage)
    if len(calib) <= samples:
        return calib
    g = torch.Generator().manual_seed(seed)
    return calib.subset(torch.randperm(len(calib), generator=g)[:samples])


def batch_order(n: int, iters: int, batch_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """``(iters, batch)`` sample indices, each row a random subset (authors' ``randperm[:bs]``)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n, generator=g)[: min(batch_size, n)] for _ in range(iters)]
    return torch.stack(rows).to(device)


# ------------------------------------------------------------------------------------------------
# the two reconstruction phases
# ------------------------------------------------------------------------------------------------
class RoundingConfig(StageConfig):
    """Parameters of learned rounding (shared by ``adaround``, ``brecq`` and ``tfmq_dm``)."""

    iters: int = Field(1000, ge=1, description="rounding iterations per unit (papers: 20000)")
    batch_size: int = Field(32, ge=1, description="calibration inputs per iteration")
    samples: int = Field(1024, ge=1, description="calibration inputs kept for reconstruction (random subset)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the rounding variables V")
    rounding_weight: float = Field(0.01, ge=0, description="lambda of the rounding regulariser")
    warmup: float = Field(0.2, ge=0, lt=1, description="fraction of iterations without the regulariser")
    beta_start: float = Field(20.0, gt=0, description="regulariser exponent after warm-up")
    beta_end: float = Field(2.0, gt=0, description="regulariser exponent at the end")
    p: float = Field(2.0, gt=0, description="L_p norm of the weight reconstruction loss")
    init: Literal["auto", "mse_clip", "keep"] = Field(
        "auto", description="starting ranges: mse_clip search, those of an earlier quantize stage "
        "(keep), or auto (keep if an earlier quantize stage ran, else mse_clip)"
    )
    seed: int = 0


class BlockConfig(RoundingConfig):
    """Learned rounding plus BRECQ/Q-Diffusion's learned activation step sizes."""

    act_iters: int = Field(250, ge=0, description="activation step-size iterations per unit (Q-Diffusion: 5000)")
    act_lr: float = Field(4e-4, gt=0, description="Adam learning rate of activation step sizes (cosine decay)")
    act_p: float = Field(2.4, gt=0, description="L_p norm of the activation reconstruction loss")


@dataclass(frozen=True)
class ActTraining:
    """How activation quantizers are trained on a unit's reconstruction loss (Q-Diffusion's LSQ step)."""

    iters: int
    lr: float
    p: float
    batch_size: int
    seed: int = 0


Regularizer = Callable[[], torch.Tensor]
UnitLoss = Callable[["Unit", "UnitData", torch.Tensor, float], torch.Tensor]
"""``loss(unit, data, index, p)``: what a unit's reconstruction minimises on the inputs at ``index``."""


def output_loss(unit: Unit, data: UnitData, index: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's loss: the unit's output against the FP model's, ``L_p``."""
    return lp_loss(data.call(unit.module, index), data.target[index], p)


def eval_loss(unit: Unit, data: UnitData, p: float, size: int, loss: UnitLoss = output_loss) -> float:
    """Reconstruction loss on the first ``size`` captured inputs (for the record, no gradients)."""
    index = torch.arange(min(size, len(data)), device=data.target.device)
    with torch.no_grad():
        return float(loss(unit, data, index, p))


def learn_rounding(
    layers: Mapping[str, QuantMixin], n: int, loss_fn: Callable[[torch.Tensor], torch.Tensor],
    cfg: RoundingConfig,
) -> dict[str, float]:
    """AdaRound on ``layers`` against ``loss_fn(index)`` over ``n`` inputs; bakes the result.

    Returns the loss ``before`` (round-to-nearest) and ``after`` (learned rounding) on the first
    inputs, and ``hard``: the fraction of rounding variables at exactly 0 or 1 when training ended
    (near 1 when the schedule was long enough for the regulariser to decide every weight).
    """
    device = next(iter(layers.values())).weight.device
    probe = torch.arange(min(2 * cfg.batch_size, n), device=device)
    with torch.no_grad():
        before = float(loss_fn(probe))
    rounders = []
    for layer in layers.values():
        layer.weight_quantizer = AdaRoundQuantizer(layer.weight_quantizer, layer.weight)
        rounders.append(layer.weight_quantizer)
        # A weight that requires grad makes the layer recompute its quantized weight on each call
        # instead of serving its cache (which keys on the weight and the scale, not on V).
        layer.weight.requires_grad_(True)
    optimizer = torch.optim.Adam([r.alpha for r in rounders], lr=cfg.lr)
    order = batch_order(n, cfg.iters, cfg.batch_size, cfg.seed, device)
    try:
        for step in range(1, cfg.iters + 1):
            loss = loss_fn(order[step - 1])
            if step >= cfg.warmup * cfg.iters:
                beta = rounding_beta(step, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
                loss = loss + cfg.rounding_weight * sum(r.regularizer(beta) for r in rounders)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for layer in layers.values():
            layer.weight.requires_grad_(False)
            layer.weight.grad = None
    with torch.no_grad():
        h = torch.cat([r.rounding().flatten() for r in rounders])
        hard = float(((h == 0) | (h == 1)).float().mean())
    for layer in layers.values():
        bake_rounding(layer)
    with torch.no_grad():
        after = float(loss_fn(probe))
    return {"before": before, "after": after, "hard": hard}


def reconstruct_rounding(
    unit: Unit, data: UnitData, cfg: RoundingConfig, frozen: frozenset[str] = frozenset(),
    loss: UnitLoss = output_loss,
) -> dict[str, float] | None:
    """Learned rounding of a unit's (not frozen) layers on its reconstruction loss."""
    layers = {n: m for n, m in unit.layers.items() if n not in frozen and can_round(m)}
    if not layers:
        return None

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        return loss(unit, data, idx, cfg.p)

    return learn_rounding(layers, len(data), loss_fn, cfg)


def act_tensors(layer: QuantMixin) -> list[torch.Tensor]:
    """Trainable tensors of a layer's activation quantizer.

    A plain static ``ActQuantizer`` (also inside a composite one, e.g. a split quantizer's parts)
    contributes its scale (LSQ); a quantizer offering ``reconstruction_parameters()`` (TDQ's
    interval MLP, APQ-DM's group search) contributes those.
    """
    aq = layer.act_quantizer
    if aq is None:
        return []
    if hasattr(aq, "reconstruction_parameters"):
        return list(aq.reconstruction_parameters())
    return [m.scale for m in aq.modules() if type(m) is ActQuantizer and not m.dynamic and m.calibrated]


def reconstruct_activations(
    unit: Unit, data: UnitData, how: ActTraining, frozen: frozenset[str] = frozenset(),
    regularizer: Regularizer | None = None, lr_of: Mapping[int, float] | None = None,
    loss: UnitLoss = output_loss,
) -> dict[str, float] | None:
    """Train the unit's activation quantizers on its reconstruction loss; returns loss before/after.

    Adam with cosine decay (Q-Diffusion). ``lr_of`` maps ``id(tensor)`` to a learning rate of its
    own; ``regularizer`` adds a term to the loss. Step sizes held in buffers (LSQ, APQ-DM groups)
    are kept positive and rounded to fp16 (what export stores) at the end.
    """
    tensors = [t for n, m in unit.layers.items() if n not in frozen for t in act_tensors(m)]
    if not tensors or how.iters == 0:
        return None
    lr_of = lr_of or {}
    steps = [t for t in tensors if not isinstance(t, nn.Parameter)]
    groups: dict[float, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(lr_of.get(id(t), how.lr), []).append(t)
    before = eval_loss(unit, data, how.p, 2 * how.batch_size, loss)
    for t in steps:
        t.requires_grad_(True)
    optimizer = torch.optim.Adam([{"params": v, "lr": k} for k, v in groups.items()])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=how.iters, eta_min=0.0)
    order = batch_order(len(data), how.iters, how.batch_size, how.seed, data.target.device)
    try:
        for idx in order:
            value = loss(unit, data, idx, how.p)
            if regularizer is not None:
                value = value + regularizer()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for t in steps:
                    t.clamp_(min=2.0**-14)
    finally:
        with torch.no_grad():
            for t in steps:
                t.requires_grad_(False)
                t.grad = None
                t.copy_(grid.to_fp16_grid(t))
    return {"before": before, "after": eval_loss(unit, data, how.p, 2 * how.batch_size, loss)}


@dataclass
class Reconstruction:
    """One model's reconstruction: its calibration subset, units and the losses of each phase."""

    ctx: QuantContext
    stage: str
    calib: CalibrationSet
    units: list[Unit]
    frozen: frozenset[str] = frozenset()
    report: dict[str, Any] = field(default_factory=dict)
    loss: UnitLoss = output_loss

    @classmethod
    def prepare(
        cls, ctx: QuantContext, stage: str, samples: int, seed: int, *, blocks: bool = True,
        frozen: frozenset[str] = frozenset(),
    ) -> "Reconstruction":
        calib = calibration_subset(ctx, stage, samples, seed)
        units = reconstruction_units(ctx.denoiser, calib, blocks=blocks)
        rec = cls(ctx, stage, calib, units, frozen)
        rec.report = {"units": len(units), "samples": len(calib)}
        ctx.state.setdefault("reconstruction", {})[stage] = rec.report
        return rec

    def weights(self, cfg: RoundingConfig) -> None:
        """Learned rounding of every unit in order, activations in full precision."""
        started = time.perf_counter()
        losses = self.report.setdefault("weights", {})
        with activations_off(self.ctx.layers()):
            for unit in self.units:
                if all(n in self.frozen or not can_round(m) for n, m in unit.layers.items()):
                    continue
                data = capture_unit(self.ctx, unit, self.calib, self.ctx.batch_size)
                losses[unit.name] = reconstruct_rounding(unit, data, cfg, self.frozen, self.loss)
        self.report["weight_seconds"] = time.perf_counter() - started

    def activations(
        self, how: ActTraining, regularizer_for: Callable[[Unit], Regularizer | None] | None = None,
        lr_of: Mapping[int, float] | None = None,
    ) -> None:
        """Activation quantizers of every unit in order, trained with everything quantized."""
        started = time.perf_counter()
        losses = self.report.setdefault("activations", {})
        for unit in self.units:
            if not any(act_tensors(m) for n, m in unit.layers.items() if n not in self.frozen):
                continue
            data = capture_unit(self.ctx, unit, self.calib, self.ctx.batch_size)
            regularizer = regularizer_for(unit) if regularizer_for else None
            losses[unit.name] = reconstruct_activations(
                unit, data, how, self.frozen, regularizer, lr_of, self.loss
            )
        self.report["activation_seconds"] = time.perf_counter() - started


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
@register("adaround")
class AdaRound(Quantizer):
    """AdaRound: learned up/down rounding of each weight, layer by layer (output reconstruction)."""

    paper = "Nagel et al., Up or Down? Adaptive Rounding for Post-Training Quantization (ICML 2020)"

    class Config(RoundingConfig):
        pass

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        Reconstruction.prepare(ctx, self.name, cfg.samples, cfg.seed, blocks=False).weights(cfg)


@register("brecq")
class BRECQ(Quantizer):
    """BRECQ: AdaRound per block (ResBlock, attention, transformer block), then learned act steps."""

    paper = "Li et al., BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction (ICLR 2021)"

    class Config(BlockConfig):
        pass

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        rec = Reconstruction.prepare(ctx, self.name, cfg.samples, cfg.seed)
        rec.weights(cfg)
        rec.activations(act_training(cfg))


def act_training(cfg: BlockConfig) -> ActTraining:
    """The activation phase of a block-reconstruction config."""
    return ActTraining(cfg.act_iters, cfg.act_lr, cfg.act_p, cfg.batch_size, cfg.seed + 1)
