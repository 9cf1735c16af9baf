"""Quantization grids: the arithmetic that maps real values to codes and back.

Every quantizer in qsearch stores *unsigned codes* ``q`` in ``[0, 2**bits - 1]`` and dequantizes
them with one formula, so that the exported, bit-packed model computes exactly what the fake-quantized
model computed during the search:

* integer grid: ``x_hat = (q - zero_point) * scale`` with ``q = clamp(round(x / scale) + zero_point)``;
  a symmetric grid is the special case ``zero_point = 2**(bits-1)``; 1-bit is sign binarization
  (``q = x >= 0``, ``zero_point = 0.5``, so ``x_hat = +-scale/2``);
* minifloat grid (FP8/FP6/FP4): ``x_hat = table[q] * scale`` where ``table`` lists the format's
  representable values in increasing order, so a code is an index into it.

Scales are rounded to fp16 when they are set, because the exported model stores them in fp16.
"""

from __future__ import annotations

import functools
import math

import torch

# Largest finite value of the formats whose top codes are reserved (OCP FP8: E4M3 keeps one NaN
# code, E5M2 keeps inf/NaN exponents); every other width uses all codes for finite values.
_RESERVED_MAX = {(4, 3): 448.0, (5, 2): 57344.0}


def code_max(bits: int) -> int:
    """Largest unsigned code of a ``bits``-wide grid."""
    return (1 << bits) - 1


def to_fp16_grid(scale: torch.Tensor) -> torch.Tensor:
    """Round scales *up* to fp16 (what export stores), so the rounded grid still covers the range.

    Clamped away from zero and from fp16 overflow.
    """
    scale = scale.clamp(min=2.0**-14, max=65504.0)
    half = scale.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.to(scale.dtype) < scale, up, half).to(scale.dtype)


def int_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that cover ``[lo, hi]`` with ``bits``-bit unsigned codes."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if bits == 1:
        scale = 2.0 * torch.maximum(hi, -lo)
        return to_fp16_grid(scale), torch.full_like(scale, 0.5)
    if symmetric:
        absmax = torch.maximum(hi, -lo)
        scale = to_fp16_grid(absmax / ((1 << (bits - 1)) - 1))
        return scale, torch.full_like(scale, float(1 << (bits - 1)))
    scale = to_fp16_grid((hi - lo) / code_max(bits))
    zero_point = torch.round(-lo / scale).clamp(0, code_max(bits))
    return scale, zero_point


def int_encode(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes of ``x`` on the integer grid (float tensor holding integers)."""
    if bits == 1:
        return (x >= 0).to(x.dtype)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, code_max(bits))


def int_decode(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Real values of integer-grid codes."""
    return (q - zero_point) * scale


@functools.lru_cache(maxsize=None)
def fp_table(bits: int, exponent_bits: int) -> tuple[float, ...]:
    """All values of a sign/exponent/mantissa minifloat, sorted, one per code (2**bits of them).

    Subnormals are included; formats with reserved top codes (E4M3, E5M2) repeat their largest
    finite value so that the table keeps exactly one entry per code.
    """
    m = bits - 1 - exponent_bits
    if m < 0:
        raise ValueError(f"{bits}-bit float cannot have {exponent_bits} exponent bits")
    bias = (1 << (exponent_bits - 1)) - 1
    magnitudes = []
    for e in range(1 << exponent_bits):
        for f in range(1 << m):
            if e == 0:
                magnitudes.append(f / (1 << m) * 2.0 ** (1 - bias))
            else:
                magnitudes.append((1 + f / (1 << m)) * 2.0 ** (e - bias))
    cap = _RESERVED_MAX.get((exponent_bits, m))
    if cap is not None:
        magnitudes = [min(v, cap) for v in magnitudes]
    values = sorted([-v for v in magnitudes] + magnitudes)
    return tuple(values)


def fp_max(bits: int, exponent_bits: int) -> float:
    """Largest finite value of the format."""
    return fp_table(bits, exponent_bits)[-1]


def fp_encode(x: torch.Tensor, scale: torch.Tensor, bits: int, exponent_bits: int) -> torch.Tensor:
    """Codes (indices into ``fp_table``) of ``x / scale`` rounded to the nearest representable value."""
    table = torch.tensor(fp_table(bits, exponent_bits), dtype=torch.float32, device=x.device)
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize((x / scale).float(), midpoints).to(x.dtype)


def fp_decode(q: torch.Tensor, scale: torch.Tensor, bits: int, exponent_bits: int) -> torch.Tensor:
    """Real values of minifloat codes."""
    table = torch.tensor(fp_table(bits, exponent_bits), dtype=scale.dtype, device=q.device)
    return table[q.long()] * scale


def fp_scale(absmax: torch.Tensor, bits: int, exponent_bits: int) -> torch.Tensor:
    """Scale that maps ``absmax`` to the format's largest value."""
    return to_fp16_grid(absmax / fp_max(bits, exponent_bits))


def group_view(w: torch.Tensor, granularity: str, group_size: int | None) -> tuple[torch.Tensor, int]:
    """``w`` as ``(rows, groups, group_size)`` so that one scale covers the last axis.

    Rows are output channels (or one row for per-tensor). A ragged last group is padded by
    repeating edge values, which never widens the group's range; the pad length is returned so
    ``ungroup`` can drop it.
    """
    flat = w.reshape(w.shape[0], -1)
    if granularity == "tensor":
        return flat.reshape(1, 1, -1), 0
    if granularity == "channel":
        return flat.unsqueeze(1), 0
    if group_size is None:
        raise ValueError("grouped quantization needs a group size")
    cols = flat.shape[1]
    groups = math.ceil(cols / group_size)
    pad = groups * group_size - cols
    if pad:
        flat = torch.nn.functional.pad(flat.unsqueeze(1), (0, pad), mode="replicate").squeeze(1)
    return flat.reshape(flat.shape[0], groups, group_size), pad


def ungroup(g: torch.Tensor, pad: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``group_view``."""
    flat = g.reshape(shape[0], -1)
    if pad:
        flat = flat[:, :-pad]
    return flat.reshape(shape)
