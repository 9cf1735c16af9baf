"""APQ-DM's calibration half: the timesteps at which calibration images are generated, chosen actively.

APQ-DM (``apq_dm``) gives each group of timesteps its own activation grid and finds the groups by
a differentiable search over per-timestep importance weights ``pi_t = softmax(alpha_t)``. Its second
part argues that calibration images taken at random timesteps carry too little information for a
quantizer that must generalise over the whole denoising process, and picks the timestep of each
batch of calibration images by a structural-risk-minimization (SRM) criterion instead.

The rule, as the authors' code runs it (``--calib_t_mode diff``, the setting of their scripts): the
calibration set is built in rounds, ``1024 / 16 = 64`` rounds of 16 images on CIFAR-10 (4 per round on
CelebA); in each round

1. every sampling step ``t`` is scored ``S_t = U_t - lambda n_t``, where ``U_t`` is the uncertainty of
   the group search at ``t``, the entropy of the importance weights summed over the quantized layers
   (each layer's entropy divided by the number of groups ``G``), and ``n_t`` is how many rounds
   already took step ``t``; ``lambda = 2`` (``sample_weight``);
2. the first 30 of the 100 sampling steps (the noisiest) are never eligible; among the others the step
   with the highest score is taken, ties going to the latest (least noisy) step;
3. the round's batch of FP-generated images is taken at that step and ``n_t`` grows by one;
4. the group search trains on that batch, one AdamW step (lr 0.05, weight decay 0.05, a new optimizer
   each round) at each step of the schedule, which changes ``U`` for the next round.

Selection happens before the round's search step, so the first round (all importance weights equal,
``U`` flat) takes the last step. Our reading of why the two terms amount to SRM: ``U_t`` is the
empirical-risk side (where the group assignment is still undecided, calibration images are most
informative), and the count penalty keeps the calibration timesteps spread out, the role that a
summary of the paper (below) gives to a distribution-discrepancy (MMD) term between the calibration
set and the whole denoising process.

What is verified and what is our reading. Verified in the authors' code: the score, the 30-step
window, the tie rule, the count weight 2.0, the 1024 images in rounds of 16, the optimizer, the
initial importance logits (all 0.01), ``G = 8``, and how the entropy is normalised
(``runners/diffusion.py``: ``generate_calibrate_set`` and ``sample``; ``functions/denoising.py``:
``generalized_steps_loss``; ``main.py``: ``sample_weight``, ``diff_loss_weight``; ``sample_cifar.sh``).
Not verified: the paper's own statement of the SRM objective. The stored copies of the paper available
while writing this held its abstract only, and a third-party summary that describes the criterion as
balancing empirical risk against distributional similarity measured by MMD. So its section and
equation numbers, and whether the code's entropy-minus-count score is exactly the paper's objective
or an approximation of it, could not be checked.

How it runs here. The authors interleave selection with APQ-DM's actual search, whose importance
weights later quantize the model. In this pipeline the calibration set is fixed before any quantizer
runs, so this stage runs a search of its own only to drive the selection, and throws it away: per
quantized layer (static per-tensor activation quantizers), ``G`` grids over contiguous runs of the
sampling steps, as ``apq_dm`` starts, each with the min-max range of the layer's FP inputs at its
steps, and importance logits per step. Each round's search step runs on the round's pool
trajectories at every eligible step, so, as in the authors' loop, the weights of every step that can
be chosen move each round. Its loss for one layer at one step is the relative squared error of the
importance-weighted mixture of the group grids plus ``entropy_weight`` x the importance entropy
divided by ``G^2`` (the authors' normalisation). The error term is our choice: the authors use the
quantized model's noise-prediction loss on their re-noised calibration images, which needs the whole
quantized model in the loop. Our other departures: (a) the 30-of-100 window is kept as a fraction (``skip`` 0.3) so
that it carries to other step counts; (b) a round's calibration inputs are the FP trajectories of the
calibration pool at the chosen step, consecutive pool samples round by round, as the other samplers
here take theirs, where the authors generate new images each round and then re-noise them through
the whole schedule during their search; (c) the authors take one optimizer step per sampling step,
here one per round on all steps at once; (d) the last round takes no search step, because no later
choice would read it. Steps before the window never enter the calibration set, so ``apq_dm`` gives
them the group of the nearest chosen step. With no static activation quantizer ``U`` is flat and the
rule reduces to one round per step from the last step backwards.

Paper: C. Wang, Z. Wang, X. Xu, Y. Tang, J. Zhou, J. Lu, "Towards Accurate Post-training
Quantization for Diffusion Models", CVPR 2024 (arXiv:2305.18723). Code:
https://github.com/ChangyuanWang17/APQ-DM (``runners/diffusion.py``: ``generate_calibrate_set``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pydantic import Field
from torch import nn

from qsearch.calibration import CalibrationSet, input_hooks
from qsearch.models import Denoiser
from qsearch.quant.quantizers import ActQuantizer
from qsearch.registry import register
from qsearch.sampling import Trajectory
from qsearch.stages import CalibrationSampler, QuantContext, StageConfig

from methods.apq_dm import contiguous_groups, importance_entropy


INITIAL_LOGIT = 0.01
"""The authors fill the importance logits with one constant, so every search starts uniform."""


class SRMSelection:
    """The round-by-round choice: ``argmax_t U_t - lambda n_t`` over the eligible steps."""

    def __init__(self, num_steps: int, first: int, count_weight: float) -> None:
        """Steps ``first..num_steps-1`` are eligible (index 0 is the noisiest sampling step)."""
        if not 0 <= first < num_steps:
            raise ValueError(f"no eligible step: first eligible {first} of {num_steps} steps")
        self.first = first
        self.count_weight = count_weight
        self.counts = torch.zeros(num_steps, dtype=torch.long)

    def scores(self, uncertainty: torch.Tensor) -> torch.Tensor:
        """``S_t = U_t - lambda n_t`` for every step (eligible or not)."""
        return uncertainty.double().cpu() - self.count_weight * self.counts.double()

    def pick(self, uncertainty: torch.Tensor) -> int:
        """The eligible step of the highest score (the latest one on ties), counted as taken."""
        window = self.scores(uncertainty)[self.first:]
        step = self.first + int((window == window.max()).nonzero()[-1])
        self.counts[step] += 1
        return step


class ImportanceSearch:
    """APQ-DM's group search reduced to what the selection reads: per-step importance entropies.

    Per layer: ``G`` fixed grids, group ``g`` covering the min-max input range of the ``g``-th
    contiguous run of steps, and logits ``alpha`` of shape (steps, G).
    """

    def __init__(
        self, num_steps: int, quantizers: dict[str, ActQuantizer], lo: dict[str, torch.Tensor],
        hi: dict[str, torch.Tensor], groups: int, entropy_weight: float, lr: float, weight_decay: float,
    ) -> None:
        """``lo``/``hi`` (num_steps,): each layer's input range at every sampling step."""
        self.num_steps = num_steps
        self.quantizers = quantizers
        self.groups = groups
        self.entropy_weight = entropy_weight
        self.lr, self.weight_decay = lr, weight_decay
        self.grids: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.logits: dict[str, torch.Tensor] = {}
        for name, q in quantizers.items():
            run = contiguous_groups(num_steps, groups).to(lo[name].device)
            group_lo = torch.stack([lo[name][run == g].min() for g in range(groups)])
            group_hi = torch.stack([hi[name][run == g].max() for g in range(groups)])
            self.grids[name] = q.qparams(group_lo, group_hi)
            self.logits[name] = torch.full(
                (num_steps, groups), INITIAL_LOGIT, device=group_lo.device, requires_grad=True
            )

    def uncertainty(self) -> torch.Tensor:
        """``U_t``: the importance entropy at each step summed over layers, each divided by ``G``."""
        total = torch.zeros(self.num_steps, dtype=torch.float64)
        for logits in self.logits.values():
            total += importance_entropy(logits.detach()).double().cpu() / self.groups
        return total

    def accumulate(self, name: str, step: int, x: torch.Tensor) -> None:
        """Add the gradient of one layer's search loss on its input ``x`` at ``step``."""
        q, (scale, zero) = self.quantizers[name], self.grids[name]
        with torch.enable_grad():
            logits = self.logits[name][step]
            weights = torch.softmax(logits, dim=-1)
            mixed = sum(weights[g] * q.fake_quant(x, scale[g], zero[g]) for g in range(self.groups))
            error = (mixed - x).pow(2).mean() / x.pow(2).mean().clamp_min(1e-12)
            loss = error + self.entropy_weight * importance_entropy(logits) / self.groups ** 2
            loss.backward()

    def step(self) -> None:
        """One AdamW step on the accumulated gradients, from a new optimizer as the authors' rounds."""
        params = list(self.logits.values())
        torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay).step()
        for p in params:
            p.grad = None


