"""``full_precision``: quantization off inside, each layer's own setting back afterwards, also on error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qsearch.quant import QuantLinear, QuantSpec, full_precision


def test_full_precision_switches_off_and_restores_each_layer() -> None:
    torch.manual_seed(0)
    spec = QuantSpec(w_bits=2, a_bits=None)
    layers = {"a": QuantLinear.from_float(nn.Linear(8, 8), spec), "b": QuantLinear.from_float(nn.Linear(8, 8), spec)}
    for layer in layers.values():
        layer.weight_quantizer.init_minmax(layer.weight)
    layers["b"].quant_enabled = False  # a layer a stage had already switched off stays off
    x = torch.randn(4, 8)
    quantized = layers["a"](x)
    with full_precision(layers):
        assert torch.equal(layers["a"](x), nn.functional.linear(x, layers["a"].weight, layers["a"].bias))
        assert not any(layer.quant_enabled for layer in layers.values())
    assert torch.equal(layers["a"](x), quantized)
    assert layers["a"].quant_enabled and not layers["b"].quant_enabled
    with pytest.raises(RuntimeError), full_precision(layers):
        raise RuntimeError("a failing stage")
    assert layers["a"].quant_enabled and not layers["b"].quant_enabled
