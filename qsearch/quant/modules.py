"""Quantized Conv2d and Linear layers.

A quantized layer is the original layer (same parameters, same ``state_dict`` keys, still an
instance of ``nn.Conv2d``/``nn.Linear``) plus four optional parts that the method stages fill in:

* ``pre``: an exact input transform (channel smoothing, Hadamard rotation) whose inverse the
  reparameterizers folded into the weight, applied before the activation quantizer;
* ``act_quantizer``: quantizes the (transformed) input;
* ``weight_quantizer``: quantizes the weight;
* ``branch``: a full-precision low-rank branch on the transformed input (SVDQuant), added to the
  output.

``forward`` is the only place where these compose, so the exported model (which reuses these
modules with decoded integer weights) computes exactly what the search measured.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.quant.spec import QuantSpec


class QuantMixin:
    """Shared state and forward logic of the quantized layers."""

    spec: QuantSpec
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quant(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.pre: nn.Module | None = None
        self.branch: nn.Module | None = None
        device = self.weight.device
        self.weight_quantizer = (
            WeightQuantizer(spec, self.weight.shape).to(device) if spec.w_bits is not None else None
        )
        self.act_quantizer = ActQuantizer(spec).to(device) if spec.a_bits is not None else None
        self.quant_enabled = True
        self._cache_key: tuple | None = None
        self._cached_weight: torch.Tensor | None = None

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the layer computes with it, cached while nothing that defines it changes.

        The cache key uses the tensors' version counters, so in-place edits by a stage (or a
        replaced parameter) invalidate it without the stage having to remember to.
        """
        wq = self.weight_quantizer
        if wq is None or not self.quant_enabled:
            return self.weight
        if torch.is_grad_enabled() and (self.weight.requires_grad or wq.scale.requires_grad):
            return wq(self.weight)
        if torch.compiler.is_compiling():
            # traced into the compiled graph; the cache's version checks would break the graph at every layer
            return wq(self.weight)
        key = (
            id(self.weight), self.weight._version, self.weight.device, self.weight.dtype,
            id(wq.scale), wq.scale._version, id(wq.zero_point), wq.zero_point._version,
        )
        if key != self._cache_key:
            with torch.no_grad():
                self._cached_weight = wq(self.weight)
            self._cache_key = key
        return self._cached_weight

    def _quant_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        xq = self.act_quantizer(x) if (self.act_quantizer is not None and self.quant_enabled) else x
        out = op(xq, self.quantized_weight())
        if self.branch is not None:
            out = out + self.branch(x)
        return out


def _rebind(cls: type, layer: nn.Module, spec: QuantSpec) -> nn.Module:
    """A ``cls`` instance that shares ``layer``'s parameters (no copy), with quantizers added."""
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        setattr(new, registry, dict(getattr(layer, registry)))
    new._init_quant(spec)
    return new


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` that quantizes its weight and input."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: QuantSpec) -> "QuantConv2d":
        return _rebind(cls, conv, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_forward(x, lambda xq, w: self._conv_forward(xq, w, self.bias))


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` that quantizes its weight and input."""

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantLinear":
        return _rebind(cls, linear, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_forward(x, lambda xq, w: F.linear(xq, w, self.bias))


QUANT_MODULES: dict[type[nn.Module], type[QuantMixin]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}

QuantModule = QuantConv2d | QuantLinear


def quant_layers(model: nn.Module) -> dict[str, QuantModule]:
    """Every quantized layer of ``model`` by its module name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantMixin)}


@contextmanager
def full_precision(layers: Mapping[str, QuantMixin]) -> Iterator[None]:
    """Quantization switched off in ``layers`` (their ``pre`` transforms and branches stay: they are
    exact), each layer's own setting restored afterwards."""
    saved = {name: layer.quant_enabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.quant_enabled = False
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.quant_enabled = saved[name]


@contextmanager
def _quantizers_removed(layers: Mapping[str, QuantMixin], attr: str) -> Iterator[None]:
    saved = {name: getattr(layer, attr) for name, layer in layers.items()}
    for layer in layers.values():
        setattr(layer, attr, None)
    try:
        yield
    finally:
        for name, layer in layers.items():
            setattr(layer, attr, saved[name])


def activations_off(layers: Mapping[str, QuantMixin]) -> AbstractContextManager[None]:
    """Full-precision activations in ``layers``, quantized weights kept: block reconstruction learns the
    weights alone this way, and an ablation measures the error the weights cause."""
    return _quantizers_removed(layers, "act_quantizer")


def weights_off(layers: Mapping[str, QuantMixin]) -> AbstractContextManager[None]:
    """Full-precision weights in ``layers``, quantized activations kept (the error the activations cause)."""
    return _quantizers_removed(layers, "weight_quantizer")
