"""One call that seeds every random generator a calibration may draw from."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible calibration."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
