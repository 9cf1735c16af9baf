"""Hadamard rotations: orthogonal, exact inverses, and never stored with the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.hq_dit import rotate_layer
from methods.vidit_q import balance_layer
from qsearch.quant import QuantLinear, QuantSpec
from qsearch.quant.bits import bits_report
from qsearch.quant.modules import full_precision
from qsearch.quant.hadamard import hadamard, rotate_channels, rotation_block


def test_hadamard_is_symmetric_and_orthogonal() -> None:
    for n in (1, 2, 8, 64):
        h = hadamard(n)
        assert torch.allclose(h, h.T)
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    with pytest.raises(ValueError, match="powers of two"):
        hadamard(12)


def test_block_rotation_is_its_own_inverse_on_any_axis() -> None:
    x = torch.randn(5, 96, 3)  # 96 = 3 blocks of 32 on axis 1
    assert rotation_block(96) == 32
    once = rotate_channels(x, 32, channel_dim=1)
    assert torch.allclose(once.norm(dim=1), x.norm(dim=1), atol=1e-5)
    assert torch.allclose(rotate_channels(once, 32, channel_dim=1), x, atol=1e-5)
    assert not torch.allclose(once, x)
    dense = torch.block_diag(*[hadamard(32, torch.float32)] * 3)
    assert torch.allclose(once, torch.einsum("bcn,cd->bdn", x, dense), atol=1e-5)


@pytest.mark.parametrize("rotate", ["hq_dit", "vidit_q"])
def test_a_rotated_layer_stores_no_rotation_matrix(rotate: str) -> None:
    """Only the signs and smoothing scales (ViDiT-Q) add bytes; a stored 256x256 matrix would add 128 KiB."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(256, 64), QuantSpec(w_bits=4, a_bits=8))
    before = bits_report(layer).model_bytes
    x = torch.randn(4, 256)
    with torch.no_grad(), full_precision({"layer": layer}):
        fp = layer(x)
        if rotate == "hq_dit":
            assert rotate_layer(layer)
        else:
            balance_layer(layer, x.abs().amax(0), 0.5, torch.Generator().manual_seed(0))
        assert torch.allclose(layer(x), fp, atol=1e-4)  # still exact in full precision
    added = bits_report(layer).model_bytes - before
    assert 0 <= added <= 2 * 2 * 256  # at most two fp16 vectors of the input width
    assert all(t.numel() < 256 * 256 for t in [*layer.buffers(), *layer.parameters()] if t is not layer.weight)
