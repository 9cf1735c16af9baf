"""Compact tensor storage: the smallest encoding that gives back the same bits."""

from __future__ import annotations

import pytest
import torch

from qsearch.export.tensors import bitwise_equal, decode, encode


@pytest.mark.parametrize(
    ("tensor", "kind"),
    [
        (torch.full((4, 3, 1), 128.0), "fill"),
        (torch.tensor([0.0, 3.0, 255.0]), "uint8"),
        (torch.tensor([0.5, 1e-3, -2.0]).half().float(), "float16"),
        (torch.tensor([0.1, -0.2]), "raw"),
        (torch.tensor([0.5, -0.0]), "float16"),
        (torch.tensor([1, 2], dtype=torch.int64), "raw"),
    ],
)
def test_encoding_is_lossless_and_smallest(tensor: torch.Tensor, kind: str) -> None:
    stored, meta = encode(tensor)
    assert meta["as"] == kind
    assert bitwise_equal(decode(stored, meta), tensor)


def test_lossy_fp16_is_opt_in_and_recorded() -> None:
    t = torch.tensor([0.1, -0.2])
    stored, meta = encode(t, lossy_fp16=True)
    assert stored.dtype == torch.float16 and meta["lossy"]
    assert not bitwise_equal(decode(stored, meta), t)


def test_signed_zero_is_kept_outside_integer_tensors() -> None:
    stored, meta = encode(torch.tensor([-0.0, 0.25]))
    assert torch.signbit(decode(stored, meta))[0]


def test_integer_zero_points_are_one_byte() -> None:
    zero_point = torch.round(-torch.tensor([0.0, -3.2, -1.0]) / 0.5).clamp(0, 7)  # holds a -0.0
    stored, meta = encode(zero_point)
    assert meta["as"] == "uint8" and torch.equal(decode(stored, meta), zero_point)


def test_memory_layout_is_restored() -> None:
    """A transposed factor must come back transposed: BLAS rounds the two layouts differently."""
    t = torch.randn(3, 5).t()
    back = decode(*encode(t))
    assert back.stride() == t.stride() and bitwise_equal(back, t)
