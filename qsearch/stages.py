"""The four kinds of pipeline stage, and the context they work on.

A recipe runs, in this order:

1. a **calibration sampler** picks the denoiser inputs to calibrate on from the FP trajectory;
2. **reparameterizers** transform the layers exactly (splitting, smoothing, rotation, low-rank
   branches) so that they quantize better, leaving the full-precision output unchanged;
3. **quantizers** set the quantization grids (ranges, rounding, reconstruction, fine-tuning);
4. **error correctors** wrap the sampler's step to correct what quantization error remains.

Each stage is a small class with a pydantic ``Config`` (its recipe parameters), registered under a
name with ``@register("name")``. A stage gets the shared ``QuantContext`` and mutates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from qsearch.calibration import CalibrationSet
from qsearch.models import Denoiser
from qsearch.quant.modules import QuantModule, quant_layers
from qsearch.quant.spec import QuantSpec
from qsearch.sampling import Sampler, StepFn, Trajectory

StageKind = Literal["calibration", "reparameterize", "quantize", "correct"]
KIND_ORDER: tuple[StageKind, ...] = ("calibration", "reparameterize", "quantize", "correct")


class StageConfig(BaseModel):
    """Base of every stage's parameters: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QuantContext:
    """Everything a stage may read or change while a recipe is applied.

    ``denoiser`` is the model being quantized (its Conv2d/Linear layers already replaced by
    quantized layers, uncalibrated); ``fp_denoiser`` is an untouched full-precision copy, the
    teacher of reconstruction and fine-tuning methods and the reference of error correctors.
    """

    denoiser: Denoiser
    fp_denoiser: Denoiser
    sampler: Sampler
    trajectory: Trajectory
    specs: dict[str, QuantSpec]
    calibration: CalibrationSet | None = None
    correctors: list[Any] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 64
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def layers(self) -> dict[str, QuantModule]:
        """The quantized layers of the model, by module name."""
        return quant_layers(self.model)

    def require_calibration(self, stage: str) -> CalibrationSet:
        """The calibration set, or an error naming the stage that needs one."""
        if self.calibration is None:
            raise RuntimeError(f"stage {stage!r} needs calibration data: add a calibration stage")
        return self.calibration


class Stage:
    """A registered method. Subclasses set ``kind``, ``paper`` and a nested ``Config``."""

    kind: ClassVar[StageKind]
    name: ClassVar[str]
    paper: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig | None = None) -> None:
        self.config = config if config is not None else self.Config(method=self.name)

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def __repr__(self) -> str:
        params = self.config.model_dump(exclude={"method"})
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


class CalibrationSampler(Stage):
    """Chooses the calibration set from the FP model's sampling trajectory."""

    kind = "calibration"

    def select(self, ctx: QuantContext) -> CalibrationSet:
        raise NotImplementedError

    def apply(self, ctx: QuantContext) -> None:
        ctx.calibration = self.select(ctx)


class Reparameterizer(Stage):
    """Transforms layers exactly (in full precision) so that they quantize with less error."""

    kind = "reparameterize"

    def apply(self, ctx: QuantContext) -> None:
        raise NotImplementedError


class Quantizer(Stage):
    """Sets the quantization grids of the layers (ranges, rounding, reconstruction, training)."""

    kind = "quantize"

    def apply(self, ctx: QuantContext) -> None:
        raise NotImplementedError


class ErrorCorrector(Stage):
    """Corrects the remaining quantization error at sampling time by wrapping the step function.

    ``prepare`` measures what the correction needs (on the calibration set, against the FP model);
    ``wrap`` returns the corrected step given the next one in the chain.
    """

    kind = "correct"

    def apply(self, ctx: QuantContext) -> None:
        self.prepare(ctx)
        ctx.correctors.append(self)

    def prepare(self, ctx: QuantContext) -> None:
        """Estimate correction statistics; the default needs none."""

    def wrap(self, step: StepFn, sampler: Sampler) -> StepFn:
        raise NotImplementedError


STAGE_BASES: dict[StageKind, type[Stage]] = {
    "calibration": CalibrationSampler,
    "reparameterize": Reparameterizer,
    "quantize": Quantizer,
    "correct": ErrorCorrector,
}
