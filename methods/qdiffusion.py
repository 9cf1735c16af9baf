"""Q-Diffusion: time-step-aware calibration and shortcut-splitting quantization.

Li et al. name two obstacles to diffusion PTQ and answer each with one stage:

* ``qdiff_timesteps`` (calibration): activation distributions drift over the sampling steps, so the
  calibration set takes the FP model's denoising trajectory *uniformly at a fixed interval* over all
  steps, the same number of samples at each chosen step. As in the released ``get_train_samples``,
  the chosen steps are ``range(0, n_steps, n_steps // cali_st)`` (step 0 is the noisiest) and each
  takes the first ``cali_n`` trajectories; the defaults are the CIFAR-10 setting (``cali_st`` 20,
  ``cali_n`` 256: 5,120 inputs).
* ``qdiff_split`` (reparameterize): in the U-Net decoder a residual block consumes
  ``cat([h, skip], dim=1)``, the deep hidden state next to the shallow skip feature, whose ranges
  differ by an order of magnitude, so one grid for both wastes most of its levels on one half.
  Split quantization quantizes the two parts separately before they meet,
  ``Q(X) = Q_1(X_1) (+) Q_2(X_2)``, and splits the weight the same way along its input channels,
  ``Q(W) = Q_1(W_1) (+) Q_2(W_2)``, so ``Y = Q_1(X_1) Q_1(W_1) + Q_2(X_2) Q_2(W_2)``.

Which layers are split: the authors' code splits the layer that consumes the raw concatenation,
the residual block's 1x1 shortcut (``nin_shortcut`` / ``skip_connection``), in every decoder block
(``split=h.size(1)``); that is the default here (diffusers' ``conv_shortcut``). ``conv1`` of the same
block sees the concatenation only after GroupNorm and SiLU; it can be split too (``targets``) but
is not by default, as in the paper's code.

The split point is read from the diffusers block structure: the hidden-state part of up block
``i``'s resnet ``j`` has the channels of whatever ran before it (the previous resnet, or for
``j = 0`` the previous up block, or the mid block for the first one); the rest is the skip.

How the quantize stages calibrate a split layer: ``rtn``/``mse_clip`` hook the layer's
``act_quantizer`` and call its ``set_range`` with the range of the *whole* input.
``SplitActQuantizer`` is that ``act_quantizer``: while uncalibrated it passes inputs through and
records each part's own min/max, and ``set_range(lo, hi)`` sets each part's grid to its own range
intersected with ``[lo, hi]``. Min-max calibration thus yields exact per-part ranges, and a clip
range searched on the whole tensor (``mse_clip``) clips each part no wider than that. The weight
side needs no protocol: ``SplitWeightQuantizer`` is a ``WeightQuantizer`` whose groups are laid out
per part, so ``init_minmax``, ``set_range`` and clipping searches work on it unchanged.

Paper: X. Li, Y. Liu, L. Lian, H. Yang, Z. Dong, D. Kang, S. Zhang, K. Keutzer, "Q-Diffusion:
Quantizing Diffusion Models", ICCV 2023 (arXiv:2302.04304). Code:
https://github.com/Xiuyu-Li/q-diffusion (``qdiff/quant_layer.py``: ``QuantModule.split``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qsearch.calibration import CalibrationSet
from qsearch.quant.modules import QuantMixin
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.registry import register
from qsearch.stages import CalibrationSampler, QuantContext, Reparameterizer, StageConfig


# ------------------------------------------------------------------------------------------------
# time-step-aware calibration
# ------------------------------------------------------------------------------------------------
@register("qdiff_timesteps")
class TimestepAwareCalibration(CalibrationSampler):
    """Q-Diffusion: the same number of trajectory samples at steps taken at a fixed interval."""

    paper = "Li et al., Q-Diffusion: Quantizing Diffusion Models (ICCV 2023)"

    class Config(StageConfig):
        cali_st: int = Field(
            20, ge=1, description="number of sampling steps to take (interval = steps // cali_st)"
        )
        cali_n: int = Field(256, ge=1, description="trajectories taken at each chosen step")

    def chosen_steps(self, num_steps: int) -> list[int]:
        """Trajectory indices ``0, c, 2c, ...`` with ``c = num_steps // cali_st`` (at least 1)."""
        return list(range(0, num_steps, max(1, num_steps // self.config.cali_st)))

    def select(self, ctx: QuantContext) -> CalibrationSet:
        traj = ctx.trajectory
        n = self.config.cali_n
        if n > traj.num_samples:
            raise ValueError(
                f"qdiff_timesteps takes cali_n={n} trajectories per step but the calibration pool "
                f"has {traj.num_samples}: raise calibration_pool.samples or lower cali_n"
            )
        steps = torch.tensor(self.chosen_steps(traj.num_steps))
        return CalibrationSet.from_trajectory(
            traj, steps.repeat_interleave(n), torch.arange(n).repeat(len(steps))
        )


# ------------------------------------------------------------------------------------------------
# split quantizers
# ------------------------------------------------------------------------------------------------
def channel_dim(x: torch.Tensor) -> int:
    """Channel axis of a layer input: 1 for conv inputs (B, C, H, W), last for linear inputs/rows."""
    return 1 if x.dim() == 4 else -1


class SplitActQuantizer(ActQuantizer):
    """Two activation grids, one per channel part ``[:split]`` and ``[split:]`` of the input.

    The grids live in ``parts``; this module keeps no scale of its own. ``set_range(lo, hi)``
    gives each part its observed range (recorded while uncalibrated) clipped to ``[lo, hi]``.
    """

    def __init__(self, spec: QuantSpec, split: int) -> None:
        super().__init__(spec)
        del self.scale, self.zero_point  # a single grid would be meaningless here: see parts
        self.split = split
        self.parts = nn.ModuleList([ActQuantizer(spec), ActQuantizer(spec)])
        self.seen: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]

    def extra_repr(self) -> str:
        return f"split={self.split}, " + super().extra_repr()

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden-state part and the skip part of ``x``."""
        dim = channel_dim(x)
        return x.narrow(dim, 0, self.split), x.narrow(dim, self.split, x.shape[dim] - self.split)

    @torch.no_grad()
    def observe(self, parts: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Widen each part's running min/max (what ``set_range`` later intersects with)."""
        for k, p in enumerate(parts):
            lo, hi = p.detach().float().amin(), p.detach().float().amax()
            if self.seen[k] is not None:
                lo, hi = torch.minimum(lo, self.seen[k][0]), torch.maximum(hi, self.seen[k][1])
            self.seen[k] = (lo, hi)

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Each part's own range, intersected with ``[lo, hi]`` (a clip chosen on the whole input)."""
        if self.seen[0] is None:
            raise RuntimeError(
                "SplitActQuantizer.set_range before any input was seen: run the model on the "
                "calibration set first (the quantize stages do)"
            )
        lo = torch.as_tensor(lo, dtype=torch.float32)
        hi = torch.as_tensor(hi, dtype=torch.float32)
        for part, (seen_lo, seen_hi) in zip(self.parts, self.seen):
            part_lo = torch.maximum(lo.to(seen_lo.device), seen_lo)
            part_hi = torch.minimum(hi.to(seen_hi.device), seen_hi)
            part.set_range(torch.minimum(part_lo, part_hi), part_hi)
        self.calibrated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.halves(x)
        if not self.dynamic and not self.calibrated:
            self.observe(parts)
        return torch.cat([q(p) for q, p in zip(self.parts, parts)], dim=channel_dim(x))


class SplitWeightQuantizer(WeightQuantizer):
    """Weight grids split along the input channels at ``split``: each part has its own scales.

    Each part keeps the spec's granularity (one scale per tensor, per output channel, or per group
    *of that part*). The scales are stored as one ``(rows, groups, 1)`` tensor over a packed layout
    ``(rows, groups * L)`` in which every part's groups are zero-padded to a common length ``L``.
    Zeros never widen a range (the integer grids always contain 0, minifloat grids use the absolute
    max) and quantize exactly, so on the packed layout this is the plain grouped quantizer with
    group size ``L``: all of ``WeightQuantizer``'s arithmetic, and the stages that search ranges
    through ``grouped``/``set_range``, apply unchanged. (The layer's weight cache keys on
    ``scale``, which is this single tensor, so in-place range changes still invalidate it.)
    """

    def __init__(self, spec: QuantSpec, weight_shape: torch.Size, split: int) -> None:
        if spec.w_bits == 1:
            raise ValueError("split quantization needs w_bits >= 2 (binarization uses mean |w|)")
        shape = torch.Size(weight_shape)
        kernel = math.prod(shape[2:])
        part_cols = [split * kernel, (shape[1] - split) * kernel]
        granularity = spec.w_granularity
        if granularity == "tensor":
            rows, lengths = 1, [shape[0] * c for c in part_cols]
        else:
            rows, lengths = shape[0], part_cols
        group = spec.group_size if granularity == "group" else max(lengths)
        packed = spec.model_copy(update={"w_granularity": "group", "group_size": group})
        self.part_groups = [math.ceil(n / group) for n in lengths]
        self.packed_shape = torch.Size((rows, sum(self.part_groups) * group))
        super().__init__(packed, self.packed_shape)
        self.weight_shape = shape
        self.split = split
        self.part_granularity = granularity
        self.part_lengths = lengths

    def extra_repr(self) -> str:
        return f"split={self.split}, parts={self.part_granularity}, " + super().extra_repr()

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` as ``(rows, groups * L)``: each part flattened per row and zero-padded."""
        rows = self.packed_shape[0]
        blocks = []
        for part, n, groups in zip(self.halves(w), self.part_lengths, self.part_groups):
            flat = part.reshape(rows, n)
            blocks.append(F.pad(flat, (0, groups * self.group_size - n)))
        return torch.cat(blocks, dim=1)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Inverse of ``pack``, back to the weight's shape."""
        out = []
        start = 0
        for groups, n, like in zip(self.part_groups, self.part_lengths, self.part_shapes()):
            out.append(packed[:, start : start + n].reshape(like))
            start += groups * self.group_size
        return torch.cat(out, dim=1)

    def halves(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input channels ``[:split]`` and ``[split:]`` of a weight-shaped tensor."""
        return w[:, : self.split], w[:, self.split :]

    def part_shapes(self) -> tuple[torch.Size, torch.Size]:
        out, cin, *kernel = self.weight_shape
        return torch.Size((out, self.split, *kernel)), torch.Size((out, cin - self.split, *kernel))

    def grouped(self, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Groups of a weight (packed first) or of an already packed tensor.

        The inherited ``forward``/``encode``/``decode``/``init_minmax`` call ``grouped`` on what
        they are given: weights from outside, packed tensors from the overrides below. A 2-D
        weight whose shape equals the packed shape needs no padding, so packing it is the identity
        and the two cases never conflict.
        """
        return super().grouped(w if w.shape == self.packed_shape else self.pack(w))

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        return self.unpack(super().encode(self.pack(w)))

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return self.unpack(super().decode(self.pack(q)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.unpack(super().forward(self.pack(w)))


# ------------------------------------------------------------------------------------------------
# shortcut-splitting stage
# ------------------------------------------------------------------------------------------------
SplitTarget = Literal["conv_shortcut", "conv1"]


def skip_concat_splits(model: nn.Module) -> dict[str, int]:
    """``{resnet name: channels of the hidden state}`` for every decoder resnet fed ``cat([h, skip])``.

    diffusers' up blocks (``UpBlock2D``, ``AttnUpBlock2D``, ``CrossAttnUpBlock2D``, ...) concatenate
    the hidden state with the popped skip before each resnet; the hidden state has the channels of
    the module that ran just before: the previous resnet of the block (attentions and upsamplers
    keep channels), the previous up block, or for the first up block the mid block (the last down
    block when there is none). Models without ``up_blocks`` (transformers) have no such layers.
    """
    up_blocks = getattr(model, "up_blocks", None)
    if up_blocks is None:
        return {}
    before = model.mid_block if getattr(model, "mid_block", None) is not None else model.down_blocks[-1]
    hidden = before.resnets[-1].out_channels
    splits = {}
    for i, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            if not 0 < hidden < resnet.in_channels:
                raise ValueError(f"up_blocks.{i}.resnets.{j}: {resnet.in_channels} input channels "
                                 f"cannot hold a {hidden}-channel hidden state and a skip")
            splits[f"up_blocks.{i}.resnets.{j}"] = hidden
            hidden = resnet.out_channels
    return splits


def split_layer_(layer: QuantMixin, split: int) -> None:
    """Give a quantized layer per-part activation and weight grids (uncalibrated)."""
    device = layer.weight.device
    if layer.act_quantizer is not None:
        layer.act_quantizer = SplitActQuantizer(layer.spec, split).to(device)
    if layer.weight_quantizer is not None and layer.weight_quantizer.bits > 1:  # 1-bit: mean |w|
        layer.weight_quantizer = SplitWeightQuantizer(layer.spec, layer.weight.shape, split).to(device)


@register("qdiff_split")
class ShortcutSplitting(Reparameterizer):
    """Q-Diffusion: separate grids for the hidden-state and skip parts of decoder concatenations."""

    paper = "Li et al., Q-Diffusion: Quantizing Diffusion Models (ICCV 2023)"

    class Config(StageConfig):
        targets: list[SplitTarget] = Field(
            default_factory=lambda: ["conv_shortcut"],
            description="resnet layers to split: conv_shortcut (the paper's code) and/or conv1",
        )

    def split_layers(self, ctx: QuantContext) -> dict[str, int]:
        """Quantized layers to split, with their split point."""
        layers = ctx.layers()
        found = {}
        for resnet, split in skip_concat_splits(ctx.model).items():
            for target in self.config.targets:
                name = f"{resnet}.{target}"
                if name in layers and layers[name].weight.shape[1] > split:
                    found[name] = split
        return found

    def apply(self, ctx: QuantContext) -> None:
        layers = ctx.layers()
        found = self.split_layers(ctx)
        for name, split in found.items():
            split_layer_(layers[name], split)
        ctx.state.setdefault(self.name, {})["splits"] = found
