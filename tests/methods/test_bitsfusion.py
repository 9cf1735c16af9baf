"""BitsFusion mixed precision: one-layer sensitivity, budgeted monotone assignment, recipe overrides."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_recipe
from methods.bitsfusion import assign_bits, layer_sensitivity, mixed_precision_overrides, weight_params
from qsearch.calibration import CalibrationSet
from qsearch.engine import Session
from qsearch.models import Denoiser, load_model
from qsearch.quant import QuantSpec, WeightQuantizer
from qsearch.recipe import parse_recipe

CHOICES = [2, 3, 4, 8]


def _average(assignment: dict[str, int], params: dict[str, int]) -> float:
    return sum(params[n] * b for n, b in assignment.items()) / sum(params[n] for n in assignment)


def test_budget_respected_and_more_sensitive_layers_never_get_fewer_bits() -> None:
    g = torch.Generator().manual_seed(0)
    names = [f"layer{i}" for i in range(60)]
    params = {n: (1_000, 4_000, 16_000)[i % 3] for i, n in enumerate(names)}
    sens = dict(zip(names, torch.exp(3 * torch.randn(60, generator=g)).tolist()))
    for target in (2.0, 2.5, 3.0, 3.7, 8.0):
        bits = assign_bits(sens, params, CHOICES, target)
        assert set(bits.values()) <= set(CHOICES)
        avg = _average(bits, params)
        assert avg <= target + 1e-9
        for a in names:
            for b in names:
                if params[a] == params[b] and sens[a] > sens[b]:
                    assert bits[a] >= bits[b], (target, a, b)
        # nothing left that fits: no layer's next width costs less than the unused budget
        unused = (target - avg) * sum(params.values())
        for n in names:
            if bits[n] < CHOICES[-1]:
                step = CHOICES[CHOICES.index(bits[n]) + 1] - bits[n]
                assert params[n] * step > unused - 1e-6
    assert set(assign_bits(sens, params, CHOICES, 8.0).values()) == {8}
    with pytest.raises(ValueError):
        assign_bits(sens, params, CHOICES, 1.5)


def test_bits_go_where_sensitivity_per_parameter_is_highest() -> None:
    sens = {"small": 1.0, "large": 50.0}  # the large layer hurts more, but much less per parameter
    params = {"small": 100, "large": 10_000}
    bits = assign_bits(sens, params, [2, 4], target_avg_bits=2.05)
    assert bits == {"small": 4, "large": 2}


def test_sensitivity_is_each_layer_alone_at_low_bits(tiny_model_dir) -> None:
    recipe = parse_recipe(tiny_recipe(tiny_model_dir("dit")))
    session = Session(recipe)
    drops = layer_sensitivity(session, recipe, low_bits=2, n_samples=4)
    assert set(drops) == set(weight_params(session.fp.model))
    assert all(d > 0 for d in drops.values())

    # the drop of one layer is the model with only that layer's weights at 2 bits (min-max), vs FP
    name = "transformer_blocks.1.ff.net.2"
    model = copy.deepcopy(session.fp.model)
    layer = model.get_submodule(name)
    wq = WeightQuantizer(QuantSpec(w_bits=2), layer.weight.shape)
    wq.init_minmax(layer.weight)
    layer.weight.data = wq(layer.weight).detach()
    traj = session.trajectory(recipe.calibration_pool.samples, recipe.calibration_pool.seed)
    g = torch.Generator().manual_seed(0)
    x, t, cond = CalibrationSet.from_trajectory(
        traj, torch.randint(traj.num_steps, (4,), generator=g), torch.randint(traj.num_samples, (4,), generator=g)
    ).batches(4).__next__()
    expected = (Denoiser(model).forward(x, t, cond) - session.fp.forward(x, t, cond)).pow(2).mean().item()
    assert drops[name] == pytest.approx(expected, rel=1e-4)

    high = layer_sensitivity(session, recipe, low_bits=8, n_samples=4)
    assert all(high[n] < drops[n] for n in drops)
    samples = layer_sensitivity(session, recipe, low_bits=2, n_samples=2, measure="samples")
    assert set(samples) == set(drops) and all(v >= 0 for v in samples.values())


def test_overrides_turn_an_assignment_into_a_recipe(tiny_model_dir) -> None:
    base = tiny_recipe(tiny_model_dir("dit"), quant={"w_bits": 2, "a_bits": None})
    model = load_model(base["model"]).denoiser
    params = weight_params(model)
    sens = {n: float(i + 1) for i, n in enumerate(sorted(params))}
    bits = assign_bits(sens, params, CHOICES, 3.0)
    overrides = mixed_precision_overrides(bits, default_bits=2)
    assert all(v == {"w_bits": bits[n]} for n, v in overrides.items()) and len(overrides) < len(bits)
    specs = parse_recipe({**base, "overrides": overrides}).layer_plan().resolve(model)
    assert {n: s.w_bits for n, s in specs.items()} == bits
