"""The Optuna samplers a space can name, and the keyword arguments it may pass to them.

A space picks a sampler by name (``sampler: nsga2``) and may tune it with ``sampler_options``, the
sampler's own keyword arguments (``crossover_prob``, ``mutation_prob`` for NSGA-II; ``n_startup_trials``
for TPE): Optuna's defaults suit continuous problems, while a per-block bit assignment is better
explored by mutating good assignments than by crossing two of them (BENCHMARKS, issue 6). The
options are checked when the space is validated, so a misspelt or out-of-range option is an error
that names it, not a failure at the first trial.
"""

from __future__ import annotations

import inspect
from typing import Any

import optuna

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "nsga2": optuna.samplers.NSGAIISampler,
    "nsga3": optuna.samplers.NSGAIIISampler,
    "tpe": optuna.samplers.TPESampler,
    "gp": optuna.samplers.GPSampler,
    "random": optuna.samplers.RandomSampler,
}
# what qsearch itself sets: the seed always, the generation size from ``population_size``, and
# TPE's joint model of the decisions (the bits of neighbouring blocks interact)
MANAGED = {"seed", "population_size"}
DEFAULTS: dict[str, dict[str, Any]] = {"tpe": {"multivariate": True}}


def _scalar_options(cls: type) -> set[str]:
    """The keyword arguments of ``cls`` that a YAML scalar can give (not callables or objects)."""
    params = inspect.signature(cls.__init__).parameters
    return {name for name, p in params.items()
            if p.kind == p.KEYWORD_ONLY and name not in MANAGED
            and not any(word in str(p.annotation) for word in ("Callable", "Base", "Sequence", "dict", "ndarray"))}


def check_sampler_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the option if ``name``'s sampler does not take ``options``."""
    cls = SAMPLERS[name]
    allowed = _scalar_options(cls)
    for key in options:
        if key in MANAGED:
            raise ValueError(f"sampler_options.{key}: set by qsearch (use the space's `{key}` field)")
        if key not in allowed:
            raise ValueError(f"sampler_options.{key}: not an option of {cls.__name__} "
                             f"(options: {', '.join(sorted(allowed))})")
    try:
        make_sampler(name, seed=0, population_size=2, options=options)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"sampler_options: {cls.__name__} refuses {options}: {exc}") from None


def make_sampler(name: str, *, seed: int, population_size: int,
                 options: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` with ``seed``, the generation size (NSGA-II/III) and ``options``."""
    cls = SAMPLERS[name]
    kwargs: dict[str, Any] = {**DEFAULTS.get(name, {}), **(options or {}), "seed": seed}
    if name in ("nsga2", "nsga3"):
        kwargs["population_size"] = population_size
    return cls(**kwargs)


__all__ = ["SAMPLERS", "check_sampler_options", "make_sampler"]
