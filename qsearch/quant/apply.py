"""``quantize_``: swap a model's Conv2d/Linear layers for quantized ones, per a layer plan.

Like torchao's ``quantize_(model, config)``, a quantization is a value (``LayerPlan``: a default
``QuantSpec``, glob-pattern overrides and full-precision patterns) applied to a model in place. The
plan is resolved to one spec per layer name first, so that the bits accounting, the search and the
export all see the same per-layer assignment.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qsearch.quant.modules import QUANT_MODULES
from qsearch.quant.spec import FULL_PRECISION, QuantSpec


class LayerPlan(BaseModel):
    """Which spec each layer gets: ``default``, then the first matching ``overrides`` pattern.

    Overrides change only the fields they name (``{w_bits: 3}`` keeps the default's other fields);
    a layer matching a ``keep_fp`` pattern stays in full precision.
    """

    model_config = ConfigDict(extra="forbid")

    default: QuantSpec = Field(default_factory=QuantSpec)
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="glob pattern over module names -> QuantSpec fields"
    )
    keep_fp: list[str] = Field(default_factory=list, description="glob patterns kept in full precision")

    def pattern_for(self, name: str) -> str | None:
        """The override pattern that decides ``name``'s spec: the first that matches."""
        return next((p for p in self.overrides if fnmatch.fnmatchcase(name, p)), None)

    def spec_for(self, name: str) -> QuantSpec:
        """The resolved spec of the layer called ``name``."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.keep_fp):
            return FULL_PRECISION
        pattern = self.pattern_for(name)
        return QuantSpec(**{**self.default.model_dump(), **(self.overrides[pattern] if pattern else {})})

    def resolve(self, model: nn.Module) -> dict[str, QuantSpec]:
        """Spec of every quantizable layer of ``model`` (full precision included)."""
        return {name: self.spec_for(name) for name in quantizable_layers(model)}

    def unmatched_patterns(self, model: nn.Module) -> list[str]:
        """Override/keep_fp patterns that match no layer: almost always a typo in a recipe."""
        names = list(quantizable_layers(model))
        patterns = list(self.overrides) + list(self.keep_fp)
        return [p for p in patterns if not fnmatch.filter(names, p)]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear layers (and already-quantized ones) by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, tuple(QUANT_MODULES))}


def quantize_(model: nn.Module, specs: Mapping[str, QuantSpec]) -> nn.Module:
    """Replace each layer named in ``specs`` by its quantized version, in place.

    Layers whose spec is full precision are left untouched. Quantizers start uncalibrated (weights
    at min-max ranges once a quantize stage initializes them); the method stages calibrate them.
    """
    for name, spec in specs.items():
        if spec == FULL_PRECISION:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if isinstance(layer, tuple(QUANT_MODULES.values())):
            continue
        quant_cls = QUANT_MODULES.get(type(layer))
        if quant_cls is None:
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not Conv2d/Linear")
        setattr(parent, child, quant_cls.from_float(layer, spec))
    return model
