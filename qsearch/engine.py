"""The engine: apply a recipe to a model and measure the result.

``Session`` holds what every recipe on the same model shares and is costly to recompute: the FP
model, its sampling trajectories (the calibration pool) and its samples on the fidelity seeds. A
search study keeps one session for all its trials; ``qsearch quantize`` uses one for one recipe.

``Session.quantize`` runs the recipe's stages on a copy of the FP model; ``Session.evaluate`` samples
with fixed seeds and computes FID, fidelity to the FP model and the bits of the model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from qsearch.library import LayerLibrary
from qsearch.models import Denoiser, LoadedModel, load_model
from qsearch.quant.apply import quantize_
from qsearch.quant.bits import bits_report
from qsearch.recipe import RecipeBase, stage_instances
from qsearch.registry import REGISTRY
from qsearch.sampling import Sampler, Trajectory
from qsearch.stages import KIND_ORDER, QuantContext

# Stages a recipe gets when it names none of that kind: without ranges a quantized layer is
# meaningless, and range calibration needs inputs.
DEFAULT_STAGES = {"calibration": "uniform", "quantize": "rtn"}


class NonFiniteError(RuntimeError):
    """The quantized model produced NaN or inf samples (e.g. a range that overflowed)."""


class Progress:
    """Progress reporting hooks; the CLI passes a rich implementation, the default is silent."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


@dataclass
class Result:
    """What ``qsearch quantize`` prints and a search trial stores."""

    metrics: dict[str, float]
    timings: dict[str, float]
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "timings": self.timings}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Session:
    """A loaded FP model with its cached trajectories and reference samples."""

    def __init__(self, recipe: RecipeBase, progress: Progress | None = None) -> None:
        self.base = recipe
        self.progress = progress or Progress()
        self.device = resolve_device(recipe.eval.device)
        self.loaded: LoadedModel = load_model(recipe.model, variant=recipe.variant)
        # fp16 variants (the bytes that travel) are computed in fp32; autocast is an eval option
        self.loaded.denoiser.to(self.device, torch.float32).eval().requires_grad_(False)
        if self.loaded.vae is not None:
            self.loaded.vae.to(self.device).eval()
        self.fp = Denoiser(self.loaded.denoiser)
        self.sampler = Sampler(self.loaded, recipe.sampler)
        self._trajectories: dict[tuple, Trajectory] = {}
        self._fp_samples: dict[tuple, torch.Tensor] = {}
        self.library = LayerLibrary(self)

    def check_compatible(self, recipe: RecipeBase) -> None:
        """A session serves recipes on its own model and sampler only."""
        for key in ("model", "variant", "sampler"):
            if getattr(recipe, key) != getattr(self.base, key):
                raise ValueError(f"recipe {key} differs from the session's; start a new session")

    def trajectory(self, samples: int, seed: int) -> Trajectory:
        """FP denoiser inputs at every step for the calibration pool (computed once)."""
        key = (samples, seed)
        if key not in self._trajectories:
            with self.progress.task("FP trajectories for calibration", samples) as advance:
                self._trajectories[key] = self.sampler.trajectory(
                    self.fp, samples, seed=seed, batch_size=self.base.eval.batch_size
                )
                advance(samples)
        return self._trajectories[key]

    def fp_samples(self, n: int, seed: int) -> torch.Tensor:
        """FP samples on seeds ``seed..seed+n-1`` (the fidelity reference, computed once)."""
        key = (n, seed, self.base.eval.autocast)
        if key not in self._fp_samples:
            with self.progress.task("FP reference samples", n) as advance:
                self._fp_samples[key] = self.sampler.sample(
                    self.fp, n, seed=seed, batch_size=self.base.eval.batch_size,
                    autocast=AUTOCAST[self.base.eval.autocast], progress=advance,
                )
        return self._fp_samples[key]

    def quantize(self, recipe: RecipeBase) -> QuantContext:
        """Apply the recipe's stages to a copy of the FP model; returns the finished context."""
        self.check_compatible(recipe)
        if recipe.layer_library:
            return self.library.quantize(recipe)
        model = copy.deepcopy(self.loaded.denoiser)
        plan = recipe.layer_plan()
        unmatched = plan.unmatched_patterns(model)
        if unmatched:
            raise ValueError(f"layer patterns match no layer of the model: {', '.join(unmatched)}")
        specs = plan.resolve(model)
        quantize_(model, specs)
        pool = recipe.calibration_pool
        ctx = QuantContext(
            denoiser=Denoiser(model), fp_denoiser=self.fp, sampler=self.sampler,
            trajectory=self.trajectory(pool.samples, pool.seed), specs=specs,
            seed=recipe.eval.seed, batch_size=recipe.eval.batch_size,
        )
        stages = stage_instances(recipe)
        kinds = {s.kind for s in stages}
        defaults = [REGISTRY.get(n)() for k, n in DEFAULT_STAGES.items() if k not in kinds]
        stages = sorted(defaults + stages, key=lambda s: KIND_ORDER.index(s.kind))
        for stage in stages:
            # reconstruction and QAT stages learn parameters: they need autograd whatever the caller's mode
            with self.progress.task(f"{stage.kind}: {stage.name}"), torch.enable_grad():
                started = time.perf_counter()
                stage.apply(ctx)
                ctx.state.setdefault("stage_seconds", {})[stage.name] = time.perf_counter() - started
        ctx.model.eval().requires_grad_(False)
        return ctx

    def evaluate(self, ctx: QuantContext | None, recipe: RecipeBase, n_samples: int | None = None) -> dict[str, float]:
        """FID, fidelity to the FP model and bits of a quantized context (``None``: the FP model)."""
        ev = recipe.eval
        n = n_samples or ev.n_samples
        denoiser = ctx.denoiser if ctx is not None else self.fp
        correctors = ctx.correctors if ctx is not None else []
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        with self.progress.task("sampling", n) as advance:
            samples = self.sampler.sample(
                denoiser, n, seed=ev.seed, batch_size=ev.batch_size, correctors=correctors,
                autocast=AUTOCAST[ev.autocast], progress=advance,
            )
        metrics["sample_seconds"] = time.perf_counter() - started
        if not torch.isfinite(samples).all():
            raise NonFiniteError(f"{int((~torch.isfinite(samples)).sum())} non-finite sample values")
        if ev.fidelity_samples:
            from qsearch.metrics.fidelity import fidelity

            k = min(ev.fidelity_samples, n)
            metrics.update(fidelity(samples[:k], self.fp_samples(k, ev.seed)))
        if ev.fid:
            from qsearch.metrics.fid import fid

            started = time.perf_counter()
            with self.progress.task("FID"):
                metrics["fid"] = fid(samples, extractor=ev.feature_extractor, reference=ev.reference,
                                     device=self.device)
            metrics["fid_seconds"] = time.perf_counter() - started
            if not math.isfinite(metrics["fid"]):
                raise NonFiniteError("FID is not finite")
        metrics.update(bits_report(denoiser.model).as_dict())
        metrics["n_samples"] = n
        return metrics

    def run(self, recipe: RecipeBase) -> Result:
        """Quantize and evaluate one recipe."""
        started = time.perf_counter()
        ctx = self.quantize(recipe)
        calib_seconds = time.perf_counter() - started
        metrics = self.evaluate(ctx, recipe)
        timings = {"calibrate_seconds": calib_seconds, **ctx.state.get("stage_seconds", {})}
        specs = {k: v.model_dump() for k, v in ctx.specs.items()}
        return Result(metrics, timings, specs)
