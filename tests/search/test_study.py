"""The study driver on a synthetic objective with a known front (no model is loaded)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from tests.search.synthetic import PARAMS, SyntheticEvaluator, block, quality_of, size_of, space_data, true_front

from qsearch.search.space import parse_space
from qsearch.search.study import (
    ORIGIN,
    PROXY,
    PRUNED_BY,
    RETRY_OF,
    open_study,
    run_trials,
    study_status,
)
from qsearch.storage import pareto_front, trial_metrics, trial_recipe, trials


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'studies.db'}"


def _run(space_dict, url, n, evaluator=None):
    space = parse_space(space_dict)
    study = open_study(space, url)
    evaluator = evaluator or SyntheticEvaluator()
    run_trials(space, study, n, evaluator=evaluator)
    return space, study, evaluator


def _block_bits(trial) -> tuple[int, int, int]:
    return tuple(trial.params[f"w_bits:{b}"] for b in ("down_blocks.0", "mid_block", "up_blocks.0"))


def test_finds_the_known_optimum_under_a_budget(url):
    budget = 4.5
    space, study, _ = _run(space_data(constraints={"max_avg_weight_bits": budget}), url, 24)
    best_q, _, best_bits = min(true_front(budget), key=lambda p: p[0])
    front = study.best_trials
    assert min(t.values[0] for t in front) == pytest.approx(best_q)
    winner = min(front, key=lambda t: t.values[0])
    assert _block_bits(winner) == tuple(best_bits[b] for b in ("down_blocks.0", "mid_block", "up_blocks.0"))
    assert all(t.values[1] <= budget for t in front)


def test_stored_front_equals_best_trials_and_excludes_violations(url):
    space, study, ev = _run(space_data(constraints={"max_avg_weight_bits": 5.0}), url, 16)
    best = sorted((t.number, t.values[0], t.values[1]) for t in study.best_trials)
    stored = sorted((r["number"], r["fid"], r["avg_weight_bits"]) for r in pareto_front(url, "synthetic"))
    assert stored == best and stored
    by_number = {t.number: t for t in study.trials}
    # the uniform 8-bit baseline is measured (enqueued baselines always are) but over budget
    w8 = next(t for t in study.trials if t.user_attrs.get(ORIGIN) == "uniform-w8")
    assert w8.state == TrialState.COMPLETE and w8.constraints["avg_weight_bits"] > 0
    rows = {r["number"]: r for r in trials(url, "synthetic")}
    assert not rows[w8.number]["feasible"] and rows[w8.number]["metrics"]["constraint"]["avg_weight_bits"] > 0
    assert all(rows[n]["feasible"] for n, _, _ in stored)
    for number, _, size in stored:
        assert size <= 5.0 and all(v <= 0 for v in by_number[number].constraints.values())
    # sampled configurations over budget are pruned before any calibration
    infeasible = [t for t in study.trials if t.user_attrs.get(PRUNED_BY) == "infeasible"]
    assert all(t.state == TrialState.PRUNED and t.constraints["avg_weight_bits"] > 0 for t in infeasible)
    assert ev.calls["quantize"] == sum(t.state != TrialState.PRUNED or PROXY in t.user_attrs for t in study.trials)


def test_uniform_and_sensitivity_trials_come_first(url):
    data = space_data(seed_trials={"uniform": True, "sensitivity_targets": [3.0]})
    space, study, ev = _run(data, url, 5)
    origins = [t.user_attrs[ORIGIN] for t in sorted(study.trials, key=lambda t: t.number)]
    assert origins[:4] == ["uniform-w2", "uniform-w4", "uniform-w8", "sensitivity-3"]
    assert all(_block_bits(t) == (b, b, b) for t, b in zip(sorted(study.trials, key=lambda t: t.number), (2, 4, 8)))
    seeded = next(t for t in study.trials if t.user_attrs[ORIGIN] == "sensitivity-3")
    # the most sensitive block per parameter (mid_block) gets the most bits, within the budget
    down, mid, up = _block_bits(seeded)
    assert mid >= down and mid >= up
    assert ev.calls["sensitivity"] == 1
    # a second process (or a resume) does not enqueue them again
    run_trials(space, study, 8, evaluator=ev)
    assert sum(t.user_attrs[ORIGIN].startswith("uniform") for t in study.trials) == 3
    assert ev.calls["sensitivity"] == 1


def test_sensitivity_neighbours_are_one_or_two_choice_steps_from_their_seed(url):
    data = space_data(seed_trials={"uniform": False, "sensitivity_targets": [4.0], "sensitivity_neighbours": 4})
    space, study, _ = _run(data, url, 5)
    by_origin = {t.user_attrs[ORIGIN]: t for t in study.trials}
    assert sorted(by_origin) == ["sensitivity-4", *(f"sensitivity-4-n{k}" for k in range(4))]
    choices = [2, 4, 8]
    seed = _block_bits(by_origin["sensitivity-4"])
    for k in range(4):
        variant = _block_bits(by_origin[f"sensitivity-4-n{k}"])
        moved = [(a, b) for a, b in zip(seed, variant) if a != b]
        assert 1 <= len(moved) <= 2  # a neighbour, not a random configuration
        assert all(abs(choices.index(a) - choices.index(b)) == 1 for a, b in moved)
    # reproducible: the same space enqueues the same neighbours
    _, again, _ = _run(data, url.replace("studies.db", "again.db"), 5)
    assert sorted(_block_bits(t) for t in again.trials) == sorted(_block_bits(t) for t in study.trials)


@pytest.mark.parametrize("mid", [{"w_bits": [8]}, {"group_size": ["channel", 64]}], ids=["one-choice", "width-not-searched"])
def test_pinned_groups_keep_their_width_in_the_seeded_trials(url, mid):
    """A group that does not search its width (one choice: the papers' 8-bit first/last layers; or a
    pattern without w_bits, at the base recipe's 8) keeps it in the uniform baselines and the
    sensitivity seeds, and the seeds' target counts its bits."""
    data = space_data(layers={"mid_block*": mid, "*": {"w_bits": [2, 4, 8]}},
                      seed_trials={"uniform": True, "sensitivity_targets": [4.0], "sensitivity_neighbours": 3})
    _, study, _ = _run(data, url, 8)
    by_origin = {t.user_attrs[ORIGIN]: t for t in study.trials}

    def block_bits(t) -> tuple[int, int, int]:  # the mid block's width is the base's 8 where not a parameter
        return tuple(t.params.get(f"w_bits:{b}", 8) for b in ("down_blocks.0", "mid_block", "up_blocks.0"))

    for b in (2, 4, 8):
        assert block_bits(by_origin[f"uniform-w{b}"]) == (b, 8, b)
    seeded = [t for origin, t in by_origin.items() if origin.startswith("sensitivity-4")]
    assert len(seeded) >= 2 and all(block_bits(t)[1] == 8 for t in seeded)  # (duplicates are skipped)
    per_block = dict(zip(("down_blocks.0", "mid_block", "up_blocks.0"), block_bits(by_origin["sensitivity-4"])))
    grouped = {n: p for n, p in PARAMS.items() if block(n) in per_block}
    avg = sum(p * per_block[block(n)] for n, p in grouped.items()) / sum(grouped.values())
    assert 3.0 < avg <= 4.0  # the pinned 8 bits are inside the target, not on top of it


def test_multi_fidelity_prunes_only_dominated_trials(url):
    data = space_data(fidelity={"enabled": True, "proxy": "mse", "margin": 0.1}, trials=24)
    space, study, ev = _run(data, url, 24)
    status = study_status(study, 24)
    pruned = [t for t in study.trials if t.user_attrs.get(PRUNED_BY, "").startswith("proxy-dominated")]
    assert status.full_evaluations_saved == len(pruned) > 0
    assert ev.calls["full"] == status.complete == 24 - len(pruned) - status.pruned_infeasible
    by_number = {t.number: t for t in study.trials}
    true = {(round(q, 12)) for q, _, _ in true_front()}
    for t in pruned:
        assert PROXY in t.user_attrs  # the proxy value is kept
        dominator = by_number[int(t.user_attrs[PRUNED_BY].rsplit(" ", 1)[1])]
        assert dominator.state == TrialState.COMPLETE
        # the pruned configuration really is dominated (the proxy's noise is below the margin)
        bits = {n: t.params[f"w_bits:{block(n)}"] for n in PARAMS if f"w_bits:{block(n)}" in t.params}
        assert quality_of(bits) > dominator.values[0] and round(quality_of(bits), 12) not in true
        assert size_of({**bits, "conv_in": 16, "conv_out": 16}) >= dominator.values[1]
    stored = {r["number"]: r for r in trials(url, "synthetic")}
    assert all(stored[t.number]["state"] == "PRUNED" and "mse" in stored[t.number]["metrics"]["proxy"] for t in pruned)


def test_failing_configuration_is_recorded_and_the_study_goes_on(url):
    ev = SyntheticEvaluator(fail_on={"mid_block.*": 2})
    space, study, _ = _run(space_data(), url, 12, evaluator=ev)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all("NonFiniteError" in t.user_attrs["qsearch:error"] for t in failed)
    assert all(t.params["w_bits:mid_block"] == 2 for t in failed)
    assert study_status(study, 12).finished == 12
    assert "NonFiniteError" in next(r for r in trials(url, "synthetic") if r["state"] == "FAIL")["error"]


def test_resume_after_interrupt_loses_and_duplicates_nothing(url):
    space = parse_space(space_data())
    study = open_study(space, url)
    ev = SyntheticEvaluator(interrupt_at_call=6)
    with pytest.raises(KeyboardInterrupt):
        run_trials(space, study, 10, evaluator=ev)
    before = {t.number: (t.state, t.values, t.params) for t in study.trials if t.state.is_finished()}
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and interrupted[0].user_attrs["qsearch:error"] == "interrupted"
    assert not any(t.state == TrialState.RUNNING for t in study.trials)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 5

    # a new process: a new study object on the same database
    study2 = open_study(space, url)
    run_trials(space, study2, 10, evaluator=SyntheticEvaluator())
    after = {t.number: t for t in study2.trials}
    for number, (state, values, params) in before.items():  # nothing lost or changed
        assert after[number].state == state and after[number].values == values and after[number].params == params
    retry = [t for t in study2.trials if t.user_attrs.get(RETRY_OF) == interrupted[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == interrupted[0].params
    counted = [t for t in study2.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 10 and study_status(study2, 10).finished == 10
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in study2.trials)
    # the database has one row per trial, and every finished trial's recipe
    rows = trials(url, "synthetic")
    assert sorted(r["number"] for r in rows) == sorted(after)
    # running again with the same target runs nothing more
    run_trials(space, study2, 10, evaluator=SyntheticEvaluator())
    assert len(study2.trials) == len(after)


def test_plain_optuna_reads_the_database(url):
    space, study, _ = _run(space_data(), url, 6)
    loaded = optuna.load_study(study_name="synthetic", storage=url)
    assert loaded.metric_names == ["fid", "avg_weight_bits"]
    assert [t.values for t in loaded.trials] == [t.values for t in study.trials]
    assert len(loaded.best_trials) >= 1


def _wsgi_get(app, path: str) -> tuple[str, dict]:
    """GET ``path`` from a WSGI app in this process (no server): status line and parsed JSON."""
    import io
    import json
    from wsgiref.util import setup_testing_defaults

    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], json.loads(body)


def test_optuna_dashboard_reads_the_database(url):
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    space, study, _ = _run(space_data(constraints={"max_avg_weight_bits": 5.0}), url, 8)
    app = optuna_dashboard.wsgi(url)  # the dashboard's own app on the storage URL qsearch wrote
    status, studies = _wsgi_get(app, "/api/studies")
    assert status.startswith("200")
    (summary,) = studies["study_summaries"]
    assert summary["study_name"] == "synthetic"
    status, detail = _wsgi_get(app, f"/api/studies/{summary['study_id']}")
    assert status.startswith("200") and len(detail["trials"]) == len(study.trials)
    assert detail["objective_names"] == ["fid", "avg_weight_bits"]
    # the dashboard's Pareto front ignores constraints: it is Optuna's best_trials plus the
    # over-budget trials that nothing feasible dominates (here the uniform W8 baseline)
    dashboard_front = {t["number"] for t in detail["best_trials"]}
    ours = {t.number for t in study.best_trials}
    assert ours < dashboard_front
    assert all(any(v > 0 for v in study.trials[n].constraints.values()) for n in dashboard_front - ours)
    by_number = {t["number"]: t for t in detail["trials"]}
    for t in study.trials:
        assert by_number[t.number]["state"] == t.state.name.capitalize()


def test_trial_recipe_and_metrics_roundtrip(url):
    from qsearch.recipe import parse_recipe

    space, study, _ = _run(space_data(), url, 4)
    t = study.best_trials[0]
    recipe = parse_recipe(trial_recipe(url, "synthetic", t.number))
    plan = recipe.layer_plan()
    assert plan.spec_for("mid_block.attentions.0.to_q").w_bits == t.params["w_bits:mid_block"]
    assert plan.spec_for("conv_in").w_bits is None  # keep_fp of the base recipe survives
    assert trial_metrics(url, "synthetic", t.number)["full"]["fid"] == pytest.approx(t.values[0])


def test_changed_space_under_the_same_name_is_refused(url):
    _run(space_data(), url, 2)
    with pytest.raises(ValueError, match="different search space"):
        open_study(parse_space(space_data(layers={"*": {"w_bits": [3, 4]}})), url)
    open_study(parse_space(space_data(trials=50)), url)  # the trial count may change


def test_trials_running_elsewhere_count_so_workers_never_exceed_the_target(url):
    from qsearch.search.study import _is_surplus

    space, study, ev = _run(space_data(seed_trials={"uniform": False}), url, 3)
    elsewhere = open_study(space, url).ask()  # another worker's trial, still running
    run_trials(space, study, 4, evaluator=ev)
    assert len(study.trials) == 4  # 3 finished + 1 running elsewhere: nothing new started
    late = study.ask()  # a worker that raced past the check is surplus, the earlier trial is not
    assert _is_surplus(study, late.number, 4) and not _is_surplus(study, elsewhere.number, 4)


def test_a_dead_workers_trial_is_failed_and_retried_once(url):
    import time

    space = parse_space(space_data(seed_trials={"uniform": False}))
    dead = open_study(space, url, heartbeat_interval=1, grace_period=2)
    trial = dead.ask({"w_bits:down_blocks.0": optuna.distributions.CategoricalDistribution([2, 4, 8])})
    dead._storage.record_heartbeat(trial._trial_id)  # it beat once, then its process died
    time.sleep(3)
    study = open_study(space, url, heartbeat_interval=1, grace_period=2)
    run_trials(space, study, 4, evaluator=SyntheticEvaluator())
    by_number = {t.number: t for t in study.trials}
    assert by_number[trial.number].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params["w_bits:down_blocks.0"] == trial.params["w_bits:down_blocks.0"]
    assert study_status(study, 4).finished == 4  # the failed-and-retried trial does not count
    assert sum(t.state.is_finished() for t in study.trials) == 5


class _DeclaredDeadMidway(SyntheticEvaluator):
    """Fails the running trial in storage during its first full evaluation, as another process's
    stale-trial check does when a live worker's heartbeat comes later than the grace period."""

    def __init__(self, study: optuna.Study) -> None:
        super().__init__()
        self.study = study

    def full(self, handle, recipe):
        if self.calls["full"] == 0:
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                self.study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        return super().full(handle, recipe)


def test_a_trial_declared_dead_while_it_runs_does_not_stop_its_worker(url):
    space = parse_space(space_data(seed_trials={"uniform": False}))
    study = open_study(space, url)
    run_trials(space, study, 3, evaluator=_DeclaredDeadMidway(study))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 2


def test_descent_moves_one_group_down_from_the_front_point_above_the_target(url):
    """Greedy local search under the budget: from a front point above 4 bits, one group one choice
    down, only the moves that land at or under 4 bits; it reaches the best configuration there."""
    target = 4.0
    data = space_data(seed_trials={"uniform": True, "sensitivity_targets": [target], "descent_rounds": 3},
                      trials=12)
    _, study, _ = _run(data, url, 12)
    by_number = {t.number: t for t in study.trials}
    descents = [t for t in study.trials if str(t.user_attrs[ORIGIN]).startswith(f"descent-{target:g}-r")]
    assert descents
    choices = [2, 4, 8]
    for t in descents:
        source = by_number[t.user_attrs["qsearch:descent_from"]]
        moved = [(a, b) for a, b in zip(_block_bits(source), _block_bits(t)) if a != b]
        assert len(moved) == 1 and choices.index(moved[0][0]) - choices.index(moved[0][1]) == 1
        assert source.values[1] > target >= t.values[1]  # from above the budget to under it
    best_q = min(q for q, s, _ in true_front(target))
    under = [t for t in study.trials if t.state == TrialState.COMPLETE and t.values[1] <= target]
    winner = min(under, key=lambda t: t.values[0])
    assert winner.values[0] == pytest.approx(best_q)
    assert winner.user_attrs[ORIGIN] != "sampler"  # found by the seeds and their descent


def test_no_descent_without_rounds(url):
    data = space_data(seed_trials={"uniform": True, "sensitivity_targets": [4.0]}, trials=12)
    _, study, _ = _run(data, url, 12)
    assert not any(str(t.user_attrs[ORIGIN]).startswith("descent") for t in study.trials)
