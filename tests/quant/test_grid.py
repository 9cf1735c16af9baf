"""Quantization grids: exact codes, round-trip error bounds, fp tables."""

from __future__ import annotations

import pytest
import torch

from qsearch.quant import grid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_round_trip_error_within_half_step(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    x = torch.randn(64, 32)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale, zp = grid.int_qparams(lo, hi, bits, symmetric)
    q = grid.int_encode(x, scale, zp, bits)
    assert q.min() >= 0 and q.max() <= grid.code_max(bits)
    assert torch.equal(q, q.round())
    err = (grid.int_decode(q, scale, zp) - x).abs()
    assert (err <= scale / 2 + 1e-6).all()


def test_decode_of_codes_is_exactly_on_the_grid() -> None:
    x = torch.randn(1000)
    scale, zp = grid.int_qparams(x.amin(), x.amax(), 4, False)
    xq = grid.int_decode(grid.int_encode(x, scale, zp, 4), scale, zp)
    codes = xq / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert len(torch.unique(xq)) <= 16


def test_scales_are_fp16_representable() -> None:
    scale, _ = grid.int_qparams(torch.tensor(-0.123456), torch.tensor(0.987654), 4, False)
    assert scale.to(torch.float16).to(torch.float32) == scale


def test_one_bit_is_sign_binarization() -> None:
    x = torch.tensor([-2.0, -0.1, 0.3, 1.5])
    scale, zp = grid.int_qparams(torch.tensor(-1.0), torch.tensor(1.0), 1, True)
    q = grid.int_encode(x, scale, zp, 1)
    assert q.tolist() == [0, 0, 1, 1]
    assert grid.int_decode(q, scale, zp).tolist() == [-1.0, -1.0, 1.0, 1.0]


def test_fp4_e2m1_table_is_the_ocp_grid() -> None:
    table = grid.fp_table(4, 2)
    assert sorted(set(abs(v) for v in table)) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert len(table) == 16


def test_fp8_e4m3_matches_torch_float8() -> None:
    assert grid.fp_max(8, 4) == torch.finfo(torch.float8_e4m3fn).max
    x = torch.randn(4096) * 50
    scale = torch.tensor(1.0)
    ours = grid.fp_decode(grid.fp_encode(x, scale, 8, 4).long(), scale, 8, 4)
    ref = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(ours, ref)


def test_group_view_pads_ragged_groups_without_widening_range() -> None:
    w = torch.randn(4, 10)
    g, pad = grid.group_view(w, "group", 4)
    assert g.shape == (4, 3, 4) and pad == 2
    assert torch.equal(g.amax(-1)[:, -1], w[:, 8:].amax(-1))
    assert torch.equal(grid.ungroup(g, pad, w.shape), w)
