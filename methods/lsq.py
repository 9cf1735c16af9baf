"""LSQ: quantization-aware fine-tuning with learned step sizes, and the shared fine-tuning machinery.

Esser et al., "Learned Step Size Quantization", ICLR 2020 (https://arxiv.org/abs/1902.08153;
reference code e.g. https://github.com/zhutmost/lsq-net). Every quantizer's step size ``s`` is a
trained parameter; the forward pass is ``v_hat = round(clip(v / s, -Q_N, Q_P)) * s`` with a
straight-through estimator, so ``d v_hat / d s = round(v/s) - v/s`` inside the range and ``-Q_N``
or ``Q_P`` outside it (``lsq_round``: the core quantizers round before clipping, which gives the
same values but no gradient to values that round onto the extreme codes), and the gradient of
``s`` is scaled by ``g = 1 / sqrt(N * Q_P)`` (``N``: weights of the layer, or features of one
example's activation) so that step sizes and weights learn at comparable relative rates.
The paper initialises ``s = 2 <|v|> / sqrt(Q_P)``; here a step size starts from the ranges set by an
earlier quantize stage, or from the MSE clipping search (``mse_clip``) when there was none, which
is the better starting point for a short fine-tuning (``init: lsq`` gives the paper's).

Diffusion models have no labels, so every fine-tuning stage of this package distils the FP model:
the loss is the MSE between the quantized and the FP model's noise predictions on denoiser inputs
taken from the FP sampling trajectories (``ctx.trajectory``) or the calibration set, or, with a
``dataset`` folder of images, on training images noised at the sampler's timesteps.

Shared with q_dm, quest, tuneqdm, efficientdm, binarydm and bidm (kept here so they don't repeat
it): the LSQ weight/activation quantizers and the timestep-indexed activation quantizer, the input
pools, feature taps for representation losses, and ``fine_tune``, the training loop (rich progress
bar, loss curve in ``ctx.state["loss_curves"]`` and optionally a PNG, peak GPU memory in
``ctx.state["peak_memory_mb"]``, optional gradient checkpointing).

Memory: the training loop holds the quantized model's activations for one batch, the FP teacher
runs without gradients, and ``gradient_checkpointing`` trades recomputation for activation memory.
Training one block at a time is not offered: all methods here distil end to end, as their papers do.
With the default Adam the LSQ gradient scale matters little (Adam normalises each parameter's
update); ``optimizer: sgd`` (momentum 0.9, the paper's) makes it matter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qsearch.calibration import CalibrationSet
from qsearch.models import current_timestep
from qsearch.quant import grid
from qsearch.quant.modules import QuantMixin
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer, _fp_round_ste, round_ste
from qsearch.registry import REGISTRY, register
from qsearch.stages import QuantContext, Quantizer, StageConfig

Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]
"""``(x_t, t, cond, noise)``: a denoiser input and, for dataset inputs, the noise that made it."""


# --------------------------------------------------------------------------------------------
# LSQ arithmetic and quantizers
# --------------------------------------------------------------------------------------------
def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` in the backward pass."""
    return (x - x * g).detach() + x * g


