"""Kernel backends: each kernel layer computes what the fake-quantized layer computes; fallbacks are said."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

from qsearch.export.backends import BackendFallbackWarning, convert
from qsearch.export.layers import Fp8MMLinear, Int8MMLinear, PackedQuantConv2d, PackedQuantLinear
from qsearch.export.pack import pack
from qsearch.quant.modules import QuantConv2d, QuantLinear
from qsearch.quant.spec import QuantSpec

CPU = torch.device("cpu")


def _layer(spec: QuantSpec, in_features: int = 64, out_features: int = 48) -> QuantLinear:
    """A calibrated quantized Linear with a bias and an input range wider than its data."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(in_features, out_features), spec).requires_grad_(False)
    layer.weight_quantizer.init_minmax(layer.weight)
    if layer.act_quantizer is not None and not spec.a_dynamic:
        layer.act_quantizer.set_range(torch.tensor(-2.5), torch.tensor(3.0))
    return layer


def _codes(layer) -> dict[str, tuple]:
    codes = layer.weight_quantizer.encode(layer.weight).to(torch.uint8)
    return {"layer": (codes, pack(codes, layer.weight_quantizer.bits), layer.weight_quantizer.bits)}


def _convert(layer, backend: str, **kwargs) -> tuple[nn.Module, dict[str, str]]:
    model = nn.Sequential()
    model.add_module("layer", layer)
    used = convert(model, _codes(layer), backend=backend, device=CPU, dtype=torch.float32,
                   dequantize=kwargs.get("dequantize", "load"), fp8_fast_accum=kwargs.get("fp8_fast_accum", False))
    return model.layer, used


W8A8 = QuantSpec(w_bits=8, a_bits=8)
W8A8_TOKEN = QuantSpec(w_bits=8, a_bits=8, a_dynamic=True, a_granularity="token")
FP8 = QuantSpec(w_bits=8, w_format="fp", a_bits=8, a_format="fp")
FP8_TOKEN = QuantSpec(w_bits=8, w_format="fp", a_bits=8, a_format="fp", a_dynamic=True, a_granularity="token")
NO_TORCHAO = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")


