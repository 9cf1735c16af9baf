"""How a trial's configuration is measured: size before anything runs, a cheap proxy, the full metric.

``SessionEvaluator`` measures with one ``qsearch.engine.Session`` per process, so the FP model, its
calibration trajectories and its reference samples are computed once and shared by every trial (the
session caches them). Tests and studies of synthetic objectives pass another ``Evaluator``.

The three levels, cheapest first:

* ``size``: bits and bytes from the per-layer specs alone, on a weight-less (meta-device) copy of the
  model: exact before calibration, so a configuration over budget is never calibrated;
* ``proxy``: samples on ``fidelity.proxy_samples`` seeds and their MSE to the FP samples of the same
  seeds (or FID on those few samples);
* ``full``: the study's quality objective with the base recipe's ``eval`` (FID on its samples).
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Protocol

from qsearch.engine import Session
from qsearch.quant.apply import quantizable_layers, quantize_
from qsearch.quant.bits import bits_report
from qsearch.recipe import RecipeBase
from qsearch.seeding import seed_everything
from qsearch.search.space import SearchSpace


class Evaluator(Protocol):
    """What a study needs to measure configurations."""

    def layer_params(self) -> dict[str, int]:
        """Weight elements of every Conv2d/Linear layer, by name, in module order."""

    def size(self, recipe: RecipeBase) -> dict[str, float]:
        """``avg_weight_bits``, ``model_mb``, ... of the configuration, before any calibration."""

    def layer_specs(self, recipe: RecipeBase) -> dict[str, dict[str, Any]]:
        """The resolved quantization of every layer (stored with the trial)."""

    def quantize(self, recipe: RecipeBase, seed: int) -> Any:
        """Apply the recipe; returns a handle for ``proxy``/``full`` (e.g. a ``QuantContext``)."""

    def proxy(self, handle: Any, recipe: RecipeBase) -> dict[str, float]:
        """Cheap metrics; must contain the space's ``fidelity.proxy`` name."""

    def full(self, handle: Any, recipe: RecipeBase) -> dict[str, float]:
        """Full metrics; must contain the quality and size objectives."""

    def sensitivity(self, recipe: RecipeBase, low_bits: int, n_samples: int) -> dict[str, float]:
        """Per-layer quality drop at ``low_bits`` (for the sensitivity-seeded trials)."""


_sessions: dict[tuple, Session] = {}
_sessions_lock = threading.Lock()


def session_for(space: SearchSpace, progress: Any = None) -> Session:
    """The process's session for the space's model and sampler (created once, then shared)."""
    recipe = space.recipe()
    key = (recipe.model, recipe.variant, recipe.sampler.model_dump_json(), recipe.eval.device)
    with _sessions_lock:
        if key not in _sessions:
            _sessions[key] = Session(recipe, progress)
        return _sessions[key]


def _with_eval(recipe: RecipeBase, **changes: Any) -> RecipeBase:
    return recipe.model_copy(update={"eval": recipe.eval.model_copy(update=changes)})


class SessionEvaluator:
    """Measures configurations with a shared ``Session`` (see the module docstring)."""

    def __init__(self, session: Session, space: SearchSpace) -> None:
        self.session = session
        self.space = space
        model = session.loaded.denoiser
        self._meta = copy.deepcopy(model).to("meta")
        self._params = {n: m.weight.numel() for n, m in quantizable_layers(model).items()}

    def layer_params(self) -> dict[str, int]:
        return dict(self._params)

    def size(self, recipe: RecipeBase) -> dict[str, float]:
        model = copy.deepcopy(self._meta)
        quantize_(model, recipe.layer_plan().resolve(model))
        return bits_report(model).as_dict()

    def layer_specs(self, recipe: RecipeBase) -> dict[str, dict[str, Any]]:
        specs = recipe.layer_plan().resolve(self._meta)
        return {name: spec.model_dump() for name, spec in specs.items()}

    def quantize(self, recipe: RecipeBase, seed: int) -> Any:
        seed_everything(seed)
        return self.session.quantize(recipe)

    def proxy(self, handle: Any, recipe: RecipeBase) -> dict[str, float]:
        f = self.space.fidelity
        n = f.proxy_samples
        proxy_recipe = _with_eval(recipe, n_samples=n, fid=f.proxy == "fid",
                                  fidelity_samples=n if f.proxy == "mse" else 0)
        return self.session.evaluate(handle, proxy_recipe)

    def full(self, handle: Any, recipe: RecipeBase) -> dict[str, float]:
        if self.space.objectives.quality == "mse":
            recipe = _with_eval(recipe, fid=False, fidelity_samples=recipe.eval.n_samples)
        else:
            recipe = _with_eval(recipe, fid=True)
        return self.session.evaluate(handle, recipe)

    def sensitivity(self, recipe: RecipeBase, low_bits: int, n_samples: int) -> dict[str, float]:
        from methods.bitsfusion import layer_sensitivity

        return layer_sensitivity(self.session, recipe, low_bits=low_bits, n_samples=n_samples)
