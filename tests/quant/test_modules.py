"""Switching rounding off: ``full_precision`` (all of it), ``activations_off`` and ``weights_off`` (one kind); each layer's own setting back afterwards, also on error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qsearch.quant import QuantLinear, QuantSpec, full_precision
from qsearch.quant.modules import activations_off, weights_off


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


def test_weights_off_and_activations_off_remove_one_kind_of_rounding() -> None:
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(8, 8), QuantSpec(w_bits=2, a_bits=3))
    layer.weight_quantizer.init_minmax(layer.weight)
    x = torch.randn(4, 8)
    layer.act_quantizer.set_range(x.amin(), x.amax())
    wq, xq = layer.weight_quantizer(layer.weight), layer.act_quantizer(x)
    both = layer(x)
    with activations_off({"l": layer}):
        assert torch.equal(layer(x), nn.functional.linear(x, wq, layer.bias))
    with weights_off({"l": layer}):
        assert torch.equal(layer(x), nn.functional.linear(xq, layer.weight, layer.bias))
    with pytest.raises(RuntimeError), weights_off({"l": layer}):
        raise RuntimeError("a failing ablation")
    assert torch.equal(layer(x), both) and not torch.equal(both, nn.functional.linear(x, layer.weight, layer.bias))
