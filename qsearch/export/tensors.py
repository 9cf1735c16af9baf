"""Lossless compact storage of the tensors that are not packed codes.

Scales, zero points, biases, norms, smoothing vectors, low-rank branches: each is stored in the
smallest of a few encodings that gives back *the same bits* (so the loaded model computes exactly
what the quantized model computed):

* ``fill``: a tensor whose elements are all equal (the zero points of a symmetric grid) is one value;
* ``uint8``: integer values in ``[0, 255]`` (the zero points of an asymmetric grid). The sign of a
  zero is not kept here: ``round(-lo / scale)`` makes ``-0.0`` zero points, and no grid computation
  depends on it (``q - zero_point`` is ``+0.0`` either way); every other encoding keeps the bits;
* ``float16``: float values that fp16 represents exactly (qsearch rounds every scale to fp16, and a
  model loaded from an fp16 variant holds fp16 values in fp32 tensors);
* ``raw``: anything else, as it is.

``lossy_fp16=True`` stores the float tensors of full-precision parts in fp16 even where that rounds
them (halving their bytes; the loaded model then differs slightly from the quantized one). It is
never applied to quantizer state.

The memory layout is part of "the same model": a transposed low-rank factor takes another BLAS path
than its contiguous copy and rounds differently, so a non-contiguous tensor's strides are recorded
and restored.
"""

from __future__ import annotations

from typing import Any

import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (``-0.0 != 0.0``, and a NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool or not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    view = _INT_VIEW[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def encode(t: torch.Tensor, *, lossy_fp16: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(stored, meta)``: the tensor to write and what ``decode`` needs to give ``t`` back."""
    meta: dict[str, Any] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape)}
    if not t.is_contiguous():
        meta["stride"] = list(t.stride())
    t = t.detach().cpu().contiguous()
    if not t.is_floating_point():
        return t, {**meta, "as": "raw"}
    flat = t.reshape(-1)
    if flat.numel() > 1 and bitwise_equal(flat, flat[:1].expand_as(flat)):
        return flat[:1].clone(), {**meta, "as": "fill"}
    if bool(((flat >= 0) & (flat <= 255) & (flat == flat.round())).all()):
        return t.to(torch.uint8), {**meta, "as": "uint8"}
    if t.dtype != torch.float16 and bitwise_equal(t.to(torch.float16).to(t.dtype), t):
        return t.to(torch.float16), {**meta, "as": "float16"}
    if lossy_fp16 and t.dtype != torch.float16:
        return t.to(torch.float16), {**meta, "as": "float16", "lossy": True}
    return t, {**meta, "as": "raw"}


def decode(stored: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """The tensor that ``encode`` stored, in its original memory layout."""
    values = _decode_values(stored, meta)
    if "stride" not in meta:
        return values
    out = torch.empty_strided(values.shape, meta["stride"], dtype=values.dtype)
    return out.copy_(values)


def _decode_values(stored: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    dtype = dtype_from_name(meta["dtype"])
    shape = torch.Size(meta["shape"])
    kind = meta["as"]
    if kind == "fill":
        return stored.reshape(1).to(dtype).expand(shape.numel()).reshape(shape).clone()
    if kind in ("raw", "uint8", "float16"):
        if stored.shape != shape:
            raise ValueError(f"stored shape {tuple(stored.shape)} differs from {tuple(shape)}")
        return stored.to(dtype)
    raise ValueError(f"unknown tensor encoding {kind!r}")
