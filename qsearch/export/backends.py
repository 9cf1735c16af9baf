"""Which kernel computes each loaded layer, and the fallbacks when none applies.

Backends (``qsearch.load(DIR, backend=...)``):

* ``fake``: the quantized layers as they were searched (decoded weights, fake-quantized
  activations): bit-exact with the trial on the same device, and the only backend on CPU for ``auto``.
* ``int_mm``: W8A8 integer ``Linear`` layers on ``torch._int_mm``.
* ``scaled_mm``: FP8 E4M3 weight-and-activation ``Linear`` layers on ``torch._scaled_mm`` (CUDA
  compute capability 8.9+, or the CPU reference implementation).
* ``torchao``: W8A8 with static activation grids, and W8 weight-only, ``Linear`` layers through
  torchao's ``Int8Tensor`` (torchao installed).
* ``auto``: on CUDA, ``scaled_mm`` for FP8 layers and ``int_mm`` for W8A8 integer layers; on CPU,
  ``fake``.

A layer that the requested kernel cannot compute exactly as it was searched (a convolution, a
quantizer subclass with timestep-dependent scales, a 4-bit or grouped grid, a dynamic range torchao
would compute differently...) falls back to the dequantizing path, and the fallback is reported: one
``BackendFallbackWarning`` per load listing the reasons, and ``model.qsearch_backends`` (layer ->
what computes it) on the loaded model.

There is no low-bit (< 8) integer kernel in the installed stack that reproduces qsearch's grids
exactly (torchao's int4 kernels keep bf16 scales and a float zero point), so W4/W3 layers are
dequantized, at load or on the fly.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import Counter
from typing import Literal, get_args

import torch
from torch import nn

from qsearch.export.layers import (
    Fp8MMLinear,
    Int8MMLinear,
    PackedQuantConv2d,
    PackedQuantLinear,
    TorchaoInt8Linear,
)
from qsearch.quant.modules import QuantConv2d, QuantLinear, QuantMixin, quant_layers
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer

Backend = Literal["auto", "fake", "int_mm", "scaled_mm", "torchao"]
Dequantize = Literal["load", "on_the_fly"]
PACKED = {QuantLinear: PackedQuantLinear, QuantConv2d: PackedQuantConv2d}
BACKENDS: tuple[str, ...] = get_args(Backend)
KERNELS = ("int_mm", "scaled_mm", "torchao")


class BackendFallbackWarning(UserWarning):
    """Some layers are not computed by the requested kernel."""


def _plain_weight(layer: QuantMixin, fmt: str, exponent_bits: int | None = None) -> str | None:
    """Why the layer's weight grid is not an 8-bit per-channel/tensor grid of ``fmt`` (None: it is)."""
    wq = layer.weight_quantizer
    if type(layer) is not QuantLinear:
        return "not a Linear layer" if not isinstance(layer, QuantLinear) else f"layer class {type(layer).__name__}"
    if not layer.quant_enabled or wq is None:
        return "full-precision weight"
    if type(wq) is not WeightQuantizer:
        return f"weight quantizer {type(wq).__name__} is not the plain grid"
    if wq.format != fmt or wq.bits != 8 or (exponent_bits is not None and wq.exponent_bits != exponent_bits):
        return f"weight grid {wq.format}{wq.bits} is not {fmt}8"
    if wq.granularity not in ("tensor", "channel"):
        return f"{wq.granularity}-wise weight scales"
    if fmt == "int" and not bool((wq.zero_point == 128).all()):
        return "asymmetric weight grid"
    return None


def _plain_act(layer: QuantMixin, fmt: str, *, static_only: bool = False) -> str | None:
    """Why the layer's input grid is not an 8-bit grid of ``fmt`` (None: it is)."""
    aq = layer.act_quantizer
    if aq is None:
        return "full-precision activations"
    if type(aq) is not ActQuantizer:
        return f"activation quantizer {type(aq).__name__} is not the plain grid"
    if aq.format != fmt or aq.bits != 8:
        return f"activation grid {aq.format}{aq.bits} is not {fmt}8"
    if fmt == "fp" and aq.exponent_bits != 4:
        return "activation grid is not E4M3"
    if not aq.dynamic and not aq.calibrated:
        return "uncalibrated activation quantizer"
    if static_only and aq.dynamic:
        return "dynamic activation ranges (torchao would compute them differently)"
    return None


