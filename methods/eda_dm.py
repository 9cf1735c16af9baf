"""EDA-DM's TDAC: Temporal Distribution Alignment Calibration.

Liu et al. allocate the calibration budget over the sampling steps by how *representative* each
step's activations are, so that the calibration set follows the distribution of activations over
the whole denoising process instead of sampling steps blindly. For every step ``t`` they take the
feature map ``F_t`` of the FP model (the input of the U-Net's middle attention block) on a batch of
its own denoising trajectories and score it twice:

* density ``D_t = #{s != t : mean((F_t - F_s)^2) <= r}``: how many other steps look like it (steps in
  a dense region stand for many others);
* variety ``V_t = sum_{s != t} sum_positions (1 - cos(F_t, F_s))``, the cosine taken over channels at
  each (sample, pixel): how different it is from the rest (rare steps must not be missed).

Both are min-max normalised, ``w_t = D_t + lambda * V_t``, and step ``t`` receives
``round(N * w_t / sum w)`` of the ``N`` calibration inputs, the rounding error being settled as in
the authors' code (missing inputs go to the steps with the most, surplus ones are taken from the
last steps). The inputs are the pool's FP trajectory at those steps, input ``k`` from trajectory
``k mod pool`` after shuffling the step list, as the authors' generator does.

Defaults are the authors' CIFAR-10 settings (``scripts/calibration.py``, ``scripts/for_cifar.sh``):
``N = 1024``, ``lambda = 1.2``, ``r = 3.0`` (their ImageNet value too; LSUN uses 0.3). ``r`` is an
absolute mean squared distance, so it depends on the model's feature scale: with a model whose
features are all closer (or all farther) than ``r`` the density term is constant and drops out.
Features: the middle block's attention input for U-Nets (its resnet output), the middle
transformer block's input for DiT/PixArt; with classifier-free guidance the conditional branch.

EDA-DM's second half, FBR (Fine-grained Block Reconstruction), is the quantizer ``eda_dm_fbr``:
BRECQ's block reconstruction whose loss also aligns the output of every quantized layer inside the
block with the same block run in full precision on the same inputs,
``L = ||B(x) - B_fp(x)||^2 + lambda_fbr * sum_l ||l(x) - l_fp(x)||^2``, the sum over the block's
layers in module order except the last (as the authors' ``block_reconstruction``; their CIFAR-10
``add_loss`` = 0.8), in the weight and the activation phase alike. The authors also drop AdaRound's
rounding regulariser (``round_loss='none'``); ``eda_dm_fbr`` keeps BRECQ's, so that its rounding is
decided by the end of training (set ``rounding_weight: 0`` for theirs).

Paper: X. Liu, Z. Li, J. Xiao, Q. Gu, "Enhanced Distribution Alignment for Post-Training
Quantization of Diffusion Models" (EDA-DM), arXiv:2401.04585, 2024. Code:
https://github.com/BienLuky/EDA-DM (``scripts/calibration.py``: ``TDAC_*_calib_data_generator``;
``qdiff/block_recon.py``: ``block_reconstruction``; ``scripts/task_config.py``: defaults).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from methods.brecq import (
    BlockConfig, Reconstruction, Unit, UnitData, UnitLoss, act_training, lp_loss,
)
from methods.lsq import ensure_ranges
from qsearch.calibration import CalibrationSet
from qsearch.models import Denoiser
from qsearch.quant import full_precision
from qsearch.registry import register
from qsearch.sampling import Trajectory
from qsearch.stages import CalibrationSampler, QuantContext, Quantizer, StageConfig


def feature_module(model: nn.Module) -> nn.Module:
    """Where TDAC reads features: the U-Net's middle attention, or the middle transformer block."""
    mid = getattr(model, "mid_block", None)
    if mid is not None:
        attentions = [a for a in getattr(mid, "attentions", []) if a is not None]
        return attentions[0] if attentions else mid
    blocks = getattr(model, "transformer_blocks", None)
    if blocks:
        return blocks[len(blocks) // 2]
    raise TypeError(f"{type(model).__name__}: no middle block to take TDAC features from")


@torch.no_grad()
def step_features(denoiser: Denoiser, traj: Trajectory, samples: int, batch_size: int) -> list[torch.Tensor]:
    """Per sampling step, the feature map of the first ``samples`` trajectories, as (N, C, positions)."""
    captured: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        captured.append(h.detach().float().cpu())

    handle = feature_module(denoiser.model).register_forward_pre_hook(grab, with_kwargs=True)
    features = []
    try:
        for k in range(traj.num_steps):
            captured.clear()
            for s in range(0, samples, batch_size):
                e = min(samples, s + batch_size)
                cond = {key: v[s:e].to(denoiser.device) for key, v in traj.cond.items()}
                x, t = traj.xs[k, s:e].to(denoiser.device), traj.timesteps[k].to(denoiser.device)
                denoiser.forward(x, t, cond)
            f = torch.cat(captured)
            features.append(f.flatten(2) if f.dim() == 4 else f.transpose(1, 2))
    finally:
        handle.remove()
    return features


def timestep_scores(features: list[torch.Tensor], radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw density and variety of each step (before normalisation).

    Both come from one Gram matrix of the flattened features: ``mean((F_i - F_j)^2)`` from the
    norms and inner products, and the summed cosine distance over positions from the Gram matrix
    of the channel-normalised features.
    """
    f = torch.stack([x.double() for x in features])  # (T, N, C, P)
    steps = f.shape[0]
    flat = f.reshape(steps, -1)
    gram = flat @ flat.T
    sq = gram.diagonal()
    mse = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0) / flat.shape[1]
    off = ~torch.eye(steps, dtype=torch.bool)
    density = ((mse <= radius) & off).sum(1).double()
    unit = (f / f.norm(dim=2, keepdim=True).clamp_min(1e-6)).reshape(steps, -1)
    positions = f.shape[1] * f.shape[3]
    cos_distance = positions - unit @ unit.T
    variety = (cos_distance * off).sum(1)
    return density, variety


def min_max(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min)``; a constant score carries no information and becomes 0."""
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def allocate(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Inputs per step, ``round(n * w / sum w)`` with the authors' settlement of rounding errors."""
    counts = (weights / weights.sum() * n).round().long()
    error = n - int(counts.sum())
    if error >= 0:
        order = torch.sort(counts, descending=True, stable=True).indices
        counts[order[:error]] += 1
    else:
        for i in reversed(range(len(counts))):
            if error == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                error += 1
    return counts


@register("eda_dm")
class TemporalDistributionAlignment(CalibrationSampler):
    """EDA-DM TDAC: inputs per step in proportion to feature density + lambda x variety."""

    paper = "Liu et al., Enhanced Distribution Alignment for PTQ of Diffusion Models (EDA-DM, 2024)"

    class Config(StageConfig):
        n_samples: int = Field(1024, ge=1, description="calibration inputs (authors: 1024)")
        lamda: float = Field(1.2, ge=0.0, description="weight of the variety score (authors, CIFAR-10: 1.2)")
        radius: float = Field(3.0, gt=0.0, description="density radius on mean squared feature distance")
        feature_samples: int | None = Field(
            None, ge=1, description="trajectories whose features score the steps (null: the whole pool)"
        )
        seed: int = 0

    def weights(self, ctx: QuantContext) -> torch.Tensor:
        """``w_t = D_t + lambda V_t`` (normalised scores) for every sampling step of the pool."""
        traj = ctx.trajectory
        samples = min(self.config.feature_samples or traj.num_samples, traj.num_samples)
        features = step_features(ctx.fp_denoiser, traj, samples, ctx.batch_size)
        density, variety = timestep_scores(features, self.config.radius)
        w = min_max(density) + self.config.lamda * min_max(variety)
        return w if w.sum() > 0 else torch.ones_like(w)

    def select(self, ctx: QuantContext) -> CalibrationSet:
        traj = ctx.trajectory
        counts = allocate(self.weights(ctx), self.config.n_samples)
        ctx.state.setdefault(self.name, {})["counts"] = counts
        g = torch.Generator().manual_seed(self.config.seed)
        steps = torch.repeat_interleave(torch.arange(traj.num_steps), counts)
        steps = steps[torch.randperm(len(steps), generator=g)]
        samples = torch.arange(len(steps)) % traj.num_samples
        return CalibrationSet.from_trajectory(traj, steps, samples)



def unit_outputs(unit: Unit, data: UnitData, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The unit's output on the inputs at ``index`` and each of its layers' outputs."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda mod, args, out, _n=name: outputs.__setitem__(_n, out))
        for name, layer in unit.layers.items()
    ]
    try:
        return data.call(unit.module, index), outputs
    finally:
        for h in handles:
            h.remove()


def fbr_loss(weight: float) -> UnitLoss:
    """FBR: the block's output loss plus ``weight`` x the L2 losses of its layers but the last."""

    def loss(unit: Unit, data: UnitData, index: torch.Tensor, p: float) -> torch.Tensor:
        out, quantized = unit_outputs(unit, data, index)
        block = lp_loss(out, data.target[index], p)
        inner = list(unit.layers)[:-1]
        if not inner or weight == 0:
            return block
        with torch.no_grad(), full_precision(unit.layers):
            _, full = unit_outputs(unit, data, index)
        layers = sum(lp_loss(quantized[n], full[n], 2.0) for n in inner if n in quantized and n in full)
        return block + weight * layers

    return loss


@register("eda_dm_fbr")
class FineGrainedBlockReconstruction(Quantizer):
    """EDA-DM FBR: block reconstruction whose loss also aligns each layer inside the block."""

    paper = "Liu et al., Enhanced Distribution Alignment for PTQ of Diffusion Models (EDA-DM, 2024)"

    class Config(BlockConfig):
        layer_weight: float = Field(
            0.8, ge=0.0, description="weight of the layer losses (authors' add_loss; CIFAR-10: 0.8)"
        )

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        ensure_ranges(ctx, cfg.init)
        rec = Reconstruction.prepare(ctx, self.name, cfg.samples, cfg.seed)
        rec.loss = fbr_loss(cfg.layer_weight)
        rec.weights(cfg)
        rec.activations(act_training(cfg))