def lsq_round(v: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    """Codes ``round(clip(v, -z, qmax - z)) + z`` with the straight-through estimator.

    The values equal the core's ``clamp(round(v) + z, 0, qmax)``, but clipping *before* rounding,
    as LSQ does, gives the gradient ``round(v) - v`` to every value inside the range, also those
    that round onto the extreme codes; the core clips after rounding, which zeroes their gradient
    (PyTorch's clamp has zero gradient at its bounds).
    """
    return round_ste(torch.clamp(v, -zero_point, qmax - zero_point)) + zero_point


def positive_levels(bits: int, fmt: str, symmetric: bool, exponent_bits: int = 0) -> float:
    """LSQ's ``Q_P``: the largest positive level of the grid, in steps."""
    if fmt == "fp":
        return grid.fp_max(bits, exponent_bits)
    return float((1 << (bits - 1)) - 1) if symmetric else float(grid.code_max(bits))


def _as_parameter(module: nn.Module, name: str) -> None:
    """Turn buffer ``name`` into a trained parameter of the same value (state_dict key unchanged)."""
    value = module._buffers.pop(name)
    module.register_parameter(name, nn.Parameter(value.detach().clone()))


class LSQWeightQuantizer(WeightQuantizer):
    """A ``WeightQuantizer`` whose step sizes are learned (LSQ gradient scale)."""

    def __init__(self, spec, weight_shape: torch.Size) -> None:
        super().__init__(spec, weight_shape)
        if self.bits < 2:
            raise ValueError("LSQ needs at least 2 bits; binarization has its own quantizers")
        self.spec = spec
        _as_parameter(self, "scale")
        qp = positive_levels(self.bits, self.format, self.symmetric, self.exponent_bits)
        self.grad_factor = 1.0 / math.sqrt(self.weight_shape.numel() * qp)

    @classmethod
    def from_layer(cls, layer: QuantMixin) -> "LSQWeightQuantizer":
        """A trainable copy of ``layer``'s calibrated weight quantizer."""
        old = layer.weight_quantizer
        new = cls(layer.spec, layer.weight.shape).to(layer.weight.device)
        with torch.no_grad():
            new.scale.copy_(old.scale)
            new.zero_point.copy_(old.zero_point)
        return new

    @torch.no_grad()
    def init_lsq(self, w: torch.Tensor) -> None:
        """The paper's initialisation ``s = 2 <|w|> / sqrt(Q_P)`` per group."""
        g, _ = self.grouped(w)
        qp = positive_levels(self.bits, self.format, self.symmetric, self.exponent_bits)
        self.scale.copy_(2 * g.abs().mean(-1, keepdim=True) / math.sqrt(qp))
        if self.format == "int":  # LSQ's signed grid [-Q_N, Q_P]
            self.zero_point.fill_(float(1 << (self.bits - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g, pad = self.grouped(w)
        s = grad_scale(self.scale, self.grad_factor)
        if self.format == "fp":
            out = _fp_round_ste(g / s, self.bits, self.exponent_bits) * s
        else:
            q = lsq_round(g / s, self.zero_point, grid.code_max(self.bits))
            out = (q - self.zero_point) * s
        return grid.ungroup(out, pad, w.shape)

    @torch.no_grad()
    def round_scales(self) -> None:
        """Step sizes to the fp16 grid that export stores (idempotent)."""
        self.scale.copy_(grid.to_fp16_grid(self.scale))

    def frozen(self) -> WeightQuantizer:
        """A plain quantizer with the learned step sizes on the fp16 grid that export stores."""
        plain = WeightQuantizer(self.spec, self.weight_shape).to(self.scale.device)
        with torch.no_grad():
            plain.scale.copy_(grid.to_fp16_grid(self.scale))
            plain.zero_point.copy_(self.zero_point)
        return plain


class LSQActQuantizer(ActQuantizer):
    """A static ``ActQuantizer`` whose step size is learned (LSQ gradient scale per example)."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        _as_parameter(self, "scale")
        self.qp = positive_levels(self.bits, self.format, self.symmetric, self.exponent_bits)

    @classmethod
    def from_quantizer(cls, old: ActQuantizer, spec) -> "LSQActQuantizer":
        new = cls(spec).to(old.scale.device)
        with torch.no_grad():
            new.scale.copy_(old.scale)
            new.zero_point.copy_(old.zero_point)
        new.calibrated = old.calibrated
        return new

    def fake_quant(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        if self.format == "fp":
            return super().fake_quant(x, scale, zero_point)
        return (lsq_round(x / scale, zero_point, grid.code_max(self.bits)) - zero_point) * scale

    def step_size(self, x: torch.Tensor) -> torch.Tensor:
        """The step size with LSQ's gradient scale ``1/sqrt(N_F * Q_P)`` (N_F: one example)."""
        return grad_scale(self.scale, 1.0 / math.sqrt(max(x[0].numel(), 1) * self.qp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            return x
        return self.fake_quant(x, self.step_size(x), self.zero_point)

    @torch.no_grad()
    def round_for_export(self) -> None:
        """Step sizes to the fp16 grid that export stores (for quantizers that stay as they are)."""
        self.scale.copy_(grid.to_fp16_grid(self.scale))

    def frozen(self, spec) -> ActQuantizer:
        """A plain static quantizer with the learned step size (fp16 grid)."""
        plain = ActQuantizer(spec).to(self.zero_point.device)
        with torch.no_grad():
            plain.scale.copy_(grid.to_fp16_grid(self.scale.detach()))
            plain.zero_point.copy_(self.zero_point)
        plain.calibrated = self.calibrated
        return plain


def timestep_index(timesteps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sampler timestep for each entry of ``t``."""
    return (t.reshape(-1, 1).float() - timesteps.reshape(1, -1).float()).abs().argmin(dim=1)


class TemporalActQuantizer(LSQActQuantizer):
    """Static activation quantizer with one learned step size per sampler timestep.

    EfficientDM's temporal activation LSQ (TALSQ) and QuEST's time-wise activation quantizer: the
    input of the denoiser call at timestep ``t`` (``qsearch.models.current_timestep``) uses the step
    size of the nearest sampler timestep; a batch may mix timesteps (one step size per example).
    The zero point is shared by all timesteps and stays an integer (EfficientDM also learns a real
    zero point per step, which an integer kernel could not use).
    """

    def __init__(self, spec, timesteps: torch.Tensor) -> None:
        super().__init__(spec)
        self.register_buffer("timesteps", timesteps.detach().clone().float())
        self.scale = nn.Parameter(torch.ones(len(timesteps)))
        self._index: torch.Tensor | None = None

    @classmethod
    def from_quantizer(cls, old: ActQuantizer, spec, timesteps: torch.Tensor) -> "TemporalActQuantizer":
        """Every timestep starts from ``old``'s calibrated step size."""
        new = cls(spec, timesteps).to(old.zero_point.device)
        with torch.no_grad():
            new.scale.fill_(float(old.scale))
            new.zero_point.copy_(old.zero_point)
        new.calibrated = old.calibrated
        return new

    def index(self, batch: int) -> torch.Tensor:
        """Step-size index per example of the current denoiser call.

        The index is remembered, because gradient checkpointing recomputes the forward pass during
        backward, outside the denoiser call (and, on GPU, in another thread) where
        ``current_timestep`` is no longer set.
        """
        t = current_timestep.get()
        if t is not None:
            idx = timestep_index(self.timesteps, t.to(self.timesteps.device))
            if idx.numel() != batch:
                if bool((idx == idx[0]).all()):
                    idx = idx[:1].expand(batch)
                else:
                    raise ValueError(f"input batch {batch} does not match {idx.numel()} timesteps")
            self._index = idx
        if self._index is None:
            raise RuntimeError("timestep-aware quantizer called outside a denoiser call")
        return self._index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            return x
        idx = self.index(x.shape[0])
        view = (-1,) + (1,) * (x.dim() - 1)
        return self.fake_quant(x, self.step_size(x)[idx].view(view), self.zero_point)


# --------------------------------------------------------------------------------------------
# Initial ranges and quantizer swaps
# --------------------------------------------------------------------------------------------
InitMode = Literal["auto", "mse_clip", "keep", "lsq"]


def ensure_ranges(ctx: QuantContext, init: InitMode) -> None:
    """Start from calibrated ranges.

    ``auto``: keep the ranges of an earlier quantize stage, else run the MSE clipping search (the
    best PTQ range setting); ``mse_clip``: always run it; ``keep``: trust what is there; ``lsq``:
    MSE-searched activation ranges, weights at the paper's ``2<|w|>/sqrt(Q_P)`` (applied later,
    when the LSQ weight quantizers exist).
    """
    earlier = [n for n in ctx.state.get("stage_seconds", {}) if REGISTRY.get(n).kind == "quantize"]
    if init == "keep" or (init == "auto" and earlier):
        return
    REGISTRY.get("mse_clip")().apply(ctx)


def layers_with_weights(ctx: QuantContext, min_bits: int = 2, max_bits: int = 8) -> dict[str, QuantMixin]:
    """Layers with a core weight quantizer of ``min_bits`` to ``max_bits`` bits.

    A layer whose quantizer an earlier stage replaced by a kind of its own (timestep-dependent,
    learned rounding, ...) is left as that stage made it.
    """
    return {
        n: m for n, m in ctx.layers().items()
        if type(m.weight_quantizer) is WeightQuantizer and min_bits <= m.weight_quantizer.bits <= max_bits
    }


def use_lsq_weights(ctx: QuantContext, init_lsq: bool = False) -> list[nn.Parameter]:
    """Swap every multi-bit core weight quantizer for an LSQ one; returns the step sizes."""
    scales = []
    for layer in layers_with_weights(ctx).values():
        layer.weight_quantizer = LSQWeightQuantizer.from_layer(layer)
        if init_lsq:
            layer.weight_quantizer.init_lsq(layer.weight.detach())
        scales.append(layer.weight_quantizer.scale)
    return scales


def static_act_layers(ctx: QuantContext) -> dict[str, QuantMixin]:
    """Layers with a calibrated, static core activation quantizer (other kinds are left alone)."""
    return {
        n: m for n, m in ctx.layers().items()
        if type(m.act_quantizer) is ActQuantizer
        and not m.act_quantizer.dynamic and m.act_quantizer.calibrated
    }


def use_lsq_acts(ctx: QuantContext) -> list[nn.Parameter]:
    """Swap the static activation quantizers for LSQ ones; returns the step sizes."""
    scales = []
    for layer in static_act_layers(ctx).values():
        layer.act_quantizer = LSQActQuantizer.from_quantizer(layer.act_quantizer, layer.spec)
        scales.append(layer.act_quantizer.scale)
    return scales


def use_temporal_acts(ctx: QuantContext) -> list[nn.Parameter]:
    """Swap the static activation quantizers for timestep-indexed ones (one step per timestep)."""
    scales = []
    timesteps = ctx.sampler.timesteps.to(ctx.device)
    for layer in static_act_layers(ctx).values():
        layer.act_quantizer = TemporalActQuantizer.from_quantizer(layer.act_quantizer, layer.spec, timesteps)
        scales.append(layer.act_quantizer.scale)
    return scales


def freeze_quantizers(ctx: QuantContext) -> None:
    """Replace trained LSQ quantizers by plain ones (fp16 step sizes).

    Timestep-aware activation quantizers (subclasses) have no plain equivalent: they stay, with
    their parameters rounded as export stores them.
    """
    for layer in ctx.layers().values():
        if type(layer.weight_quantizer) is LSQWeightQuantizer:
            layer.weight_quantizer = layer.weight_quantizer.frozen()
        if type(layer.act_quantizer) is LSQActQuantizer:
            layer.act_quantizer = layer.act_quantizer.frozen(layer.spec)
        elif isinstance(layer.act_quantizer, LSQActQuantizer):
            layer.act_quantizer.round_for_export()


# --------------------------------------------------------------------------------------------
# Inputs to fine-tune on
# --------------------------------------------------------------------------------------------
class InputPool:
    """Denoiser inputs that a fine-tuning stage draws its mini-batches from."""

    def batch(self, size: int, generator: torch.Generator, device: torch.device) -> Batch:
        raise NotImplementedError


class TrajectoryPool(InputPool):
    """Inputs recorded on the FP model's sampling trajectories (or a calibration set)."""

    def __init__(self, inputs: CalibrationSet) -> None:
        self.inputs = inputs

    def batch(self, size: int, generator: torch.Generator, device: torch.device) -> Batch:
        idx = torch.randint(len(self.inputs), (size,), generator=generator)
        x, t, cond = next(self.inputs.subset(idx).batches(size, device))
        return x, t, cond, None


class DatasetPool(InputPool):
    """Training images noised at the sampler's timesteps (``x_t = sqrt(a) x0 + sqrt(1-a) eps``)."""

    def __init__(self, folder: str, ctx: QuantContext, limit: int) -> None:
        import numpy as np
        from PIL import Image

        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"dataset {folder!r} holds no .png/.jpg images")
        if ctx.sampler.scheduler.init_noise_sigma != 1.0:
            raise ValueError("dataset inputs need a scheduler without input scaling (ddim, ddpm)")
        cfg = ctx.model.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        vae = ctx.sampler.loaded.vae
        pixels = (size * 2 ** (len(vae.config.block_out_channels) - 1)) if vae is not None else size
        images = []
        for f in files[:limit]:
            rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
            img = torch.from_numpy(rgb).permute(2, 0, 1).div(127.5).sub(1).unsqueeze(0)
            images.append(F.interpolate(img, size=(pixels, pixels), mode="bilinear", antialias=True))
        x0 = torch.cat(images)
        if vae is not None:
            with torch.no_grad():
                dev = next(vae.parameters()).device
                x0 = torch.cat([
                    vae.encode(chunk.to(dev)).latent_dist.mean.cpu() * vae.config.scaling_factor
                    for chunk in x0.split(32)
                ])
        self.x0 = x0
        self.sampler = ctx.sampler
        self.model = ctx.model

    def batch(self, size: int, generator: torch.Generator, device: torch.device) -> Batch:
        idx = torch.randint(len(self.x0), (size,), generator=generator)
        steps = self.sampler.timesteps
        t = steps[torch.randint(len(steps), (size,), generator=generator)]
        x0 = self.x0[idx]
        noise = torch.randn(x0.shape, generator=generator)
        x = self.sampler.scheduler.add_noise(x0, noise, t)
        cond, _ = self.sampler.conditioning(self.model, idx)
        return x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()}, noise.to(device)


def trajectory_inputs(ctx: QuantContext) -> CalibrationSet:
    """Every recorded ``(step, sample)`` input of the FP trajectories."""
    traj = ctx.trajectory
    steps = torch.arange(traj.num_steps).repeat_interleave(traj.num_samples)
    samples = torch.arange(traj.num_samples).repeat(traj.num_steps)
    return CalibrationSet.from_trajectory(traj, steps, samples)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def teacher_eps(ctx: QuantContext, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The FP model's noise prediction (no gradients)."""
    with torch.no_grad():
        return ctx.fp_denoiser.forward(x, t, cond)


def distill_loss(ctx: QuantContext) -> Callable[[Batch], torch.Tensor]:
    """MSE between the quantized and the FP model's noise predictions."""

    def loss(batch: Batch) -> torch.Tensor:
        x, t, cond, _ = batch
        return F.mse_loss(ctx.denoiser.forward(x, t, cond), teacher_eps(ctx, x, t, cond))

    return loss


class FeatureTap:
    """Outputs of the same-named modules of the quantized model and of the FP teacher.

    Representation-mimicking losses (BinaryDM's LRM, BiDM's SPD, QuEST's layer loss) compare them;
    a tap is a context manager that holds forward hooks on both models while it is open.
    """

    def __init__(self, ctx: QuantContext, names: Sequence[str]) -> None:
        self.names = list(names)
        self.student_modules = [ctx.model.get_submodule(n) for n in self.names]
        self.teacher_modules = [ctx.fp_denoiser.model.get_submodule(n) for n in self.names]
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "FeatureTap":
        for name, s, t in zip(self.names, self.student_modules, self.teacher_modules):
            self._handles.append(s.register_forward_hook(self._keep(self.student, name)))
            self._handles.append(t.register_forward_hook(self._keep(self.teacher, name, detach=True)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _keep(store: dict, name: str, detach: bool = False):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            store[name] = out.detach() if detach else out

        return hook

    def pairs(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, student_output, teacher_output)`` of the last forward passes."""
        for name in self.names:
            yield name, self.student[name], self.teacher[name]


def block_names(model: nn.Module) -> list[str]:
    """The denoiser's building blocks (residual, attention, resampling, transformer blocks).

    Their outputs are the intermediate representations that BinaryDM and BiDM mimic (the
    ``TimestepEmbedSequential`` outputs of the LDM U-Net in the authors' code).
    """
    kinds = ("ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D", "BasicTransformerBlock")
    names = [n for n, m in model.named_modules() if type(m).__name__ in kinds]
    # attention inside a transformer block is already covered by the block's output
    blocks = [n for n in names if type(model.get_submodule(n)).__name__ == "BasicTransformerBlock"]
    return [n for n in names if not any(n.startswith(b + ".") for b in blocks)]


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------
class FineTuneConfig(StageConfig):
    """Parameters shared by every fine-tuning stage (each method sets its own defaults)."""

    steps: int = Field(500, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="denoiser inputs per step")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        "adam", description="adam, adamw, or sgd (momentum 0.9)"
    )
    schedule: Literal["cosine", "linear"] = Field("cosine", description="learning-rate decay to zero")
    data: Literal["trajectory", "calibration"] = Field(
        "trajectory", description="inputs: every step of the FP trajectories, or the calibration set"
    )
    dataset: str | None = Field(
        None, description="folder of training images: inputs are these images noised instead"
    )
    dataset_images: int = Field(5000, ge=1, description="images read from the dataset folder")
    gradient_checkpointing: bool = Field(
        False, description="recompute block activations in backward (less memory, ~30% slower)"
    )
    grad_clip: float | None = Field(1.0, gt=0, description="gradient norm clip (null: off)")
    compile: bool = Field(
        False,
        description="torch.compile the quantized model while training: fuses the fake quantizers' "
        "elementwise chains (a GPU step is otherwise bound by kernel launches); the first step compiles",
    )
    plot: str | None = Field(None, description="save the loss curve as this PNG file")
    seed: int = 0


def input_pool(ctx: QuantContext, cfg: FineTuneConfig) -> InputPool:
    """Where the mini-batches come from, per the config."""
    if cfg.dataset:
        return DatasetPool(cfg.dataset, ctx, cfg.dataset_images)
    if cfg.data == "calibration":
        return TrajectoryPool(ctx.require_calibration("fine-tuning"))
    return TrajectoryPool(trajectory_inputs(ctx))


@contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """diffusers' activation checkpointing while training (when the model supports it)."""
    if not (enabled and getattr(model, "_supports_gradient_checkpointing", False)):
        yield
        return
    model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        model.disable_gradient_checkpointing()


@contextmanager
def compiled_for_training(ctx: QuantContext, enabled: bool) -> Iterator[None]:
    """The student denoiser runs ``torch.compile(model)`` inside, the eager model again after.

    A quantized layer runs ~15 elementwise kernels per fake quantizer forward and as many backward
    (about 15,000 per step on the zoo U-Net), so a GPU training step is launch-bound; Inductor fuses
    each chain into one kernel. The model is compiled in place, so the parameters trained are its
    own; only the student is compiled, only while training (calibration and sampling stay eager).
    """
    if not enabled:
        yield
        return
    model = ctx.model
    model.compile()  # in place: module names (ctx.layers()) and parameters stay the model's own
    try:
        yield
    finally:
        model._compiled_call_impl = None  # what nn.Module.compile set: calls are eager again


@contextmanager
def recompute_weights(layers: Sequence[QuantMixin]) -> Iterator[None]:
    """Make quantized layers recompute their fake-quantized weight in every training forward.

    The core caches a layer's quantized weight unless the weight or the quantizer's ``scale``
    requires gradients; a quantizer whose trained parameters are elsewhere (an adapter) would be
    served the stale cache. Marking the weights as requiring gradients bypasses it; quantizers that
    do not use the weight in their graph give it no gradient, so this costs nothing.
    """
    flags = [(layer.weight, layer.weight.requires_grad) for layer in layers]
    for layer in layers:
        layer.weight.requires_grad_(True)
    try:
        yield
    finally:
        for weight, flag in flags:
            weight.requires_grad_(flag)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=True,
    )


def fine_tune(
    ctx: QuantContext,
    name: str,
    groups: list[dict],
    cfg: FineTuneConfig,
    loss_fn: Callable[[Batch], torch.Tensor],
    *,
    pool: InputPool | None = None,
    steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Minimise ``loss_fn`` over mini-batches with Adam (or SGD) and a cosine schedule.

    ``groups`` are optimizer parameter groups (``{"params": [...], "lr": ...}``, each with its own
    learning rate); only their parameters get gradients. Returns the loss of every step, which is
    also stored under ``ctx.state["loss_curves"][name]``; ``on_step(i)`` runs after step ``i``.
    """
    steps = steps or cfg.steps
    pool = pool or input_pool(ctx, cfg)
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9)
    else:
        opt = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(groups)
    if cfg.schedule == "linear":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[torch.Tensor] = []
    started = time.perf_counter()
    with (
        gradient_checkpointing(ctx.model, cfg.gradient_checkpointing),
        compiled_for_training(ctx, cfg.compile),
        _progress() as progress,
    ):
        task = progress.add_task(name, total=steps, loss="-")
        for i in range(steps):
            loss = loss_fn(pool.batch(cfg.batch_size, gen, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.detach())
            if on_step is not None:
                on_step(i)
            if i % 10 == 0 or i == steps - 1:
                progress.update(task, completed=i + 1, loss=f"{losses[-1].item():.4g}")
            if not progress.console.is_terminal and (i + 1) % max(1, steps // 20) == 0:
                # a log file gets no live bar: a line every 5% of the steps, with the time left
                elapsed = time.perf_counter() - started
                progress.console.print(
                    f"{name}: step {i + 1}/{steps}, loss {losses[-1].item():.4g}, {elapsed:.0f} s, "
                    f"~{elapsed / (i + 1) * (steps - i - 1):.0f} s left"
                )
    for p in params:
        p.requires_grad_(False)
    curve = torch.stack(losses).float().cpu().tolist()
    record(ctx, name, curve, time.perf_counter() - started, cfg.plot)
    return curve


def record(ctx: QuantContext, name: str, curve: list[float], seconds: float, plot: str | None) -> None:
    """Loss curve, training time and peak GPU memory into ``ctx.state``; optional PNG."""
    ctx.state.setdefault("loss_curves", {})[name] = curve
    ctx.state.setdefault("train_seconds", {})[name] = seconds
    if ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**20
        ctx.state["peak_memory_mb"] = max(ctx.state.get("peak_memory_mb", 0.0), peak)
    if plot:
        plot_curves(ctx.state["loss_curves"], plot)


def plot_curves(curves: dict[str, list[float]], path: str) -> None:
    """Loss curves on a log scale (matplotlib is imported only when a plot is asked for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(curve, label=name, linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
@register("lsq")
class LSQ(Quantizer):
    """Quantization-aware fine-tuning with learned step sizes (STE), distilling the FP model."""

    paper = "Esser et al., Learned Step Size Quantization (ICLR 2020)"

    class Config(FineTuneConfig):
        lr: float = Field(1e-5, gt=0, description="learning rate of the weights")
        quant_lr: float = Field(1e-5, gt=0, description="learning rate of the step sizes")
        train_weights: bool = Field(True, description="also train weights, biases and norms (full QAT)")
        init: InitMode = Field(
            "auto", description="auto: earlier quantize stage's ranges, else MSE clipping; lsq: paper's"
        )

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        scales = use_lsq_weights(ctx, init_lsq=cfg.init == "lsq") + use_lsq_acts(ctx)
        groups = [{"params": scales, "lr": cfg.quant_lr}]
        if cfg.train_weights:
            ids = {id(s) for s in scales}
            groups.append({"params": [p for p in ctx.model.parameters() if id(p) not in ids], "lr": cfg.lr})
        fine_tune(ctx, self.name, groups, cfg, distill_loss(ctx))
        freeze_quantizers(ctx)