def _aligned(layer: QuantMixin, multiple: int) -> str | None:
    n, k = layer.weight.shape
    return None if n % multiple == 0 and k % multiple == 0 else f"shape {n}x{k} not a multiple of {multiple}"


def kernel_for(layer: QuantMixin, kernel: str) -> str | None:
    """``None`` if ``kernel`` computes this layer as searched, else the reason it cannot."""
    if kernel == "int_mm":
        return _plain_weight(layer, "int") or _plain_act(layer, "int") or _aligned(layer, 8)
    if kernel == "scaled_mm":
        return _plain_weight(layer, "fp", 4) or _plain_act(layer, "fp") or _aligned(layer, 16)
    if kernel == "torchao":
        reason = _plain_weight(layer, "int")
        if reason is None and layer.act_quantizer is not None:
            # torchao's int8 x int8 GEMM is torch._int_mm only for aligned shapes; for others it
            # copies both operands to the CPU and multiplies there (exact, but a sync per call)
            reason = _plain_act(layer, "int", static_only=True) or _aligned(layer, 8)
        return reason
    raise ValueError(f"unknown kernel {kernel!r}")


def kernel_unavailable(kernel: str, device: torch.device) -> str | None:
    """Why ``kernel`` cannot run on ``device`` in this installation (None: it can)."""
    if kernel == "torchao" and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    if kernel == "scaled_mm" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 tensor cores need compute capability 8.9+"
    if kernel in ("int_mm", "scaled_mm") and not hasattr(torch, f"_{kernel}"):
        return f"torch.{'_' + kernel} is not in this PyTorch"
    return None


def candidate_kernels(backend: str, device: torch.device) -> list[str]:
    """Kernels to try for each layer, in order."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "fake":
        return []
    if backend == "auto":
        return ["scaled_mm", "int_mm"] if device.type == "cuda" else []
    return [backend]


def convert(
    model: nn.Module,
    codes: dict[str, tuple[torch.Tensor, torch.Tensor, int]],
    *,
    backend: Backend,
    device: torch.device,
    dtype: torch.dtype,
    dequantize: Dequantize,
    fp8_fast_accum: bool = False,
) -> dict[str, str]:
    """Swap each quantized layer for its kernel layer (or its dequantizing fallback), in place.

    ``codes`` maps a layer name to ``(codes, packed codes, bits)`` of its weight. Must run before
    the model is cast to ``dtype``: kernel layers capture the quantization grids in fp32. Returns
    ``{layer: what computes it}`` (a kernel, ``dequant_on_the_fly`` or ``fake``). ``fp8_fast_accum``
    is handed to the ``scaled_mm`` layers (``Fp8MMLinear``).
    """
    kernels = candidate_kernels(backend, device)
    unavailable = {k: r for k in kernels if (r := kernel_unavailable(k, device)) is not None}
    used: dict[str, str] = {}
    fallbacks: Counter[str] = Counter()
    for name, layer in quant_layers(model).items():
        reasons = []
        for kernel in kernels:
            reason = unavailable.get(kernel) or kernel_for(layer, kernel)
            if reason is None:
                new = _kernel_layer(kernel, layer, codes[name][0], dtype, device, fp8_fast_accum)
                model.set_submodule(name, new)
                used[name] = kernel
                break
            reasons.append(f"{kernel}: {reason}")
        else:
            fallbacks.update(reasons)
            used[name] = "fake"
            if dequantize == "on_the_fly" and name in codes and type(layer) in PACKED:
                model.set_submodule(name, PACKED[type(layer)].from_quant(layer, codes[name][1], codes[name][2]))
                used[name] = "dequant_on_the_fly"
    if fallbacks:
        n = sum(1 for how in used.values() if how not in KERNELS)
        detail = "; ".join(f"{r} ({c} layers)" for r, c in fallbacks.most_common())
        warnings.warn(
            f"backend {backend!r}: {n} of {len(used)} quantized layers are dequantized instead of "
            f"computed by a low-bit kernel: {detail}",
            BackendFallbackWarning,
            stacklevel=3,
        )
    return used


def _kernel_layer(kernel: str, layer: QuantMixin, codes: torch.Tensor, dtype: torch.dtype,
                  device: torch.device, fp8_fast_accum: bool) -> nn.Module:
    if kernel == "int_mm":
        return Int8MMLinear.from_quant(layer, codes)
    if kernel == "scaled_mm":
        return Fp8MMLinear.from_quant(layer, codes, fast_accum=fp8_fast_accum)
    return TorchaoInt8Linear.from_quant(layer, codes, dtype, device)

