"""Weight and activation quantizers: small modules that fake-quantize a tensor on a fixed grid.

They hold the grid's parameters (scale, zero point) as buffers, so a calibrated quantizer is part of
the model's state and travels with it; training methods (LSQ, QAT) turn ``scale`` into a parameter.
Rounding uses a straight-through estimator, so gradients reach both the input and the scale.
"""

from __future__ import annotations

import torch
from torch import nn

from qsearch.quant import grid
from qsearch.quant.spec import QuantSpec


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with an identity gradient (straight-through estimator).

    Written as ``round(x) + (x - x.detach())`` rather than ``x + (round(x) - x).detach()``: the added
    term is exactly zero, so the forward value is the integer itself (the other form can be off by
    one ulp, and an exported model must reproduce the grid bit for bit).
    """
    return torch.round(x) + (x - x.detach())


def _fp_round_ste(x: torch.Tensor, bits: int, exponent_bits: int) -> torch.Tensor:
    table = torch.tensor(grid.fp_table(bits, exponent_bits), dtype=x.dtype, device=x.device)
    midpoints = (table[1:] + table[:-1]) / 2
    rounded = table[torch.bucketize(x.detach(), midpoints)]
    return rounded + (x - x.detach())


class WeightQuantizer(nn.Module):
    """Quantizes a weight tensor per tensor, per output channel or per input group.

    ``scale`` and ``zero_point`` have shape ``(rows, groups, 1)`` (see ``grid.group_view``).
    """

    def __init__(self, spec: QuantSpec, weight_shape: torch.Size) -> None:
        super().__init__()
        if spec.w_bits is None:
            raise ValueError("WeightQuantizer needs w_bits")
        self.bits = spec.w_bits
        self.format = spec.w_format
        self.exponent_bits = spec.weight_exponent_bits if spec.w_format == "fp" else 0
        self.granularity = spec.w_granularity
        self.group_size = spec.group_size
        self.symmetric = spec.w_symmetric or spec.w_format == "fp"
        self.weight_shape = torch.Size(weight_shape)
        rows = {"tensor": 1}.get(self.granularity, weight_shape[0])
        cols = int(torch.tensor(weight_shape[1:]).prod()) if len(weight_shape) > 1 else 1
        groups = -(-cols // self.group_size) if self.granularity == "group" else 1
        self.register_buffer("scale", torch.ones(rows, groups, 1))
        self.register_buffer("zero_point", torch.zeros(rows, groups, 1))

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return f"bits={self.bits}, format={self.format}, granularity={self.granularity}{g}"

    def grouped(self, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``w`` reshaped to this quantizer's ``(rows, groups, group_size)`` layout."""
        return grid.group_view(w, self.granularity, self.group_size)

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the grid from per-group clipping ranges of shape ``(rows, groups, 1)``."""
        if self.format == "fp":
            absmax = torch.maximum(hi, -lo)
            self.scale.copy_(grid.fp_scale(absmax, self.bits, self.exponent_bits))
            self.zero_point.zero_()
            return
        scale, zero_point = grid.int_qparams(lo, hi, self.bits, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    @torch.no_grad()
    def init_minmax(self, w: torch.Tensor) -> None:
        """Min-max ranges of ``w`` (the round-to-nearest baseline)."""
        g, _ = self.grouped(w)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        if self.bits == 1:  # binarization keeps the mean magnitude (XNOR-Net's optimal scale)
            mean_abs = g.abs().mean(-1, keepdim=True)
            lo, hi = -mean_abs, mean_abs
        self.set_range(lo, hi)

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Unsigned codes of ``w`` in the weight's own shape (float tensor of integers)."""
        g, pad = self.grouped(w)
        if self.format == "fp":
            q = grid.fp_encode(g, self.scale, self.bits, self.exponent_bits)
        else:
            q = grid.int_encode(g, self.scale, self.zero_point, self.bits)
        return grid.ungroup(q, pad, w.shape)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """Real weights from codes (what an exported model computes at load time)."""
        g, pad = self.grouped(q)
        if self.format == "fp":
            w = grid.fp_decode(g, self.scale, self.bits, self.exponent_bits)
        else:
            w = grid.int_decode(g, self.scale, self.zero_point)
        return grid.ungroup(w, pad, q.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized ``w``, differentiable in ``w`` and ``scale`` (STE)."""
        g, pad = self.grouped(w)
        if self.format == "fp":
            out = _fp_round_ste(g / self.scale, self.bits, self.exponent_bits) * self.scale
        elif self.bits == 1:
            sign = torch.where(g >= 0, 1.0, -1.0).to(g.dtype)
            out = sign * self.scale / 2 + (g - g.detach())  # exact values; STE to w, grad to scale
        else:
            q = torch.clamp(round_ste(g / self.scale) + self.zero_point, 0, grid.code_max(self.bits))
            out = (q - self.zero_point) * self.scale
        return grid.ungroup(out, pad, w.shape)


class ActQuantizer(nn.Module):
    """Quantizes the input activations of a layer, with calibrated (static) or per-call ranges.

    A static quantizer starts uncalibrated and passes inputs through until ``set_range`` is called;
    quantize stages calibrate it from the calibration set.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        if spec.a_bits is None:
            raise ValueError("ActQuantizer needs a_bits")
        self.bits = spec.a_bits
        self.format = spec.a_format
        self.exponent_bits = spec.act_exponent_bits if spec.a_format == "fp" else 0
        self.granularity = spec.a_granularity
        self.group_size = spec.a_group_size
        self.dynamic = spec.a_dynamic
        self.symmetric = spec.a_symmetric or spec.a_format == "fp"
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.calibrated = False  # a Python flag: reading a device tensor here would sync the GPU

    def get_extra_state(self) -> dict:
        return {"calibrated": self.calibrated}

    def set_extra_state(self, state: dict) -> None:
        self.calibrated = bool(state["calibrated"])

    def extra_repr(self) -> str:
        mode = "dynamic" if self.dynamic else "static"
        g = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return f"bits={self.bits}, format={self.format}, {mode}, granularity={self.granularity}{g}"

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Calibrate a static quantizer to the clipping range ``[lo, hi]``."""
        lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        scale, zero_point = self.qparams(lo.to(self.scale.device), hi.to(self.scale.device))
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.calibrated = True

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for a range (static or dynamic)."""
        if self.format == "fp":
            absmax = torch.maximum(hi, -lo)
            return grid.fp_scale(absmax, self.bits, self.exponent_bits), torch.zeros_like(absmax)
        return grid.int_qparams(lo, hi, self.bits, self.symmetric)

    def fake_quant(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` on the grid given by ``scale``/``zero_point`` (broadcast)."""
        if self.format == "fp":
            return _fp_round_ste(x / scale, self.bits, self.exponent_bits) * scale
        qmax = grid.code_max(self.bits)
        if scale.dim() == 0 and not scale.requires_grad and x.dtype in _FUSED_DTYPES:
            # One fused kernel (PyTorch's own STE), the common static per-tensor case; it keeps
            # the overhead of fake quantization small, also under bf16 autocast.
            # The kernel wants a float32 scale even for bf16/fp16 inputs (a model cast by .to()).
            return torch.fake_quantize_per_tensor_affine(
                x, scale.float(), zero_point.to(torch.int32), 0, qmax
            )
        q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
        return (q - zero_point) * scale

    def dynamic_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-call range: whole tensor, or per token (the channel axis is reduced)."""
        xd = x.detach().float()
        if self.granularity == "tensor":
            return xd.amin(), xd.amax()
        dim = 1 if x.dim() == 4 else -1  # conv inputs (B, C, H, W): a token is one pixel
        return xd.amin(dim, keepdim=True), xd.amax(dim, keepdim=True)

    def group_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic ranges per token and group of ``group_size`` channels (Q-DiT, SVDQuant's W4A4)."""
        channel_dim = 1 if x.dim() == 4 else -1
        moved = x.movedim(channel_dim, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        groups, pad = grid.group_view(flat, "group", self.group_size)
        g = groups.detach().float()
        scale, zero_point = self.qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True))
        out = self.fake_quant(groups, scale.to(x.dtype), zero_point.to(x.dtype))
        return grid.ungroup(out, pad, flat.shape).reshape(moved.shape).movedim(-1, channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            if self.granularity == "group":
                return self.group_forward(x)
            scale, zero_point = self.qparams(*self.dynamic_range(x))
            return self.fake_quant(x, scale.to(x.dtype), zero_point.to(x.dtype))
        if not self.calibrated:
            return x
        return self.fake_quant(x, self.scale, self.zero_point)
