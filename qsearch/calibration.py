"""Calibration data: which denoiser inputs to calibrate on, and what the layers see on them.

A calibration sampler (PTQ4DM, Q-Diffusion, EDA-DM, ...) turns the FP model's sampling
``Trajectory`` into a ``CalibrationSet``: a list of ``(x_t, t, cond)`` denoiser inputs. Quantize
and reparameterize stages then run the model on it with forward hooks to see each layer's inputs,
bounded in memory: either reduced on the fly to statistics (``LayerStats``) or subsampled to at most
``max_rows`` rows per layer (``capture_inputs``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from qsearch.models import Denoiser
from qsearch.sampling import Trajectory


@dataclass
class CalibrationSet:
    """Denoiser inputs to calibrate on: ``x[i]`` at timestep ``t[i]`` with ``cond[k][i]``."""

    x: torch.Tensor
    t: torch.Tensor
    cond: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.x.shape[0]

    @classmethod
    def from_trajectory(cls, traj: Trajectory, steps: torch.Tensor, samples: torch.Tensor) -> "CalibrationSet":
        """Pick ``traj.xs[steps[i], samples[i]]`` for each i (both 1-D index tensors)."""
        steps, samples = steps.long(), samples.long()
        return cls(
            x=traj.xs[steps, samples],
            t=traj.timesteps[steps],
            cond={k: v[samples] for k, v in traj.cond.items()},
        )

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterator[
        tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
    ]:
        """``(x, t, cond)`` batches on ``device``, in order."""
        for s in range(0, len(self), batch_size):
            e = s + batch_size
            yield (
                self.x[s:e].to(device),
                self.t[s:e].to(device),
                {k: v[s:e].to(device) for k, v in self.cond.items()},
            )

    def subset(self, index: torch.Tensor) -> "CalibrationSet":
        """The entries at ``index``."""
        return CalibrationSet(self.x[index], self.t[index], {k: v[index] for k, v in self.cond.items()})


@contextmanager
def input_hooks(layers: Mapping[str, nn.Module], fn) -> Iterator[None]:
    """Call ``fn(name, input_tensor)`` on the first positional input of each layer's forward."""
    handles = [
        m.register_forward_pre_hook(lambda mod, args, _n=name: fn(_n, args[0]))
        for name, m in layers.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_calibration(denoiser: Denoiser, calib: CalibrationSet, batch_size: int = 64) -> None:
    """Run the denoiser over the calibration set (hooks collect what they need)."""
    for x, t, cond in calib.batches(batch_size, denoiser.device):
        denoiser.forward(x, t, cond)


class LayerStats:
    """Running per-layer input statistics: global min/max and per-channel absolute max."""

    def __init__(self) -> None:
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.channel_absmax: dict[str, torch.Tensor] = {}

    def update(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.amin(), x.amax()
        ch = channel_absmax(x)
        if name in self.lo:
            lo, hi = torch.minimum(lo, self.lo[name]), torch.maximum(hi, self.hi[name])
            ch = torch.maximum(ch, self.channel_absmax[name])
        self.lo[name], self.hi[name], self.channel_absmax[name] = lo, hi, ch


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Absolute max per input channel (dim 1 of conv inputs, last dim of linear inputs)."""
    dims = [d for d in range(x.dim()) if d != (1 if x.dim() == 4 else x.dim() - 1)]
    return x.abs().amax(dim=dims)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """Layer input as (rows, channels): pixels of a conv input, tokens of a linear input."""
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_stats(
    denoiser: Denoiser, layers: Mapping[str, nn.Module], calib: CalibrationSet, batch_size: int = 64
) -> LayerStats:
    """Input statistics of ``layers`` over the calibration set (memory: a few vectors per layer)."""
    stats = LayerStats()
    with input_hooks(layers, stats.update):
        run_calibration(denoiser, calib, batch_size)
    return stats


@torch.no_grad()
def capture_inputs(
    denoiser: Denoiser,
    layers: Mapping[str, nn.Module],
    calib: CalibrationSet,
    *,
    max_rows: int = 4096,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Up to ``max_rows`` input rows (pixels/tokens) per layer, sampled uniformly from each batch.

    Each batch contributes an equal share, so every timestep of the calibration set is represented
    and memory stays at ``max_rows x channels`` per layer whatever the set's size.
    """
    n_batches = -(-len(calib) // batch_size)
    per_batch = max(1, max_rows // n_batches)
    g = torch.Generator().manual_seed(seed)
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def keep(name: str, x: torch.Tensor) -> None:
        rows = as_rows(x.detach().float())
        pick = torch.randperm(rows.shape[0], generator=g)[:per_batch].to(rows.device)
        store[name].append(rows[pick].cpu())

    with input_hooks(layers, keep):
        run_calibration(denoiser, calib, batch_size)
    return {n: torch.cat(v)[:max_rows] for n, v in store.items() if v}
