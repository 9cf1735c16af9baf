"""BitsFusion mixed precision: each layer's sensitivity to low-bit weights, and bits for a budget.

Sui et al., "BitsFusion: 1.99 bits Weight Quantization of Diffusion Model", NeurIPS 2024
(arXiv 2406.04333). No code was released with the paper.

The paper's mixed-precision recipe (its Sec. 3.2-3.3) rests on a per-layer analysis: quantize *one*
layer's weights to low bits, keep every other layer in full precision, and measure how far the
generated images move from the full-precision ones (MSE; CLIP score for text alignment). Layers differ
by orders of magnitude; the error of a layer must then be weighed against what its bits cost, i.e. its
parameter count, so that bits go where they buy the most quality per stored bit.

* ``layer_sensitivity`` measures the drop: the base recipe is quantized once (so every layer has its
  resolved spec, reparameterization and grids), all layers are switched to full precision, and each
  layer in turn gets a ``low_bits`` weight grid (min-max, the layer's granularity and format) with FP
  activations. The drop is the MSE against the FP model of the noise prediction on FP-trajectory inputs
  (``measure="eps"``, cheap: one denoiser call per input and layer) or of the final samples on fixed
  seeds (``measure="samples"``, the paper's measurement).
* ``assign_bits`` turns drops into widths for a target average: a greedy multiple-choice knapsack.
  All layers start at the lowest width; the upgrade with the largest quality gain per added stored bit
  is applied while it fits the budget. The gain of moving a layer from ``b`` to ``b'`` bits models its
  drop as quantization-noise power, ``drop * 4^(low_bits - b)`` (each bit halves the step), so only
  the one measurement at ``low_bits`` is needed; gain per bit is ``drop * (4^-b - 4^-b') / (params *
  (b' - b))``, i.e. sensitivity per parameter. The average never exceeds the target, and of two layers
  of the same size the more sensitive one never gets fewer bits.

Why helpers and no stage: a stage runs after ``quantize_`` has fixed every layer's spec, so it cannot
change bit widths. Mixed precision is instead a recipe *input*: ``mixed_precision_overrides`` turns an
assignment into the recipe's ``overrides`` (one exact-name pattern per layer), and
``benchmarks/bitsfusion_assign.py`` writes such recipes; the search uses the same two functions.

What is partial: the paper measures each layer at 1, 2 and 3 bits and also uses the CLIP-score drop
(text-to-image models); here one width is measured and the others follow the noise-power model, and
only the image/noise MSE is used (the reference models are class-conditional). BitsFusion's
initialization (balance integer, cached time embedding, alternating scale optimization) and its
two-stage distillation training are quantization-aware training, not part of this module.
"""

from __future__ import annotations

import glob
import heapq
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from qsearch.calibration import CalibrationSet
from qsearch.engine import AUTOCAST, Session
from qsearch.quant.apply import quantizable_layers
from qsearch.quant.modules import QuantModule, full_precision
from qsearch.quant.quantizers import WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.recipe import RecipeBase
from qsearch.stages import QuantContext


def weight_params(model: nn.Module) -> dict[str, int]:
    """Weight elements of every Conv2d/Linear layer, by name (the cost side of the assignment)."""
    return {name: layer.weight.numel() for name, layer in quantizable_layers(model).items()}


@contextmanager
def _alone_at(layer: QuantModule, bits: int) -> Iterator[None]:
    """The layer with ``bits``-bit min-max weights and FP inputs, everything else untouched."""
    saved = (layer.weight_quantizer, layer.act_quantizer, layer.quant_enabled)
    spec = QuantSpec(**{**layer.spec.model_dump(), "w_bits": bits})
    low = WeightQuantizer(spec, layer.weight.shape).to(layer.weight.device)
    low.init_minmax(layer.weight.detach())
    layer.weight_quantizer, layer.act_quantizer, layer.quant_enabled = low, None, True
    try:
        yield
    finally:
        layer.weight_quantizer, layer.act_quantizer, layer.quant_enabled = saved


