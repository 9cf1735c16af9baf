"""Quantization engine: per-layer specs, grids, quantizers, quantized layers and ``quantize_``."""

from qsearch.quant.apply import LayerPlan, quantizable_layers, quantize_
from qsearch.quant.modules import QuantConv2d, QuantLinear, QuantModule, full_precision, quant_layers
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.quant.spec import FULL_PRECISION, QuantSpec

__all__ = [
    "FULL_PRECISION", "ActQuantizer", "LayerPlan", "QuantConv2d", "QuantLinear", "QuantModule",
    "QuantSpec", "WeightQuantizer", "full_precision", "quant_layers", "quantizable_layers", "quantize_",
]
