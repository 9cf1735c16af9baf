"""A real study on a tiny U-Net: one session for all trials, stored recipes that reproduce the trials."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from qsearch.engine import Session
from qsearch.recipe import parse_recipe
from qsearch.search.evaluate import SessionEvaluator
from qsearch.search.space import parse_space
from qsearch.search.study import open_study, run_trials
from qsearch.storage import pareto_front, trial_info, trial_recipe


def _space(model_dir, **changes):
    base = {
        "model": str(model_dir),
        "sampler": {"scheduler": "ddim", "steps": 3},
        "quant": {"w_bits": 8, "a_bits": 8},
        "calibration_pool": {"samples": 2},
        "stages": [{"method": "uniform", "n_samples": 4}, {"method": "rtn"}],
        "eval": {"n_samples": 4, "batch_size": 4, "fid": False, "fidelity_samples": 4, "device": "cpu"},
    }
    data = {"name": "tiny", "base": base, "granularity": "block",
            "layers": {"*": {"w_bits": [2, 8]}}, "objectives": {"quality": "mse"},
            "population_size": 2, "trials": 4, "seed_trials": {"uniform": True}}
    data.update(changes)
    return parse_space(data)


def test_study_on_a_tiny_unet_reproduces_its_trials(tiny_model_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    space = _space(tiny_model_dir("unet2d"))
    session = Session(space.recipe())
    calls = {"trajectory": 0}
    original = session.sampler.trajectory

    def counting(*args, **kwargs):
        calls["trajectory"] += 1
        return original(*args, **kwargs)

    session.sampler.trajectory = counting
    study = open_study(space, url)
    run_trials(space, study, 4, session=session)
    assert calls["trajectory"] == 1  # the FP calibration pool is computed once for all trials
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    w2, w8 = (next(t for t in complete if t.user_attrs["qsearch:origin"] == f"uniform-w{b}") for b in (2, 8))
    assert w2.values[1] < w8.values[1] and w2.values[0] > w8.values[0]  # 2 bits: smaller and worse

    # the stored recipe rebuilds the trial's model: same bits, same samples, same MSE
    t = complete[-1]
    recipe = parse_recipe(trial_recipe(url, "tiny", t.number))
    ctx = session.quantize(recipe)
    metrics = session.evaluate(ctx, recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"fid": False})}))
    assert metrics["mse"] == pytest.approx(t.values[0], rel=1e-6)
    assert metrics["avg_weight_bits"] == pytest.approx(t.values[1])
    info = trial_info(url, "tiny", t.number)
    for name, layer in ctx.layers().items():
        assert info["layers"][name]["w_bits"] == layer.weight_quantizer.bits
    assert {p["number"] for p in pareto_front(url, "tiny")} == {x.number for x in study.best_trials}


def test_size_before_calibration_equals_the_calibrated_model(tiny_model_dir):
    space = _space(tiny_model_dir("dit"), layers={"*": {"w_bits": [3, 4], "group_size": ["channel", 16]}})
    session = Session(space.recipe())
    evaluator = SessionEvaluator(session, space)
    from qsearch.search.space import build_recipe, default_params, layer_groups

    groups = layer_groups(space, list(evaluator.layer_params()))
    params = default_params(space, groups, w_bits=3)
    params[groups[0].param("group_size")] = 16
    recipe = parse_recipe(build_recipe(space, groups, params))
    estimate = evaluator.size(recipe)
    from qsearch.quant.bits import bits_report

    measured = bits_report(session.quantize(recipe).model).as_dict()
    assert estimate == measured


def test_a_layer_library_study_stores_recipes_that_rebuild_its_trials(tiny_model_dir, tmp_path):
    """With ``layer_library: true`` trials share uniform calibrations; a stored trial recipe, quantized
    in a fresh session (as ``qsearch export`` does), gives the model the study measured."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    model_dir = tiny_model_dir("unet2d")
    space = _space(model_dir)
    base = {**space.base, "layer_library": True,
            "stages": [{"method": "uniform", "n_samples": 4}, {"method": "mse_clip"}]}
    space = _space(model_dir, base=base, trials=3)
    session = Session(space.recipe())
    study = open_study(space, url)
    run_trials(space, study, 3, session=session)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert session.library.builds == 2  # W2A8 and W8A8, however many trials mix them
    t = next(t for t in complete if "uniform" not in t.user_attrs["qsearch:origin"])
    recipe = parse_recipe(trial_recipe(url, "tiny", t.number))
    assert recipe.layer_library
    fresh = Session(recipe)
    metrics = fresh.evaluate(fresh.quantize(recipe), recipe.model_copy(
        update={"eval": recipe.eval.model_copy(update={"fid": False})}))
    assert metrics["mse"] == pytest.approx(t.values[0], rel=1e-6)
