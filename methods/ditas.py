"""DiTAS: temporal-aggregated smoothing with a per-layer grid search of the migration strength.

Dong & Zhang, "DiTAS: Quantizing Diffusion Transformers via Enhanced Activation Smoothing", WACV 2025
(arXiv 2409.07756); authors' code: https://github.com/DZY122/DiTAS (``LinearQuant.py``).

Activation outliers of DiT linears sit in a few channels, and *which* channels, and how large, drifts
over the denoising steps. DiTAS smooths them SmoothQuant-style with factors that cover every step:

* **Temporal-aggregated smoothing (TAS)**: the activation salience of input channel ``j`` is its
  max |x_j| aggregated over all timesteps of the calibration set (the maximum of the per-step maxima,
  as the authors' ``activation_scale_max`` accumulates it), ``a_j = max_t max|X_j^(t)|``; with the
  weight's ``w_j = max|W_j|`` the smoothing factor is ``s_j = a_j^alpha / w_j^(1 - alpha)``
  (clamped at 1e-4), ``X <- X / s`` and ``W <- W s``.
* **Layer-wise grid search**: ``alpha`` is chosen per layer from ``{0, 0.05, ..., 1}`` (21 values) as
  the one whose *quantized* layer output is closest (MSE, summed over the timesteps) to the FP output:
  the smoothed weight is min-max quantized with the layer's weight quantizer and the smoothed input
  with its activation quantizer (static quantizers get the min-max range over all timesteps, dynamic
  ones their per-call range), exactly the grids the following ``rtn`` stage sets. (The authors'
  ``optimization`` multiplies the weight quantized *before* smoothing by the factor and does not
  re-quantize it, so their search sees the activation error only; here the error is that of the
  layer as it will run, with both operands quantized after smoothing.)
* **Re-parameterization** as in the authors' ``merge``: ``1/s`` of QKV and FC1 folds into the adaLN
  modulation, of the attention projection into ``to_v``; FC2's stays an online division (the layer's
  ``pre``). The machinery is PTQ4DiT's (``methods.ptq4dit``); ``to_q/to_k/to_v`` share one factor
  (the authors' fused ``qkv``) and their errors are summed.

What is partial: DiTAS also replaces the weights by a training-free LoRA-corrected quantization
(rank 32, alternating SVD of the quantization residual); this stage is the smoothing only (low-rank
branches are SVDQuant's stage). Rows are a uniform sample of each layer's inputs (``max_rows``), so a
dynamic per-tensor quantizer sees per-step samples rather than whole calls.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from methods.ptq4dit import (
    DIT_LINEARS, SALIENCE_FLOOR, BalancingGroup, balancing_groups, timestep_stats,
)
from qsearch.quant.modules import QuantMixin
from qsearch.registry import register
from qsearch.stages import QuantContext, Reparameterizer, StageConfig

FACTOR_FLOOR = 1e-4  # the authors' clamp of the smoothing factor


def smoothing_factor(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j^alpha / w_j^(1 - alpha)`` (inputs are divided by it, weight columns multiplied)."""
    a = act_max.clamp(min=SALIENCE_FLOOR)
    w = weight_max.to(a).clamp(min=SALIENCE_FLOOR)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=FACTOR_FLOOR)


@torch.no_grad()
def smoothed_output_error(layer: QuantMixin, steps: list[torch.Tensor], factor: torch.Tensor) -> float:
    """Sum over timesteps of the MSE between the layer's FP output and its output after smoothing by
    ``factor`` and quantizing with (copies of) its own quantizers. ``steps``: input rows per timestep."""
    weight = layer.weight.detach() * factor
    wq = copy.deepcopy(layer.weight_quantizer)
    if wq is not None:
        wq.init_minmax(weight)
        weight = wq(weight)
    aq = copy.deepcopy(layer.act_quantizer)
    smoothed = [x / factor for x in steps]
    if aq is not None and not aq.dynamic:
        aq.set_range(min(x.amin() for x in smoothed), max(x.amax() for x in smoothed))
    error = 0.0
    for x, xs in zip(steps, smoothed):
        reference = F.linear(x, layer.weight, layer.bias)
        out = F.linear(aq(xs) if aq is not None else xs, weight, layer.bias)
        error += (out - reference).pow(2).mean().item()
    return error


def search_alpha(
    group: BalancingGroup, steps: list[torch.Tensor], act_max: torch.Tensor, alphas: torch.Tensor
) -> tuple[float, list[float]]:
    """The grid's alpha with the least summed output error of the group's quantized layers."""
    weight_max = group.weight_salience()
    quantized = [layer for layer in group.layers.values() if isinstance(layer, QuantMixin)]
    errors = []
    for alpha in alphas.tolist():
        factor = smoothing_factor(act_max, weight_max, alpha)
        errors.append(sum(smoothed_output_error(layer, steps, factor) for layer in quantized))
    best = min(range(len(errors)), key=errors.__getitem__)
    return float(alphas[best]), errors


@register("ditas")
class DiTAS(Reparameterizer):
    """Temporal-aggregated activation smoothing with a per-layer grid search of the migration strength."""

    paper = ("Dong & Zhang, DiTAS: Quantizing Diffusion Transformers via Enhanced Activation Smoothing, "
             "WACV 2025")

    class Config(StageConfig):
        layers: list[str] = Field(
            default_factory=lambda: list(DIT_LINEARS), description="glob patterns of the layers smoothed"
        )
        grid: int = Field(21, ge=2, description="alphas tried, evenly in [0, 1] (steps of 0.05 in the paper)")
        max_rows: int = Field(2048, ge=16, description="input rows kept per layer for the error search")

    def apply(self, ctx: QuantContext) -> None:
        groups = balancing_groups(ctx, self.config.layers, self.name)
        reps = {g.representative: g.layers[g.representative] for g in groups}
        stats = timestep_stats(ctx, reps, self.name, max_rows=self.config.max_rows)
        alphas = torch.linspace(0.0, 1.0, self.config.grid)
        chosen = {}
        for group in reversed(groups):  # backwards: see ``balancing_groups``
            act_max = stats.absmax[group.representative].amax(0).to(ctx.device)
            steps = [r.to(ctx.device) for r in stats.rows[group.representative]]
            alpha, _ = search_alpha(group, steps, act_max, alphas)
            chosen[group.representative] = alpha
            group.apply(1.0 / smoothing_factor(act_max, group.weight_salience(), alpha))
        ctx.state["ditas_alpha"] = chosen
