"""Bits accounting: what a quantized model costs, counted as the exported folder will store it.

* ``avg_weight_bits``: bits of every Conv2d/Linear weight element, averaged by parameter count,
  full-precision layers counted at ``FP_BITS`` (they are exported in fp16);
* ``model_bytes``: packed weight codes, their fp16 scales (and zero points of asymmetric grids), and
  every other parameter or added tensor (biases, norms, embeddings, smoothing vectors, low-rank
  branches) in fp16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from qsearch.quant.apply import quantizable_layers
from qsearch.quant.modules import QuantMixin

FP_BITS = 16


@dataclass(frozen=True)
class BitsReport:
    """Size of a (quantized) model."""

    avg_weight_bits: float
    model_bytes: int
    weight_params: int
    total_params: int

    @property
    def model_mb(self) -> float:
        return self.model_bytes / 2**20

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "model_mb": self.model_mb}


def bits_report(model: nn.Module) -> BitsReport:
    """Count the bits of ``model`` as it is now (quantized layers at their spec's widths)."""
    weight_bits = 0.0
    weight_params = 0
    counted: set[int] = set()
    total_bytes = 0.0
    for layer in quantizable_layers(model).values():
        n = layer.weight.numel()
        wq = layer.weight_quantizer if isinstance(layer, QuantMixin) else None
        bits = wq.bits if (wq is not None and layer.quant_enabled) else FP_BITS
        weight_bits += n * bits
        weight_params += n
        total_bytes += n * bits / 8
        counted.add(id(layer.weight))
        if wq is not None and layer.quant_enabled:
            per_group = 1 if (wq.symmetric or wq.format == "fp") else 2
            total_bytes += wq.scale.numel() * per_group * 2
            counted.update({id(wq.scale), id(wq.zero_point)})
    total_params = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in counted:
            continue
        counted.add(id(t))
        if name.endswith(("act_quantizer.scale", "act_quantizer.zero_point")):
            total_bytes += 2 * t.numel()
            continue
        total_params += t.numel() if isinstance(t, nn.Parameter) else 0
        total_bytes += t.numel() * FP_BITS / 8
    total_params += weight_params
    avg = weight_bits / weight_params if weight_params else float(FP_BITS)
    return BitsReport(avg, int(round(total_bytes)), weight_params, total_params)