@pytest.mark.parametrize(
    ("spec", "backend", "kernel_class"),
    [(W8A8, "int_mm", Int8MMLinear), (W8A8_TOKEN, "int_mm", Int8MMLinear),
     (FP8, "scaled_mm", Fp8MMLinear), (FP8_TOKEN, "scaled_mm", Fp8MMLinear)],
)
def test_kernel_layer_computes_the_fake_quantized_layer(spec, backend, kernel_class) -> None:
    """Up to float summation order: the integer product is exact, the FP8 operands are the grid's."""
    layer = _layer(spec)
    x = torch.randn(3, 20, 64) * 2
    expected = layer(x)
    kernel, used = _convert(layer, backend)
    assert type(kernel) is kernel_class and used == {"layer": backend}
    out = kernel(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the decoded weight of the kernel layer is the exported one
    assert torch.equal(kernel.weight, layer.quantized_weight())


@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_layer_hands_bias_and_accumulation_mode_to_the_gemm(monkeypatch, fast_accum) -> None:
    """The bias goes into ``_scaled_mm``'s epilogue (not a separate pass) and ``fp8_fast_accum``
    reaches the kernel; the output is unchanged (the CPU kernel has one accumulation mode)."""
    layer = _layer(FP8)
    x = torch.randn(20, 64)
    expected = layer(x)
    kernel, _ = _convert(layer, "scaled_mm", fp8_fast_accum=fast_accum)
    calls: list[dict] = []
    scaled_mm = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return scaled_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    torch.testing.assert_close(kernel(x), expected, rtol=1e-5, atol=1e-5)
    assert calls[0]["use_fast_accum"] is fast_accum
    assert calls[0]["bias"] is kernel.bias


def test_fp8_layer_scales_its_input_by_the_stored_reciprocal(monkeypatch) -> None:
    """The static grid's ``1 / scale`` is stored as fp32 bits (a dtype cast leaves it exact) and the
    E4M3 input handed to ``_scaled_mm`` is ``x * (1 / scale)``, not ``x / scale``."""
    layer = _layer(FP8)
    kernel, _ = _convert(layer, "scaled_mm")
    kernel.to(torch.bfloat16)
    scale = kernel.act_scale_bits.view(torch.float32)
    inv_scale = kernel.act_inv_scale_bits.view(torch.float32)
    assert inv_scale.dtype == torch.float32 and torch.equal(inv_scale, 1 / scale)
    inputs: list[torch.Tensor] = []
    scaled_mm = torch._scaled_mm

    def spy(a, *args, **kwargs):
        inputs.append(a)
        return scaled_mm(a, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    x = torch.randn(20, 64, dtype=torch.bfloat16)
    kernel(x)
    assert torch.equal(inputs[0], (x * inv_scale).clamp(-448, 448).to(torch.float8_e4m3fn))


@pytest.mark.parametrize(("spec", "backend"), [(W8A8, "int_mm"), (FP8, "scaled_mm"),
                                               pytest.param(W8A8, "torchao", marks=NO_TORCHAO)])
def test_kernels_handle_a_single_row(spec, backend) -> None:
    """One token (a timestep embedding at batch 1): _int_mm needs > 16 rows, _scaled_mm real scales."""
    layer = _layer(spec)
    x = torch.randn(1, 64)
    expected = layer(x)
    kernel, _ = _convert(layer, backend)
    torch.testing.assert_close(kernel(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "backend", "dequantize"),
    [(W8A8, "fake", "load"), (W8A8_TOKEN, "fake", "load"), (W8A8, "fake", "on_the_fly"),
     (W8A8, "int_mm", "load"), (W8A8_TOKEN, "int_mm", "load"), (FP8_TOKEN, "scaled_mm", "load"),
     pytest.param(W8A8, "torchao", "load", marks=NO_TORCHAO),
     pytest.param(QuantSpec(w_bits=8, a_bits=None), "torchao", "load", marks=NO_TORCHAO)],
)
def test_layers_compile_into_one_graph(spec, backend, dequantize) -> None:
    """``torch.compile`` fuses the activation quantization with the GEMM only if nothing breaks the
    graph (``fullgraph=True`` raises on a break); the compiled layer computes what the eager one does."""
    layer = _layer(spec)
    x = torch.randn(3, 20, 64) * 2
    kernel, _ = _convert(layer, backend, dequantize=dequantize)
    with torch.no_grad():
        expected = kernel(x)
        compiled = torch.compile(kernel, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-6, atol=1e-6)


def test_grids_survive_a_cast_to_bfloat16() -> None:
    """Kernel layers keep their grids as fp32 bits: a model cast cannot round them."""
    layer = _layer(W8A8)
    kernel, _ = _convert(layer, "int_mm")
    scale = kernel.act_scale_bits.view(torch.float32).clone()
    kernel.to(torch.bfloat16)
    assert torch.equal(kernel.act_scale_bits.view(torch.float32), scale)
    assert kernel(torch.randn(20, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_fallbacks_are_warned_and_recorded() -> None:
    model = nn.Sequential()
    model.add_module("w4", _layer(QuantSpec(w_bits=4, a_bits=8)))
    model.add_module("w8", _layer(W8A8, 48, 32))
    conv = QuantConv2d.from_float(nn.Conv2d(4, 8, 3), W8A8).requires_grad_(False)
    conv.weight_quantizer.init_minmax(conv.weight)
    conv.act_quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    model.add_module("conv", conv)
    codes = {n: _codes(m)["layer"] for n, m in model.named_children()}
    with pytest.warns(BackendFallbackWarning, match=r"2 of 3 .*weight grid int4 is not int8.*not a Linear layer"):
        used = convert(model, codes, backend="int_mm", device=CPU, dtype=torch.float32, dequantize="on_the_fly")
    assert used == {"w4": "dequant_on_the_fly", "w8": "int_mm", "conv": "dequant_on_the_fly"}
    assert isinstance(model.w4, PackedQuantLinear) and isinstance(model.conv, PackedQuantConv2d)


def test_fake_backend_is_silent_and_unknown_backend_is_an_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, used = _convert(_layer(W8A8), "fake")
    assert used == {"layer": "fake"}
    with pytest.raises(ValueError, match="unknown backend"):
        _convert(_layer(W8A8), "tensorrt")


def test_dequantizing_on_the_fly_holds_packed_codes_only() -> None:
    layer = _layer(QuantSpec(w_bits=3, w_granularity="group", group_size=16, a_bits=None), 64, 48)
    x = torch.randn(5, 64)
    expected = layer(x)
    packed, _ = _convert(layer, "fake", dequantize="on_the_fly")
    assert isinstance(packed, PackedQuantLinear)
    assert "weight" not in dict(packed.named_parameters())
    assert packed.weight_codes.numel() == 64 * 48 * 3 // 8
    assert torch.equal(packed(x), expected)


@NO_TORCHAO
@pytest.mark.parametrize("spec", [W8A8, QuantSpec(w_bits=8, a_bits=None)])
def test_torchao_layer_computes_the_fake_quantized_layer(spec) -> None:
    layer = _layer(spec)
    x = torch.randn(20, 64) * 2
    expected = layer(x)
    kernel, used = _convert(layer, "torchao")
    assert used == {"layer": "torchao"}
    torch.testing.assert_close(kernel(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "out_features", "reason"),
    [(W8A8_TOKEN, 48, "torchao"),
     pytest.param(W8A8_TOKEN, 48, "torchao: dynamic activation ranges", marks=NO_TORCHAO),
     pytest.param(W8A8, 12, "torchao: shape 12x64 not a multiple of 8", marks=NO_TORCHAO)],
)
def test_torchao_refuses_dynamic_ranges(spec, out_features, reason) -> None:
    """Per-token ranges torchao would compute differently; an int8 GEMM torchao would run on the CPU."""
    layer = _layer(spec, out_features=out_features)
    with pytest.warns(BackendFallbackWarning, match=reason):
        _, used = _convert(layer, "torchao")
    assert used == {"layer": "fake"}
