"""A library of quantized layers: each layer calibrated once per candidate spec, trials assembled from it.

A mixed-precision trial with a calibrated quantizer (BRECQ, EDA-DM's FBR, GPTQ) costs a full
calibration, minutes with block reconstruction, although a search space has only a few distinct
layer specs (bits x group size: 8 in ``spaces/ddpm-cifar10.yaml``). The library runs the base recipe
once per distinct spec with *every* layer at that spec, keeps the quantized models, and builds each
trial by taking every layer from the uniform model of its own spec: the first trial that uses a spec
pays one calibration, every later trial only a model copy.

Layers whose spec every configuration shares (``library_pinned``: the first and last layers a search
space pins at 8 bits) stay at that spec in every entry and are taken from the trial's base entry, so
the uniform W4 trial of a pinned study is the W4 recipe with those overrides, calibrated as such.

The approximation is the usual one of per-layer mixed-precision methods (HAWQ's and BitsFusion's
per-layer independence): a layer's rounding and activation ranges were learned with the layers
before it at *its* spec, not at the trial's mix. Layers a trial keeps in full precision are copied
from the FP model. Error correctors are refused: PTQD and the like measure the error of the model
they correct, which the assembled model is not. Each entry holds one quantized model copy.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from typing import TYPE_CHECKING

from qsearch.models import Denoiser
from qsearch.quant.spec import FULL_PRECISION, QuantSpec
from qsearch.recipe import RecipeBase, parse_recipe, stage_instances
from qsearch.seeding import seed_everything
from qsearch.stages import QuantContext

if TYPE_CHECKING:
    from qsearch.engine import Session


def uniform_recipe(recipe: RecipeBase, spec: QuantSpec) -> RecipeBase:
    """``recipe`` with every layer at ``spec`` but the pinned ones (other overrides dropped, ``keep_fp`` kept)."""
    data = recipe.model_dump(mode="json", exclude={"overrides"})
    data["quant"] = spec.model_dump(mode="json")
    # a pinned override resolved against the recipe's default, not the entry's: the same spec in every entry
    default, overrides = recipe.quant.model_dump(mode="json"), recipe.layer_plan().overrides
    data["overrides"] = {p: {**default, **overrides[p]} for p in recipe.library_pinned}
    data["layer_library"] = False
    return parse_recipe(data, source=f"{recipe.name or 'recipe'} (uniform library entry)")


def library_key(recipe: RecipeBase) -> str:
    """What a library entry depends on: everything of the uniform recipe but its name and evaluation."""
    return recipe.model_dump_json(exclude={"name", "eval"})


class LayerLibrary:
    """Quantized layers by (uniform recipe, layer name), built on demand by a ``Session``."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._entries: dict[str, QuantContext] = {}
        self.builds = 0

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, recipe: RecipeBase, spec: QuantSpec) -> QuantContext:
        """The context of ``recipe`` applied uniformly at ``spec`` (calibrated on first use)."""
        uniform = uniform_recipe(recipe, spec)
        key = library_key(uniform)
        if key not in self._entries:
            # seeded by the recipe alone, so that an entry is the same whichever trial builds it first
            seed_everything(uniform.eval.seed)
            ctx = self.session.quantize(uniform)
            ctx.calibration = None  # the layers are what the library keeps, not their inputs
            self._entries[key] = ctx
            self.builds += 1
        return self._entries[key]

    def quantize(self, recipe: RecipeBase) -> QuantContext:
        """The trial's model: each quantized layer copied from the uniform entry of its own spec.

        Pinned layers come from the base entry (the spec most layers use): they were calibrated
        there with the rest of the model at that spec, as in the uniform recipe.
        """
        if any(stage.kind == "correct" for stage in stage_instances(recipe)):
            raise ValueError(
                "the layer library cannot assemble error correctors (they measure the error of the model "
                "they correct): remove the corrector stage or set `layer_library: false`"
            )
        started = time.perf_counter()
        fp_model = self.session.loaded.denoiser
        plan = recipe.layer_plan()
        specs = plan.resolve(fp_model)
        pinned = {name for name in specs if plan.pattern_for(name) in recipe.library_pinned}
        quantized = {name: spec for name, spec in specs.items() if spec != FULL_PRECISION and name not in pinned}
        if not quantized:
            raise ValueError("the layer library needs at least one quantized layer that is not pinned")
        builds_before = self.builds
        # one library lookup per distinct spec, not per layer
        keys = {name: spec.model_dump_json() for name, spec in quantized.items()}
        distinct = {key: quantized[name] for name, key in keys.items()}  # equal keys, equal specs
        by_spec = {key: self.entry(recipe, spec) for key, spec in distinct.items()}
        entries = {name: by_spec[key] for name, key in keys.items()}
        # the most used entry is copied whole; the other layers are swapped in from their own entries
        base = by_spec[Counter(keys.values()).most_common(1)[0][0]]
        model = copy.deepcopy(base.model)
        for name in specs:
            source = base.model if name in pinned else entries[name].model if name in entries else fp_model
            if source is not base.model:
                model.set_submodule(name, copy.deepcopy(source.get_submodule(name)).to(base.device))
        ctx = QuantContext(
            denoiser=Denoiser(model), fp_denoiser=base.fp_denoiser, sampler=base.sampler,
            trajectory=base.trajectory, specs=specs, seed=base.seed, batch_size=base.batch_size,
        )
        seconds = time.perf_counter() - started
        ctx.state["layer_library"] = {"entries": len(self), "built_now": self.builds - builds_before}
        ctx.state["stage_seconds"] = {"layer_library": seconds}
        ctx.model.eval().requires_grad_(False)
        return ctx


__all__ = ["LayerLibrary", "library_key", "uniform_recipe"]
