"""Bit packing of quantization codes: ``n`` codes of ``bits`` bits in ``ceil(n * bits / 8)`` bytes.

Every quantizer stores unsigned codes in ``[0, 2**bits - 1]`` (integer grids and minifloat grids
alike: a minifloat code is an index into ``qsearch.quant.grid.fp_table``), so one packing serves
every format and width. The layout is a little-endian bit stream: code ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, least significant bit first, and byte ``k`` holds stream bits
``8k .. 8k + 7`` (bit 0 = least significant). For widths that divide 8 this is the usual nibble /
crumb order (a byte holds ``c0 | c1 << 4`` at 4 bits), which a GPU kernel can unpack with shifts.

Everything is vectorised torch (no Python loop over codes), so the same functions unpack on the GPU
at every forward pass of a weight that is dequantized on the fly.
"""

from __future__ import annotations

import math

import torch

from qsearch.quant import grid


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy."""
    return math.ceil(count * bits / 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be packed into bytes (1..8 supported)")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (any shape, any dtype holding integers) into a 1-D uint8 tensor.

    Raises ``ValueError`` for a code that is not an integer in ``[0, 2**bits - 1]``: packing must
    never silently wrap a value around.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.is_floating_point() and not torch.equal(flat, flat.round()):
        raise ValueError("codes must be integers")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > grid.code_max(bits)):
        raise ValueError(f"codes must lie in [0, {grid.code_max(bits)}] for {bits} bits")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        return _pack_aligned(flat, bits)
    return _pack_stream(flat, bits)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes of a packed tensor, as a 1-D uint8 tensor."""
    _check_bits(bits)
    need = packed_nbytes(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(
            f"{count} codes of {bits} bits need a 1-D uint8 tensor of {need} bytes, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        return _unpack_aligned(packed, bits, count)
    return _unpack_stream(packed, bits, count)


def _pack_aligned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Widths 1, 2, 4: ``8 // bits`` codes per byte, with uint8 shifts only."""
    per_byte = 8 // bits
    pad = (-codes.numel()) % per_byte
    groups = torch.nn.functional.pad(codes, (0, pad)).reshape(-1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (groups << shifts).sum(dim=1, dtype=torch.uint8)


def _unpack_aligned(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & grid.code_max(bits)
    return codes.reshape(-1)[:count]


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Any width: 8 codes make ``bits`` bytes (one 8*bits-bit word, at most 56 bits in an int64)."""
    n = codes.numel()
    pad = (-n) % 8
    groups = torch.nn.functional.pad(codes, (0, pad)).reshape(-1, 8).to(torch.int64)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=codes.device)
    words = (groups << code_shifts).sum(dim=1, keepdim=True)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=codes.device)
    out = ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)]


def _unpack_stream(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    pad = (-packed.numel()) % bits
    groups = torch.nn.functional.pad(packed, (0, pad)).reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)
    words = (groups << byte_shifts).sum(dim=1, keepdim=True)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    codes = (words >> code_shifts) & grid.code_max(bits)
    return codes.to(torch.uint8).reshape(-1)[:count]


def minifloat_values(codes: torch.Tensor, bits: int, exponent_bits: int) -> torch.Tensor:
    """The format values (``fp_table[code]``) of minifloat codes, as float32.

    For FP8 E4M3 every value is exactly representable in ``torch.float8_e4m3fn``, so
    ``minifloat_values(q, 8, 4).to(torch.float8_e4m3fn)`` is the weight that an FP8 tensor-core
    kernel (``torch._scaled_mm``) consumes, with the same per-channel scale.
    """
    table = torch.tensor(grid.fp_table(bits, exponent_bits), dtype=torch.float32, device=codes.device)
    return table[codes.long()]
