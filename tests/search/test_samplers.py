"""``qsearch.search.samplers``: the space's sampler with its own options, checked at validation."""

from __future__ import annotations

import optuna
import pytest

from qsearch.recipe import RecipeError
from qsearch.search.samplers import make_sampler
from qsearch.search.space import parse_space
from qsearch.search.study import make_sampler as space_sampler
from tests.search.synthetic import space_data

CHOICES = [2, 3, 4, 8]
BLOCKS = 6


def _nsga2_children_of(options: dict) -> tuple[list[tuple], list[tuple]]:
    """Params of NSGA-II's first generation and of the trials it proposes after it."""
    sampler = make_sampler("nsga2", seed=3, population_size=8, options=options)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        bits = [trial.suggest_categorical(f"b{i}", CHOICES) for i in range(BLOCKS)]
        return sum((i + 1) * 4.0 ** -b for i, b in enumerate(bits)), sum(bits) / BLOCKS

    study.optimize(objective, n_trials=24)
    params = [tuple(t.params[f"b{i}"] for i in range(BLOCKS)) for t in study.trials]
    return params[:8], params[8:]


def test_options_reach_the_sampler() -> None:
    """Without crossover and mutation every child is a copy of a parent; Optuna's defaults mix them."""
    first, later = _nsga2_children_of({"crossover_prob": 0.0, "mutation_prob": 0.0})
    assert set(later) <= set(first)
    first, later = _nsga2_children_of({})
    assert not set(later) <= set(first)


def test_space_options_are_passed() -> None:
    space = parse_space(space_data(sampler="tpe", sampler_options={"n_startup_trials": 3}))
    assert isinstance(space_sampler(space), optuna.samplers.TPESampler)
    assert space.sampler_options == {"n_startup_trials": 3}


@pytest.mark.parametrize(
    ("sampler", "options", "message"),
    [("nsga2", {"crossover": "uniform"}, r"sampler_options\.crossover: not an option of NSGAIISampler"),
     ("nsga2", {"crossover_prob": 1.5}, r"sampler_options: NSGAIISampler refuses .*crossover_prob"),
     ("nsga2", {"seed": 1}, r"sampler_options\.seed: set by qsearch"),
     ("tpe", {"mutation_prob": 0.1}, r"sampler_options\.mutation_prob: not an option of TPESampler"),
     ("random", {"n_startup_trials": 1}, r"sampler_options\.n_startup_trials: not an option of RandomSampler")],
)
def test_wrong_options_are_errors_that_name_them(sampler, options, message) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_space(space_data(sampler=sampler, sampler_options=options))
