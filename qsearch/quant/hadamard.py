"""Block-diagonal Hadamard rotations of a channel axis, shared by the rotation methods (ViDiT-Q, HQ-DiT).

A Sylvester-Hadamard matrix is fixed by its size, so a rotated layer keeps only its block size: the
matrix is rebuilt (and cached per device and dtype) when the layer runs, never stored. Stored, it would
count against the model's size and be written into every exported folder: a 1024-wide layer's matrix
alone is 2 MB in fp16, more than the 4-bit weight it rotates.
"""

from __future__ import annotations

import functools
import math

import torch


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalized ``n x n`` Sylvester-Hadamard matrix (``n`` a power of two): symmetric, orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester-Hadamard matrices exist for powers of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def rotation_block(channels: int) -> int:
    """Largest power of two dividing ``channels``: the block of the block-diagonal Hadamard."""
    return channels & -channels


@functools.lru_cache(maxsize=64)
def cached_hadamard(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``hadamard(n)`` on ``device`` in ``dtype``, built once per process (read-only: do not modify)."""
    return hadamard(n, dtype).to(device)


def rotate_channels(x: torch.Tensor, block: int, channel_dim: int = -1) -> torch.Tensor:
    """``x`` with its ``channel_dim`` axis multiplied by ``blockdiag(H, ..., H)``, ``H = hadamard(block)``.

    One batched GEMM over all blocks; ``H`` is symmetric and orthogonal, so rotating twice is the identity.
    """
    x = x.movedim(channel_dim, -1)
    h = cached_hadamard(block, x.device, x.dtype)
    rotated = (x.reshape(*x.shape[:-1], x.shape[-1] // block, block) @ h).reshape(x.shape)
    return rotated.movedim(-1, channel_dim)