def _eps_probe(session: Session, recipe: RecipeBase, ctx: QuantContext, n: int, seed: int) -> Callable[[], float]:
    """MSE of the quantized model's noise prediction vs FP on ``n`` inputs from the FP trajectories."""
    pool = recipe.calibration_pool
    traj = session.trajectory(pool.samples, pool.seed)
    g = torch.Generator().manual_seed(seed)
    inputs = CalibrationSet.from_trajectory(
        traj, torch.randint(traj.num_steps, (n,), generator=g), torch.randint(traj.num_samples, (n,), generator=g)
    )
    bs = recipe.eval.batch_size

    def predict(denoiser) -> torch.Tensor:
        return torch.cat([denoiser.forward(x, t, c).float() for x, t, c in inputs.batches(bs, denoiser.device)])

    reference = predict(session.fp)
    return lambda: (predict(ctx.denoiser) - reference).pow(2).mean().item()


def _sample_probe(session: Session, recipe: RecipeBase, ctx: QuantContext, n: int) -> Callable[[], float]:
    """MSE of the quantized model's samples vs the FP samples on the evaluation seeds."""
    ev = recipe.eval
    reference = session.fp_samples(n, ev.seed)

    def probe() -> float:
        samples = session.sampler.sample(ctx.denoiser, n, seed=ev.seed, batch_size=ev.batch_size,
                                         autocast=AUTOCAST[session.base.eval.autocast])
        return (samples - reference).pow(2).mean().item()

    return probe


@torch.no_grad()
def layer_sensitivity(
    session: Session,
    recipe: RecipeBase,
    *,
    low_bits: int = 2,
    n_samples: int = 16,
    measure: Literal["eps", "samples"] = "eps",
    seed: int = 0,
) -> dict[str, float]:
    """Quality drop (MSE vs FP) when each weight-quantized layer alone has ``low_bits``-bit weights.

    ``recipe`` is the base recipe on the session's model: it fixes each layer's granularity, format and
    any reparameterization; keep its stages cheap (it is quantized once). The drops are raw: weighing
    them by parameter count is ``assign_bits``'s job.
    """
    ctx = session.quantize(recipe)
    layers = {n: l for n, l in ctx.layers().items() if l.weight_quantizer is not None}
    if measure == "eps":
        probe = _eps_probe(session, recipe, ctx, n_samples, seed)
    else:
        probe = _sample_probe(session, recipe, ctx, n_samples)
    drops: dict[str, float] = {}
    with full_precision(layers):
        for name, layer in layers.items():
            with _alone_at(layer, low_bits):
                drops[name] = probe()
    return drops


def _noise_power(bits: int) -> float:
    return 4.0 ** -bits


def assign_bits(
    sensitivity: dict[str, float], params: dict[str, int], choices: list[int], target_avg_bits: float
) -> dict[str, int]:
    """Bit width per layer (from ``choices``) with parameter-weighted average at most ``target_avg_bits``.

    Greedy multiple-choice knapsack: start every layer at the lowest width and repeatedly apply the
    upgrade with the largest modeled drop reduction per added bit, skipping upgrades that no longer fit.
    """
    levels = sorted(set(choices))
    names = sorted(sensitivity)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"no parameter count for layers: {', '.join(missing)}")
    total = sum(params[n] for n in names)
    if target_avg_bits < levels[0]:
        raise ValueError(f"target {target_avg_bits} bits is below the lowest choice {levels[0]}")
    level = {n: 0 for n in names}
    remaining = target_avg_bits * total - levels[0] * total

    def upgrade(name: str) -> tuple[float, str] | None:
        i = level[name]
        if i + 1 == len(levels):
            return None
        b, b_next = levels[i], levels[i + 1]
        gain = sensitivity[name] * (_noise_power(b) - _noise_power(b_next))
        return -gain / (params[name] * (b_next - b)), name

    heap = [u for u in map(upgrade, names) if u is not None]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        i = level[name]
        cost = params[name] * (levels[i + 1] - levels[i])
        if cost > remaining + 1e-9 * total:
            continue  # the layer's next width does not fit, so neither do the ones after it
        remaining -= cost
        level[name] = i + 1
        nxt = upgrade(name)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return {n: levels[level[n]] for n in names}


def mixed_precision_overrides(assignment: dict[str, int], default_bits: int | None = None) -> dict[str, dict[str, int]]:
    """Recipe ``overrides`` for an assignment: one exact-name pattern per layer not at ``default_bits``."""
    return {glob.escape(name): {"w_bits": bits} for name, bits in assignment.items() if bits != default_bits}
