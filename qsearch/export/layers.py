"""The layers an exported model is loaded into, one per way of computing with packed weights.

All of them are subclasses of the quantized layers (``QuantLinear``/``QuantConv2d``), so that they
keep ``pre``, ``act_quantizer``, ``weight_quantizer`` and ``branch`` with the same composition
(``out = op(act_quant(pre(x)), W) + bias + branch(pre(x))``), stay ``nn.Linear``/``nn.Conv2d``
instances for diffusers, and are still counted by ``quant_layers``/``bits_report``. They differ in
where ``W`` lives and which kernel multiplies:

* ``PackedQuantLinear``/``PackedQuantConv2d``: only the packed codes are in memory; the weight is
  unpacked and decoded at every call (dequantization on the fly: the memory of a W4 model is the
  memory of its codes).
* ``Int8MMLinear``: W8A8 integer layers on ``torch._int_mm`` (int8 x int8 -> int32 tensor cores),
  with the asymmetric activation zero point folded into the epilogue.
* ``Fp8MMLinear``: FP8 (E4M3) weight and activation layers on ``torch._scaled_mm`` with row-wise
  scales (Hopper/Ada FP8 tensor cores).
* ``TorchaoInt8Linear``: the same W8A8 (static activation) or W8 weight-only layers through
  torchao's ``Int8Tensor``, when torchao is installed.

The kernel layers keep their quantization grids as raw fp32 bit patterns in integer buffers (and the
FP8 weight as uint8 bits), so that ``model.to(torch.bfloat16)`` casts the rest of the model but
cannot round a grid. Their results equal the fake-quantized layer's up to float summation order
(and, for FP8 activations, ties of the rounding: the cast rounds ties to even, the fake quantizer
to the lower value); only the fake path is bit-exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qsearch.export import pack
from qsearch.quant.modules import QuantConv2d, QuantLinear, QuantMixin

FP8_MAX = 448.0  # largest finite float8_e4m3fn value; the E4M3 grid of qsearch saturates there
_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows


def _int_mm_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zero rows appended up to the rows ``torch._int_mm`` needs (cut off again after)."""
    return F.pad(t, (0, 0, 0, _INT_MM_MIN_ROWS - t.shape[0])) if t.shape[0] < _INT_MM_MIN_ROWS else t


def share_state(cls: type, layer: nn.Module) -> nn.Module:
    """A ``cls`` instance with ``layer``'s attributes, parameters, buffers and submodules (shared
    tensors, own registries: replacing one of its tensors leaves ``layer`` as it was)."""
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        setattr(new, registry, dict(getattr(layer, registry)))
    return new


def _rebind(cls: type, layer: QuantMixin) -> nn.Module:
    """A ``cls`` instance sharing ``layer``'s state, its ``weight`` parameter dropped."""
    new = share_state(cls, layer)
    del new._parameters["weight"]
    new._cache_key = None
    new._cached_weight = None
    return new


def _float_bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 values as int32 bit patterns (a buffer that dtype casts leave alone)."""
    return t.detach().to(torch.float32).contiguous().view(torch.int32).clone()


def _float_dtype(module: nn.Module | None) -> torch.dtype:
    """The float dtype a module's state is in now (the model's dtype after a cast)."""
    if module is not None:
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                return t.dtype
    return torch.float32


class PackedWeightMixin:
    """Weight decoded from its bit-packed codes at every access (dequantization on the fly)."""

    weight_codes: torch.Tensor

    @classmethod
    def from_quant(cls, layer: QuantMixin, packed: torch.Tensor, bits: int) -> nn.Module:
        new = _rebind(cls, layer)
        new.packed_bits = bits
        new.packed_shape = torch.Size(layer.weight.shape)
        new.register_buffer("weight_codes", packed.clone())
        return new

    @property
    def weight(self) -> torch.Tensor:
        codes = pack.unpack(self.weight_codes, self.packed_bits, self.packed_shape.numel())
        wq = self.weight_quantizer
        return wq.decode(codes.view(self.packed_shape).to(_float_dtype(wq)))

    def quantized_weight(self) -> torch.Tensor:
        return self.weight


class PackedQuantLinear(PackedWeightMixin, QuantLinear):
    """``QuantLinear`` that holds only packed codes and decodes them at every call."""


class PackedQuantConv2d(PackedWeightMixin, QuantConv2d):
    """``QuantConv2d`` that holds only packed codes and decodes them at every call."""


class _KernelLinear(QuantLinear):
    """Shared parts of the kernel layers: static activation grid, rows, decoded ``weight``."""

    def _init_kernel(self, layer: QuantLinear) -> None:
        aq = layer.act_quantizer
        self.act_static = aq is not None and not aq.dynamic
        if self.act_static:
            self.register_buffer("act_scale_bits", _float_bits(aq.scale))
            self.register_buffer("act_zero_bits", _float_bits(aq.zero_point))

    def _act_qparams(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 scale and zero point of the input rows (``()`` static, ``(M, 1)`` per token)."""
        if self.act_static:
            return self.act_scale_bits.view(torch.float32), self.act_zero_bits.view(torch.float32)
        aq = self.act_quantizer
        scale, zero_point = aq.qparams(*aq.dynamic_range(x2))
        return scale.float(), zero_point.float()

    def _finish(self, y: torch.Tensor, x: torch.Tensor, lead: torch.Size, add_bias: bool = True) -> torch.Tensor:
        """Bias (unless the GEMM added it), original leading dimensions, and the low-rank branch."""
        y = y.to(x.dtype)
        if add_bias and self.bias is not None:
            y = y.add_(self.bias)
        y = y.reshape(*lead, y.shape[-1])
        if self.branch is not None:
            y = y + self.branch(x)
        return y

    def quantized_weight(self) -> torch.Tensor:
        return self.weight


