"""Sharing the study database between processes: URLs every worker resolves alike, retries, stale trials."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError
from tests.search.synthetic import SyntheticEvaluator, space_data

from qsearch.distributed.storage import RunningTrialWatch, shared_url, with_retries
from qsearch.search.space import parse_space
from qsearch.search.study import open_study, run_trials, study_status


def test_relative_sqlite_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shared_url("sqlite:///studies.db") == f"sqlite:///{tmp_path / 'studies.db'}"
    assert shared_url(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"
    url = "postgresql://user:secret@db:5432/qsearch"
    assert shared_url(url, multi_host=True) == url  # a server URL is left alone, password included
    with pytest.raises(ValueError, match="in-memory"):
        shared_url("sqlite://")
    with pytest.warns(UserWarning, match="network file systems"):
        shared_url("sqlite:///studies.db", multi_host=True)


def test_transient_errors_are_retried_and_others_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return "ok"

    assert with_retries(flaky, backoff_s=0.01) == "ok" and len(calls) == 3

    def broken():
        raise OperationalError("SELECT", {}, Exception("no such table: trials"))

    with pytest.raises(OperationalError, match="no such table"):
        with_retries(broken, backoff_s=0.01)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_that_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path):
    """Killed between ``ask`` and its heartbeat thread: Optuna alone would leave it RUNNING forever."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    space = parse_space(space_data(seed_trials={"uniform": False}))
    study = open_study(space, url, heartbeat_interval=1, grace_period=1)
    orphan = study.ask({"w_bits:mid_block": optuna.distributions.CategoricalDistribution([2, 4, 8])})
    time.sleep(2.2)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[orphan.number].state == TrialState.RUNNING  # no heartbeat record: never stale

    RunningTrialWatch()(study)  # the driver's sweep gives it one beat ...
    time.sleep(2.2)  # ... which nobody renews
    run_trials(space, study, 3, evaluator=SyntheticEvaluator())
    by_number = {t.number: t for t in study.trials}
    assert by_number[orphan.number].state == TrialState.FAIL
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].params["w_bits:mid_block"] == orphan.params["w_bits:mid_block"]
    assert study_status(study, 3).finished == 3
