"""How one layer is quantized: the per-layer configuration object.

A ``QuantSpec`` plays the role of a torchao config: a plain, validated value that says *what* to do to
a layer (bits, number format, granularity, rounding range of activations), while the modules in
``qsearch.quant.modules`` say *how*. Recipes set one default spec and override fields per layer by
glob pattern, which is exactly the per-layer mixed precision that the search explores.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Format = Literal["int", "fp"]
WeightGranularity = Literal["tensor", "channel", "group"]
ActGranularity = Literal["tensor", "token", "group"]

# Exponent bits of the common minifloat formats, used when a spec leaves them open (OCP names:
# FP8 E4M3, FP6 E3M2, FP4 E2M1; 3- and 5-bit formats follow the same "half the bits" rule).
DEFAULT_EXPONENT_BITS = {3: 1, 4: 2, 5: 2, 6: 3, 7: 4, 8: 4}


class QuantSpec(BaseModel):
    """Quantization of one Conv2d/Linear layer: its weights and the activations it consumes.

    ``w_bits=None`` keeps the weights in full precision, ``a_bits=None`` the input activations.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    w_bits: int | None = Field(8, ge=1, le=8, description="weight bits; null keeps FP weights")
    w_format: Format = Field("int", description="integer grid or minifloat (fp) codes")
    w_exponent_bits: int | None = Field(
        None, ge=1, le=5, description="fp exponent bits; default by width (E4M3, E3M2, E2M1)"
    )
    w_granularity: WeightGranularity = Field(
        "channel", description="one scale per tensor, per output channel, or per input group"
    )
    group_size: int | None = Field(
        None, ge=1, description="input elements per scale when w_granularity is 'group'"
    )
    w_symmetric: bool = Field(True, description="symmetric grid (zero point 0) for weights")
    a_bits: int | None = Field(8, ge=2, le=16, description="activation bits; null keeps FP inputs")
    a_format: Format = "int"
    a_exponent_bits: int | None = Field(None, ge=1, le=5)
    a_granularity: ActGranularity = Field(
        "tensor", description="one scale per tensor, or (dynamic) per token or per token and channel group"
    )
    a_group_size: int | None = Field(
        None, ge=1, description="channels per activation scale when a_granularity is 'group'"
    )
    a_dynamic: bool = Field(
        False, description="compute activation ranges per call instead of calibrating them"
    )
    a_symmetric: bool = Field(False, description="symmetric activation grid")

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.w_granularity == "group" and self.group_size is None:
            raise ValueError("w_granularity 'group' needs group_size")
        if self.w_format == "fp" and self.w_bits is not None and self.w_bits < 3:
            raise ValueError("fp weights need w_bits >= 3 (sign, exponent and mantissa)")
        if self.a_format == "fp" and self.a_bits is not None and self.a_bits not in (4, 6, 8):
            raise ValueError("fp activations support a_bits 4, 6 or 8")
        if self.a_granularity in ("token", "group") and not self.a_dynamic:
            raise ValueError(f"per-{self.a_granularity} activation quantization must be dynamic (a_dynamic: true)")
        if self.a_granularity == "group" and self.a_group_size is None:
            raise ValueError("a_granularity 'group' needs a_group_size")
        return self

    @property
    def weight_exponent_bits(self) -> int:
        """Exponent bits of an fp weight format (explicit or the width's default)."""
        return self.w_exponent_bits or DEFAULT_EXPONENT_BITS[self.w_bits or 8]

    @property
    def act_exponent_bits(self) -> int:
        """Exponent bits of an fp activation format."""
        return self.a_exponent_bits or DEFAULT_EXPONENT_BITS[self.a_bits or 8]


FULL_PRECISION = QuantSpec(w_bits=None, a_bits=None)