class Int8MMLinear(_KernelLinear):
    """W8A8 integer ``Linear`` on ``torch._int_mm``.

    With activation codes ``qx`` (zero point ``zx``, scale ``sx``) and symmetric weight codes
    ``qw = wi + 128`` (scale ``sw``), ``y = sx * sw * sum_k (qx - zx) * wi``
    ``= sx * sw * (int_mm(qx - 128, wi) + (128 - zx) * colsum(wi))``: the int8 product is exact in
    int32 and the zero point costs one rank-1 correction.
    """

    @classmethod
    def from_quant(cls, layer: QuantLinear, codes: torch.Tensor) -> "Int8MMLinear":
        new = _rebind(cls, layer)
        new._init_kernel(layer)
        w_int = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        new.register_buffer("w_int8", w_int)
        new.register_buffer("w_colsum", w_int.to(torch.int32).sum(dim=1).to(torch.float32).view(torch.int32))
        new.register_buffer("w_scale_bits", _float_bits(layer.weight_quantizer.scale.reshape(-1)))
        return new

    @property
    def weight(self) -> torch.Tensor:
        scale = self.w_scale_bits.view(torch.float32).reshape(-1, 1)
        return (self.w_int8.to(torch.float32) * scale).to(_float_dtype(self.act_quantizer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # tensor-core GEMMs want row-major A
        scale, zero_point = self._act_qparams(x2)
        # qx - 128 = clamp(round(x / sx) + zx - 128, -128, 127); in the input's dtype, exact for
        # the integers involved (a static scale is a 0-dim fp32 tensor: x keeps its dtype)
        xi = torch.round(x2 / scale).add_(zero_point - 128).clamp_(-128, 127).to(torch.int8)
        rows = xi.shape[0]
        acc = torch._int_mm(_int_mm_rows(xi), self.w_int8.t())[:rows]
        correction = (128 - zero_point) * self.w_colsum.view(torch.float32)
        y = torch.add(acc, correction).mul_(scale * self.w_scale_bits.view(torch.float32))
        return self._finish(y, x, lead)


class Fp8MMLinear(_KernelLinear):
    """FP8 E4M3 weight-and-activation ``Linear`` on ``torch._scaled_mm`` (row-wise scales).

    The weight codes index the E4M3 table, whose values ``float8_e4m3fn`` holds exactly, so the
    tensor-core operand is the exported weight itself with its per-channel scale as ``scale_b``.
    The bias is added in the GEMM's epilogue when it is in the output's dtype (one pass over the
    output fewer). ``fast_accum`` lets Hopper's FP8 tensor cores accumulate without promoting the
    partial sums to fp32 at intervals: faster, but the sums carry fewer mantissa bits, so it is
    off unless asked for (``qsearch.load(..., fp8_fast_accum=True)``).

    The input is scaled by the reciprocal of its step size, stored with the grid, rather than
    divided by the step size: under ``torch.compile`` the quantization is fused into the kernel that
    produces the input (GELU, layer norm), and a correctly rounded fp32 division per element made
    those kernels up to 1.44x slower than their BF16 twins where the multiply costs up to 1.26x
    (``benchmarks/fusion_bench.py``, H200). The product differs from the quotient by at most one
    fp32 ulp, so an E4M3 code changes only for inputs within an ulp of a rounding boundary.
    """

    fast_accum: bool = False

    @classmethod
    def from_quant(cls, layer: QuantLinear, codes: torch.Tensor, fast_accum: bool = False) -> "Fp8MMLinear":
        new = _rebind(cls, layer)
        new._init_kernel(layer)
        new.fast_accum = fast_accum
        wq = layer.weight_quantizer
        values = pack.minifloat_values(codes, wq.bits, wq.exponent_bits).to(torch.float8_e4m3fn)
        new.register_buffer("w_fp8_bits", values.contiguous().view(torch.uint8))
        scale = wq.scale.reshape(-1).float().expand(codes.shape[0])
        new.register_buffer("w_scale_bits", _float_bits(scale))
        if new.act_static:
            new.register_buffer("act_inv_scale_bits", _float_bits(1 / new.act_scale_bits.view(torch.float32)))
        return new

    @staticmethod
    def _out_dtype(x: torch.Tensor) -> torch.dtype:
        """bf16, which row-wise scaled FP8 GEMMs on CUDA require; the CPU kernel also writes fp32."""
        return torch.bfloat16 if x.is_cuda or x.dtype == torch.bfloat16 else torch.float32

    @property
    def weight(self) -> torch.Tensor:
        values = self.w_fp8_bits.view(torch.float8_e4m3fn).to(torch.float32)
        scale = self.w_scale_bits.view(torch.float32).reshape(-1, 1)
        return (values * scale).to(_float_dtype(self.act_quantizer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # tensor-core GEMMs want row-major A
        scale, _ = self._act_qparams(x2)
        inv_scale = self.act_inv_scale_bits.view(torch.float32) if self.act_static else scale.reciprocal()
        xf8 = (x2 * inv_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        rows = x2.shape[0]
        # row-wise scaling wants a real (rows, 1) tensor (an expanded scalar has stride 0)
        scale_a = torch.empty(rows, 1, device=x2.device).copy_(scale.reshape(-1, 1).expand(rows, 1))
        out_dtype = self._out_dtype(x)
        fused_bias = self.bias is not None and self.bias.dtype == out_dtype
        y = torch._scaled_mm(
            xf8,
            self.w_fp8_bits.view(torch.float8_e4m3fn).t(),
            scale_a=scale_a,
            scale_b=self.w_scale_bits.view(torch.float32).view(1, -1),
            bias=self.bias if fused_bias else None,
            out_dtype=out_dtype,
            use_fast_accum=self.fast_accum,
        )
        return self._finish(y, x, lead, add_bias=not fused_bias)


class TorchaoInt8Linear(_KernelLinear):
    """W8A8 (static activation grid) or W8 weight-only ``Linear`` through torchao's ``Int8Tensor``.

    The torchao tensor is built from the exported codes and scales (not re-quantized by torchao),
    and the static activation grid is handed over as torchao's static scale and zero point
    (``Int8Tensor`` of torchao 0.18: codes ``qx = clamp(round(x * (1 / sx)) + zx, -128, 127)``, the
    rounding of the fused fake quantizer, then ``int_mm(qx, wi)`` with the zero point subtracted
    in the epilogue). torchao computes that epilogue in the input's dtype: in bf16 the result
    carries one bf16 rounding more than ``Int8MMLinear``'s fp32 epilogue.
    """

    @classmethod
    def from_quant(cls, layer: QuantLinear, codes: torch.Tensor, dtype: torch.dtype,
                   device: torch.device) -> "TorchaoInt8Linear":
        from torchao.quantization.granularity import PerTensor
        from torchao.quantization.quant_primitives import MappingType
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import (
            Int8Tensor,
            QuantizeTensorToInt8Kwargs,
        )

        new = _rebind(cls, layer)
        new._init_kernel(layer)
        w_int = (codes.to(torch.int16) - 128).to(torch.int8).contiguous().to(device)
        scale = layer.weight_quantizer.scale.reshape(-1, 1).float().expand(codes.shape[0], 1)
        act: dict = {}
        aq = layer.act_quantizer
        if aq is not None:
            act = {
                "act_quant_kwargs": QuantizeTensorToInt8Kwargs(
                    granularity=PerTensor(), mapping_type=MappingType.ASYMMETRIC
                ),
                "act_quant_scale": aq.scale.float().reshape(1, 1).to(device),
                "act_quant_zero_point": (aq.zero_point.reshape(1, 1) - 128).to(torch.int8).to(device),
            }
        tensor = Int8Tensor(w_int, scale.contiguous().to(device), [1, codes.shape[1]], dtype, **act)
        new.ao_weight = nn.Parameter(tensor, requires_grad=False)
        return new

    @property
    def weight(self) -> torch.Tensor:
        return self.ao_weight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        if self.act_static:
            # torchao multiplies on torch._int_mm (with too few rows it catches the error and
            # multiplies in float32 instead); zero rows are quantized on the static grid like any other
            x2 = _int_mm_rows(x2)
        y = F.linear(x2, self.ao_weight)[:rows]
        return self._finish(y, x, lead)
