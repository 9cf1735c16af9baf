"""Schema versions: a v1 database upgrades in place at open, beside Optuna's own tables."""

from __future__ import annotations

import json

import optuna
import sqlalchemy as sa

from qsearch.storage.db import ResultsDB, current_revision, head_revision, make_engine, upgrade
from qsearch.storage.schema import VERSION_TABLE


def _v1_database(url: str) -> None:
    """A studies.db as qsearch schema v1 wrote it: timings were metrics of fidelity 'timing'."""
    engine = make_engine(url)
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO qsearch_studies (id, name, spec_yaml, spec_json, created_at) "
            "VALUES (1, 'old', 'name: old', :spec, '2025-01-01 00:00:00')"), {"spec": json.dumps({"name": "old"})})
        conn.execute(sa.text(
            "INSERT INTO qsearch_trials (id, study_id, number, state, recipe_json) "
            "VALUES (1, 1, 0, 'COMPLETE', :recipe)"), {"recipe": json.dumps({"model": "m"})})
        conn.execute(sa.text(
            "INSERT INTO qsearch_metrics (trial_id, fidelity, name, value) VALUES "
            "(1, 'full', 'fid', 12.5), (1, 'timing', 'full_seconds', 3.0)"))
    engine.dispose()


def test_v1_database_upgrades_at_open(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    _v1_database(url)
    assert current_revision(make_engine(url)) == "0001"

    db = ResultsDB(url)  # opening migrates
    assert current_revision(db.engine) == head_revision() == "0002"
    tables = sa.inspect(db.engine).get_table_names()
    assert {"qsearch_timings", "qsearch_fronts", "qsearch_front_points"} <= set(tables)
    with db.engine.connect() as conn:
        metrics = conn.execute(sa.text("SELECT fidelity, name, value FROM qsearch_metrics")).all()
        timings = conn.execute(sa.text("SELECT trial_id, name, seconds FROM qsearch_timings")).all()
        seeded = conn.execute(sa.text("SELECT seeded_at FROM qsearch_studies")).scalar()
    assert metrics == [("full", "fid", 12.5)]  # the v1 data is kept, timings moved out of metrics
    assert timings == [(1, "full_seconds", 3.0)]
    assert seeded is None

    from qsearch.storage import trial_info, trial_recipe

    assert trial_recipe(url, "old", 0) == {"model": "m"}
    assert trial_info(url, "old", 0)["timings"] == {"full_seconds": 3.0}
    ResultsDB(url)  # opening an up-to-date database again is a no-op
    assert current_revision(db.engine) == "0002"


def test_optuna_tables_and_ours_share_a_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(study_name="plain", storage=url)
    ResultsDB(url)
    tables = set(sa.inspect(make_engine(url)).get_table_names())
    assert {"alembic_version", VERSION_TABLE, "studies", "trials", "qsearch_studies"} <= tables
    # each version table holds its own project's revision
    with make_engine(url).connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == "0002"
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() != "0002"
    assert optuna.load_study(study_name="plain", storage=url).study_name == "plain"