@torch.no_grad()
def visit_inputs(
    denoiser: Denoiser, modules: dict[str, nn.Module], traj: Trajectory, steps: Sequence[int],
    samples: torch.Tensor, visit: Callable[[str, int, torch.Tensor], None],
) -> None:
    """Run the denoiser on pool trajectories ``samples`` at each step; ``visit(name, step, input)``."""
    device = denoiser.device
    current = {"step": 0}
    with input_hooks(modules, lambda name, x: visit(name, current["step"], x.detach().float())):
        for k in steps:
            current["step"] = k
            cond = {key: v[samples].to(device) for key, v in traj.cond.items()}
            denoiser.forward(traj.xs[k, samples].to(device), traj.timesteps[k].to(device), cond)


def step_ranges(
    denoiser: Denoiser, modules: dict[str, nn.Module], traj: Trajectory, samples: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Min and max of each module's input at every sampling step (inf where never called)."""
    k = traj.num_steps
    lo = {n: torch.full((k,), float("inf"), device=denoiser.device) for n in modules}
    hi = {n: torch.full((k,), float("-inf"), device=denoiser.device) for n in modules}

    def record(name: str, step: int, x: torch.Tensor) -> None:
        lo[name][step] = torch.minimum(lo[name][step], x.amin())
        hi[name][step] = torch.maximum(hi[name][step], x.amax())

    visit_inputs(denoiser, modules, traj, range(k), samples, record)
    return lo, hi


def static_act_quantizers(ctx: QuantContext) -> dict[str, ActQuantizer]:
    """A scratch quantizer per layer whose activations get one static per-tensor grid (what APQ-DM groups)."""
    return {
        name: ActQuantizer(layer.spec).to(ctx.device) for name, layer in ctx.layers().items()
        if type(layer.act_quantizer) is ActQuantizer and not layer.act_quantizer.dynamic
        and layer.act_quantizer.granularity == "tensor"
    }


@register("apq_dm_srm")
class SRMTimestepSelection(CalibrationSampler):
    """APQ-DM SRM: each round's calibration batch at the step of most uncertain grouping, less reuse."""

    paper = "Wang et al., Towards Accurate Post-training Quantization for Diffusion Models (CVPR 2024)"

    class Config(StageConfig):
        n_samples: int = Field(1024, ge=1, description="calibration inputs (authors: 1024)")
        batch_size: int = Field(
            16, ge=1, description="inputs per round, all at the round's step (authors: 16 CIFAR-10, 4 CelebA)"
        )
        count_weight: float = Field(
            2.0, ge=0.0, description="lambda: score lost per earlier round at a step (authors' sample_weight)"
        )
        skip: float = Field(
            0.3, ge=0.0, lt=1.0, description="fraction of the noisiest steps never chosen (authors: 30 of 100)"
        )
        groups: int = Field(8, ge=1, description="grids per layer in the selection's search (authors: 8)")
        entropy_weight: float = Field(
            1.0, ge=0.0, description="entropy weight in the search loss (authors' diff_loss_weight)"
        )
        lr: float = Field(0.05, gt=0.0, description="AdamW learning rate of the importance logits (authors)")
        weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay (authors)")

    def select(self, ctx: QuantContext) -> CalibrationSet:
        cfg = self.config
        traj = ctx.trajectory
        if cfg.batch_size > traj.num_samples:
            raise ValueError(
                f"apq_dm_srm takes batch_size={cfg.batch_size} pool trajectories per round but the "
                f"calibration pool has {traj.num_samples}: raise calibration_pool.samples or lower batch_size"
            )
        k = traj.num_steps
        rule = SRMSelection(k, int(cfg.skip * k), cfg.count_weight)
        quantizers = static_act_quantizers(ctx)
        modules = {n: ctx.fp_denoiser.model.get_submodule(n) for n in quantizers}
        rounds = -(-cfg.n_samples // cfg.batch_size)
        batches = [
            (torch.arange(cfg.batch_size) + r * cfg.batch_size)[: cfg.n_samples - r * cfg.batch_size]
            % traj.num_samples
            for r in range(rounds)
        ]
        lo, hi = step_ranges(ctx.fp_denoiser, modules, traj, batches[0]) if modules else ({}, {})
        kept = {n: q for n, q in quantizers.items() if torch.isfinite(lo[n]).all()}  # called at every step
        modules = {n: modules[n] for n in kept}
        search = ImportanceSearch(
            k, kept, lo, hi, min(cfg.groups, k), cfg.entropy_weight, cfg.lr, cfg.weight_decay
        )
        chosen: list[int] = []
        for r, samples in enumerate(batches):
            chosen.append(rule.pick(search.uncertainty()))
            if modules and r + 1 < rounds:
                visit_inputs(ctx.fp_denoiser, modules, traj, range(rule.first, k), samples, search.accumulate)
                search.step()
        ctx.state[self.name] = {"counts": rule.counts.clone(), "order": chosen}
        steps = torch.cat([torch.full((len(s),), c) for c, s in zip(chosen, batches)])
        return CalibrationSet.from_trajectory(traj, steps, torch.cat(batches))
