"""A synthetic objective with a known Pareto front, for testing the study machinery without models.

Quality is the quantization-noise model of mixed precision: each group of layers adds
``sensitivity * 4^-bits`` (each bit halves the step); size is the exact parameter-weighted average of
the weight bits. The proxy is the quality times a fixed per-configuration factor in [1, 1 + noise],
so it ranks configurations like the quality up to that noise (the situation the margin is for).
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
from typing import Any

from qsearch.recipe import RecipeBase
from qsearch.search.pareto import non_dominated

# layer -> weight elements; three blocks of different size
PARAMS = {
    "conv_in": 1_000,
    "down_blocks.0.resnets.0.conv1": 40_000,
    "down_blocks.0.resnets.0.conv2": 40_000,
    "mid_block.attentions.0.to_q": 20_000,
    "mid_block.attentions.0.to_k": 20_000,
    "up_blocks.0.resnets.0.conv1": 80_000,
    "conv_out": 1_000,
}
# per-block sensitivity: the small mid block matters most per parameter
SENSITIVITY = {"conv_in": 0.0, "down_blocks.0": 1.0, "mid_block": 6.0, "up_blocks.0": 2.0, "conv_out": 0.0}


def block(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def quality_of(bits: dict[str, int]) -> float:
    """Noise power summed over layers (sensitivity spread over a block's layers by size)."""
    total = 0.0
    for name, b in bits.items():
        blk = block(name)
        share = PARAMS[name] / sum(p for n, p in PARAMS.items() if block(n) == blk)
        total += SENSITIVITY[blk] * share * 4.0 ** -b
    return total


def size_of(bits: dict[str, int]) -> float:
    return sum(PARAMS[n] * b for n, b in bits.items()) / sum(PARAMS[n] for n in bits)


class SyntheticEvaluator:
    """The ``Evaluator`` protocol on the synthetic objective; counts what it was asked to do."""

    def __init__(self, noise: float = 0.05, fail_on: dict[str, Any] | None = None,
                 interrupt_at_call: int | None = None) -> None:
        self.noise = noise
        self.fail_on = fail_on or {}
        self.interrupt_at_call = interrupt_at_call
        self.calls = {"quantize": 0, "proxy": 0, "full": 0, "sensitivity": 0}

    def layer_params(self) -> dict[str, int]:
        return dict(PARAMS)

    def bits(self, recipe: RecipeBase) -> dict[str, int]:
        plan = recipe.layer_plan()
        return {n: plan.spec_for(n).w_bits or 16 for n in PARAMS}

    def size(self, recipe: RecipeBase) -> dict[str, float]:
        avg = size_of(self.bits(recipe))
        return {"avg_weight_bits": avg, "model_mb": avg * sum(PARAMS.values()) / 8 / 2**20}

    def layer_specs(self, recipe: RecipeBase) -> dict[str, dict[str, Any]]:
        plan = recipe.layer_plan()
        return {n: plan.spec_for(n).model_dump() for n in PARAMS}

    def quantize(self, recipe: RecipeBase, seed: int) -> Any:
        self.calls["quantize"] += 1
        if self.interrupt_at_call is not None and self.calls["quantize"] == self.interrupt_at_call:
            raise KeyboardInterrupt
        bits = self.bits(recipe)
        for pattern, value in self.fail_on.items():
            if any(fnmatch.fnmatchcase(n, pattern) and b == value for n, b in bits.items()):
                from qsearch.engine import NonFiniteError

                raise NonFiniteError("12 non-finite sample values")
        return bits

    def proxy(self, bits: dict[str, int], recipe: RecipeBase) -> dict[str, float]:
        self.calls["proxy"] += 1
        key = ",".join(f"{n}={b}" for n, b in sorted(bits.items())).encode()
        u = int.from_bytes(hashlib.sha256(key).digest()[:4], "little") / 2**32
        return {"mse": quality_of(bits) * (1 + self.noise * u)}

    def full(self, bits: dict[str, int], recipe: RecipeBase) -> dict[str, float]:
        self.calls["full"] += 1
        return {"fid": quality_of(bits), **self.size(recipe)}

    def sensitivity(self, recipe: RecipeBase, low_bits: int, n_samples: int) -> dict[str, float]:
        self.calls["sensitivity"] += 1
        return {n: SENSITIVITY[block(n)] * PARAMS[n] / sum(p for m, p in PARAMS.items() if block(m) == block(n))
                * 4.0 ** -low_bits for n in PARAMS}


def base_recipe() -> dict[str, Any]:
    """A recipe on a model that is never loaded (the synthetic evaluator needs only its layer plan)."""
    return {"model": "synthetic", "quant": {"w_bits": 8, "a_bits": 8}, "keep_fp": ["conv_in", "conv_out"],
            "stages": [{"method": "uniform", "n_samples": 8}, {"method": "rtn"}]}


def space_data(**changes: Any) -> dict[str, Any]:
    """A block-granularity space over the synthetic layers: 3 blocks x 3 choices = 27 configurations."""
    data = {
        "name": "synthetic",
        "base": base_recipe(),
        "granularity": "block",
        "layers": {"*": {"w_bits": [2, 4, 8]}},
        "population_size": 6,
        "seed": 0,
        "trials": 24,
        "fidelity": {"enabled": False},
    }
    data.update(changes)
    return data


def true_front(max_avg_bits: float | None = None) -> list[tuple[float, float, dict[str, int]]]:
    """Brute force over the 27 configurations: (quality, size, block bits) of the exact front."""
    blocks = ["down_blocks.0", "mid_block", "up_blocks.0"]
    points = []
    for combo in itertools.product([2, 4, 8], repeat=3):
        per_block = dict(zip(blocks, combo))
        bits = {n: per_block[block(n)] for n in PARAMS if block(n) in per_block}
        size = size_of({**bits, "conv_in": 16, "conv_out": 16})
        if max_avg_bits is not None and size > max_avg_bits:
            continue
        points.append((quality_of(bits), size, per_block))
    keep = non_dominated([(q, s) for q, s, _ in points])
    return [points[i] for i in keep]
