"""Shared helpers of the export tests: quantize a tiny model once, compare outputs bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qsearch.engine import Session
from qsearch.models import Denoiser
from qsearch.recipe import parse_recipe
from qsearch.stages import QuantContext

SAMPLES = 2
_SESSIONS: dict[str, Session] = {}


def recipe(model_dir: Path, quant: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A fast recipe for a tiny model (tests/conftest.py's ``tiny_recipe``, with ``quant``)."""
    data = {
        "model": str(model_dir),
        "sampler": {"scheduler": "ddim", "steps": 4},
        "quant": quant,
        "calibration_pool": {"samples": 4},
        "stages": [{"method": "uniform", "n_samples": 8}, {"method": "rtn"}],
        "eval": {"n_samples": SAMPLES, "batch_size": SAMPLES, "fid": False, "fidelity_samples": 0,
                 "device": "cpu"},
    }
    data.update(extra)
    return data


def quantize(data: dict[str, Any]) -> tuple[Session, QuantContext]:
    """The finished context of a recipe; one FP session per model, shared by every test."""
    parsed = parse_recipe(data)
    key = f"{parsed.model} {parsed.sampler.model_dump_json()}"
    if key not in _SESSIONS:
        _SESSIONS[key] = Session(parsed)
    session = _SESSIONS[key]
    return session, session.quantize(parsed)


def probe_inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Fixed denoiser inputs (noisy images at four timesteps; class labels for a DiT, a caption for PixArt)."""
    g = torch.Generator().manual_seed(0)
    size = model.config.sample_size
    x = torch.randn(4, model.config.in_channels, size, size, generator=g)
    t = torch.tensor([999, 600, 250, 10])
    cond = {"class_labels": torch.tensor([0, 3, 5, 9])} if "DiT" in type(model).__name__ else {}
    if "PixArt" in type(model).__name__:  # a caption embedding of 5 tokens
        cond = {"encoder_hidden_states": torch.randn(4, 5, model.config.caption_channels, generator=g)}
    return x, t, cond


@torch.no_grad()
def eps(model: torch.nn.Module) -> torch.Tensor:
    """The denoiser's noise prediction on the probe inputs (unclamped, unlike samples)."""
    return Denoiser(model)(*probe_inputs(model))
