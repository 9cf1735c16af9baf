"""ViDiT-Q: static-dynamic channel balancing, and metric-decoupled layer sensitivity.

Zhao, Fang, Huang, Wan, Soedarmadji, Liu, Li, Lin, Dai, Yan, Yang, Ning & Wang, "ViDiT-Q: Efficient
and Accurate Quantization of Diffusion Transformers for Image and Video Generation", ICLR 2025
(arXiv 2406.02540); authors' code: https://github.com/thu-nics/ViDiT-Q (``ViDiTQuantizedLinear``:
``get_channel_mask``, ``get_rotation_matrix``, ``update_quantized_weight_rotated_and_scaled``).

**Static-dynamic channel balancing.** DiT activations are imbalanced across channels in two ways: a
"static" part (channels that are large at every timestep) and a "dynamic" part that varies with the
timestep and the sample. ViDiT-Q combines the two families of balancing methods, each for the part it
handles: the scaling-based one (SmoothQuant) for the static imbalance, then the rotation-based one
(QuaRot's randomized Hadamard transform) for the time-varying remainder, which a data-independent
orthogonal rotation spreads over all channels whatever its position. Per linear layer, as in the
authors' layer: ``x' = (x * m) R`` and ``W' = (W / m) R`` with

* ``m_j = max|W_j|^(1 - alpha) / a_j^alpha`` the SmoothQuant multiplier (``x / s``,
  ``s = a^alpha / w^(1-alpha)``), ``a_j`` the channel's max |x_j| over all calibration timesteps,
  and ``alpha = 0.3``, the migration strength of every W8A8/W4A8 config the authors publish
  (``t2i/configs/quant/*/pixart-dpm_w*a8.yml``; their running statistic is a momentum-0.95 average
  of per-batch channel maxima, here the plain maximum over the calibration set);
* ``R = diag(signs) H``: random signs and the normalized Sylvester-Hadamard matrix, orthogonal, so
  ``x' W'^T = x m R R^T m^-1 W^T = x W^T`` exactly.

Both are the layer's ``pre`` (online, as in the authors' code); the weight holds ``(W / m) R``. The
rest of ViDiT-Q is the quantization *scheme*, set in the recipe: token-wise dynamic activations
(``a_dynamic: true, a_granularity: token``) and channel-wise weights, then ``rtn``.

**Metric-decoupled mixed precision** (``layer_sensitivity``): a single error number hides *what* a
layer's quantization damages. ViDiT-Q quantizes one layer at a time and measures each aspect of the
generation with its own metric, so that a layer which is critical for one aspect (e.g. cross-attention
for text alignment) is kept at high precision even if it barely moves the others. The aspects here:
``quality`` (MSE of the generated samples vs the FP samples on fixed seeds) and ``alignment`` (how the
conditioning acts: ``1 - cos`` between the quantized and FP guidance directions
``eps(x, t, c) - eps(x, t, null)`` on FP-trajectory inputs; class- or text-conditional models). A
layer's sensitivity is its largest error over the metrics, each normalized by that metric's largest
layer error, so the top layers of *every* metric rank high.

What is partial: QuaRot (and ViDiT-Q) handle widths that are not powers of two with stored Hadamard
matrices of sizes 12, 20, 28, ...; here the rotation is block-diagonal over the largest power-of-two
divisor of the width (still orthogonal and exact, it mixes fewer channels; an odd width is only
scaled). The paper's metrics are learned ones (ImageReward/CLIP-IQA for quality, CLIPScore for text
alignment, a flow score for temporal consistency of videos); here they are the FP-referenced proxies
above, and there is no temporal metric (the reference models generate images).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methods.ptq4dit import DIT_LINEARS, SALIENCE_FLOOR, append_pre, timestep_stats
from qsearch.calibration import CalibrationSet
from qsearch.engine import AUTOCAST, Session
from qsearch.models import Denoiser
from qsearch.quant.hadamard import rotate_channels, rotation_block
from qsearch.quant.modules import QuantLinear, full_precision
from qsearch.recipe import RecipeBase
from qsearch.registry import register
from qsearch.stages import QuantContext, Reparameterizer, StageConfig


class ScaledRotation(nn.Module):
    """``x -> (x * scale * signs) blockdiag(H, ..., H)`` over the last axis.

    ``scale`` is the smoothing multiplier, ``signs`` the random +-1 of the randomized Hadamard
    transform; the rotation ``R = diag(signs) blockdiag(H)`` is orthogonal.
    """

    def __init__(self, scale: torch.Tensor, signs: torch.Tensor) -> None:
        super().__init__()
        channels = scale.numel()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("signs", signs.to(scale))
        self.block = rotation_block(channels)  # the Hadamard matrix follows from it: not stored

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, block={self.block}"

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` for the last axis of ``x``."""
        return rotate_channels(x * self.signs.to(x.dtype), self.block)

    def rotation(self) -> torch.Tensor:
        """The dense ``R`` (for inspection and tests)."""
        return self.rotate(torch.eye(self.scale.numel(), dtype=self.scale.dtype, device=self.scale.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate(x * self.scale.to(x.dtype))


def smoothing_multiplier(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``1 / s``, ``s_j = a_j^alpha / w_j^(1 - alpha)``: the factor the inputs get."""
    a = act_max.clamp(min=SALIENCE_FLOOR)
    w = weight_max.to(a).clamp(min=SALIENCE_FLOOR)
    return w.pow(1 - alpha) / a.pow(alpha)


@torch.no_grad()
def balance_layer(
    layer: QuantLinear, act_max: torch.Tensor | None, alpha: float, generator: torch.Generator
) -> None:
    """Scale (when ``act_max`` is given) then rotate the layer's input; the weight gets the inverse."""
    channels = layer.weight.shape[1]
    weight = layer.weight.detach().double()
    scale = (
        smoothing_multiplier(act_max.double(), weight.abs().amax(0), alpha)
        if act_max is not None else torch.ones(channels, dtype=torch.float64, device=weight.device)
    )
    signs = (torch.randint(0, 2, (channels,), generator=generator) * 2 - 1).to(weight)
    transform = ScaledRotation(scale, signs)
    layer.weight.copy_(transform.rotate(weight / scale).to(layer.weight.dtype))
    append_pre(layer, transform.to(layer.weight.dtype))


@register("vidit_q")
class ViDiTQ(Reparameterizer):
    """Static-dynamic channel balancing: SmoothQuant scaling, then a randomized Hadamard rotation."""

    paper = ("Zhao et al., ViDiT-Q: Efficient and Accurate Quantization of Diffusion Transformers for "
             "Image and Video Generation, ICLR 2025")

    class Config(StageConfig):
        layers: list[str] = Field(
            default_factory=lambda: list(DIT_LINEARS), description="glob patterns of the layers balanced"
        )
        alpha: float = Field(0.3, ge=0.0, le=1.0, description="SmoothQuant migration strength (authors' configs: 0.3)")
        scaling: bool = Field(True, description="static part: SmoothQuant channel scaling")
        seed: int = Field(0, description="seed of the random Hadamard signs")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        layers = {
            n: l for n, l in ctx.layers().items()
            if isinstance(l, QuantLinear) and any(fnmatch.fnmatchcase(n, p) for p in cfg.layers)
        }
        stats = timestep_stats(ctx, layers, self.name) if cfg.scaling else None
        g = torch.Generator().manual_seed(cfg.seed)
        for name, layer in layers.items():
            act_max = stats.absmax[name].amax(0) if stats is not None else None
            balance_layer(layer, act_max, cfg.alpha, g)


# --- metric-decoupled layer sensitivity -------------------------------------------------------------

Probe = Callable[[Denoiser], float]


def quality_probe(session: Session, recipe: RecipeBase, n: int) -> Probe:
    """MSE of a model's samples vs the FP samples on the evaluation seeds."""
    ev = recipe.eval
    reference = session.fp_samples(n, ev.seed)

    def probe(denoiser: Denoiser) -> float:
        samples = session.sampler.sample(denoiser, n, seed=ev.seed, batch_size=ev.batch_size,
                                         autocast=AUTOCAST[session.base.eval.autocast])
        return (samples - reference).pow(2).mean().item()

    return probe


def alignment_probe(session: Session, recipe: RecipeBase, n: int, seed: int) -> Probe | None:
    """``1 - cos`` of the guidance direction ``eps(c) - eps(null)`` vs FP on FP-trajectory inputs.

    None for a model without an unconditional input (nothing to align to).
    """
    pool = recipe.calibration_pool
    traj = session.trajectory(pool.samples, pool.seed)
    g = torch.Generator().manual_seed(seed)
    samples = torch.randint(traj.num_samples, (n,), generator=g)
    inputs = CalibrationSet.from_trajectory(traj, torch.randint(traj.num_steps, (n,), generator=g), samples)
    _, uncond = session.sampler.conditioning(session.fp.model, samples)
    if uncond is None:
        return None
    null_inputs = CalibrationSet(inputs.x, inputs.t, uncond)
    bs = recipe.eval.batch_size

    def direction(denoiser: Denoiser) -> torch.Tensor:
        dev = denoiser.device
        pairs = zip(inputs.batches(bs, dev), null_inputs.batches(bs, dev))
        return torch.cat([
            (denoiser.forward(x, t, c) - denoiser.forward(x, t, u)).flatten(1).float()
            for (x, t, c), (_, _, u) in pairs
        ])

    reference = direction(session.fp)
    return lambda denoiser: (1 - F.cosine_similarity(direction(denoiser), reference, dim=1)).mean().item()


@torch.no_grad()
def metric_sensitivity(
    session: Session,
    recipe: RecipeBase,
    *,
    low_bits: int = 2,
    n_samples: int = 16,
    kind: Literal["weight", "act"] = "weight",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per metric, the error of each layer quantized alone at ``low_bits`` (weights or activations).

    The recipe is quantized once with ``low_bits`` as its default width (its stages set every grid);
    then every layer but one is switched to full precision, and the probed layer keeps only the
    quantizer of ``kind``.
    """
    width = "w_bits" if kind == "weight" else "a_bits"
    low = recipe.model_copy(update={"quant": recipe.quant.model_copy(update={width: low_bits})})
    ctx = session.quantize(low)
    probes = {"quality": quality_probe(session, recipe, n_samples)}
    alignment = alignment_probe(session, recipe, n_samples, seed)
    if alignment is not None:
        probes["alignment"] = alignment
    result: dict[str, dict[str, float]] = {m: {} for m in probes}
    all_layers = ctx.layers()
    with full_precision(all_layers):
        for name, layer in all_layers.items():
            saved = (layer.weight_quantizer, layer.act_quantizer)
            if (saved[0] if kind == "weight" else saved[1]) is None:
                continue
            if kind == "weight":
                layer.act_quantizer = None
            else:
                layer.weight_quantizer = None
            layer.quant_enabled = True
            for metric, probe in probes.items():
                result[metric][name] = probe(ctx.denoiser)
            layer.quant_enabled = False
            layer.weight_quantizer, layer.act_quantizer = saved
    return result


def decoupled_sensitivity(per_metric: dict[str, dict[str, float]]) -> dict[str, float]:
    """A layer's largest error over the metrics, each normalized by its most sensitive layer's error."""
    score: dict[str, float] = {}
    for values in per_metric.values():
        top = max(values.values(), default=0.0) or 1.0
        for name, value in values.items():
            score[name] = max(score.get(name, 0.0), value / top)
    return score


def layer_sensitivity(
    session: Session, recipe: RecipeBase, *, low_bits: int = 2, n_samples: int = 16, **kw
) -> dict[str, float]:
    """ViDiT-Q's metric-decoupled sensitivity of every quantized layer (higher: keep more bits).

    ``kw``: ``kind`` ("weight" or "act") and ``seed`` of ``metric_sensitivity``.
    """
    return decoupled_sensitivity(
        metric_sensitivity(session, recipe, low_bits=low_bits, n_samples=n_samples, **kw)
    )
