"""Fidelity of a quantized model to its FP original: MSE and PSNR of samples from the same seeds.

Why: FID measures the distribution and needs thousands of samples; samples drawn from the same
initial noise by the FP and the quantized model should be near-identical images, so their pixel
distance shows quantization damage with a few dozen samples and without any feature network.

Images are in [-1, 1] (the models' output range) and are clamped to it first, as they are when
written as images; PSNR uses the data range 2: ``PSNR = 10 log10(2**2 / MSE)``, inf for equal sets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

DATA_RANGE = 2.0


@dataclass(frozen=True)
class Fidelity:
    """``mse``: mean over all pixels; ``psnr``: from that MSE (dB); ``psnr_mean``: mean of per-image PSNRs."""

    mse: float
    psnr: float
    psnr_mean: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _prepare(samples: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if samples.shape != reference.shape:
        raise ValueError(f"shape mismatch: samples {tuple(samples.shape)} vs reference {tuple(reference.shape)}")
    if samples.numel() == 0:
        raise ValueError("no images")
    # float64: PSNRs of near-identical images would otherwise lose digits to float32 rounding.
    a = samples.detach().to(torch.float64).clamp(-1, 1)
    b = reference.detach().to(device=a.device, dtype=torch.float64).clamp(-1, 1)
    return a, b


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(DATA_RANGE**2 / mse)


def mse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error over all images and pixels (after clamping to [-1, 1])."""
    a, b = _prepare(samples, reference)
    return float((a - b).square().mean())


def psnr(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of the whole set, data range 2 (inf when identical)."""
    return _psnr(mse(samples, reference))


def compare(samples: torch.Tensor, reference: torch.Tensor) -> Fidelity:
    """MSE, set PSNR and mean per-image PSNR of ``samples`` (N, ...) against ``reference``."""
    a, b = _prepare(samples, reference)
    err = (a - b).square()
    per_image = err.reshape(err.shape[0], -1).mean(dim=1) if err.dim() > 1 else err
    return Fidelity(
        mse=float(err.mean()),
        psnr=_psnr(float(err.mean())),
        psnr_mean=float(sum(_psnr(float(m)) for m in per_image) / per_image.numel()),
    )


def fidelity(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """``compare`` as a dict (``mse``, ``psnr``, ``psnr_mean``), to merge into a metrics dict."""
    return compare(samples, reference).as_dict()
