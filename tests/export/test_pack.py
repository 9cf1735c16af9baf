"""Bit packing: exact round trip at every width, the documented layout, and minifloat codes."""

from __future__ import annotations

import pytest
import torch

from qsearch.export.pack import minifloat_values, pack, packed_nbytes, unpack
from qsearch.quant import grid


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_round_trip_every_width(bits: int, count: int) -> None:
    codes = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack(packed, bits, count).long(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_is_a_little_endian_bit_stream(bits: int) -> None:
    """Code i occupies stream bits [i*bits, (i+1)*bits), least significant first."""
    codes = torch.randint(0, 2**bits, (13,), generator=torch.Generator().manual_seed(bits))
    stream = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes)
    stream += "0" * (-len(stream) % 8)
    expected = [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    assert pack(codes, bits).tolist() == expected


def test_four_bit_nibble_order() -> None:
    assert pack(torch.tensor([1, 2, 3]), 4).tolist() == [1 | 2 << 4, 3]


@pytest.mark.parametrize("bad", [torch.tensor([4]), torch.tensor([-1]), torch.tensor([1.5])])
def test_codes_outside_the_grid_are_rejected(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        pack(bad, 2)


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize(("bits", "e"), [(4, 2), (6, 3), (8, 4)])
def test_minifloat_codes_pack_like_integers(bits: int, e: int) -> None:
    codes = torch.arange(2**bits)
    assert torch.equal(unpack(pack(codes, bits), bits, codes.numel()).long(), codes)
    assert minifloat_values(codes, bits, e).tolist() == list(grid.fp_table(bits, e))


def test_e4m3_table_is_exact_in_float8() -> None:
    """FP8 E4M3 codes map to float8_e4m3fn values without rounding (what _scaled_mm consumes)."""
    values = minifloat_values(torch.arange(256), 8, 4)
    assert torch.equal(values.to(torch.float8_e4m3fn).float(), values)
