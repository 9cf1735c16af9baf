"""Opening the results database: engine, migrations to the newest schema, and the writes of a study.

Any SQLAlchemy URL works (``sqlite:///studies.db`` by default, ``postgresql://...`` for studies
spread over hosts: SQLite's file locking is unsafe on network file systems). Opening runs the
alembic migrations in ``migrations/`` programmatically, so a database written by an older qsearch
opens without a manual step; concurrent openers race benignly (the loser finds the schema current).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from qsearch.storage.schema import (
    VERSION_TABLE,
    FrontPointRow,
    FrontRow,
    MetricRow,
    StudyRow,
    TimingRow,
    TrialRow,
    utcnow,
)

DEFAULT_URL = "sqlite:///studies.db"
MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_TIMEOUT_S = 60


def alembic_config() -> Config:
    """Alembic configuration of the project's migrations (no ini file needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    """The newest schema revision this qsearch knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision (``None``: no qsearch tables yet)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the qsearch tables to ``revision``; a concurrent process doing the same is tolerated."""
    cfg = alembic_config()
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except Exception:
        if revision != "head" or current_revision(engine) != head_revision():
            raise


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def tune_sqlite(engine: Engine) -> Engine:
    """Write-ahead log and ``synchronous=NORMAL`` on SQLite connections (a no-op on other databases).

    Why: in the default rollback-journal mode every commit is an fsync and readers block writers; a
    study commits several times per trial from several workers. WAL keeps every committed trial on a
    process crash or Ctrl-C (only an OS crash may drop the last commits) and never corrupts the file.
    Applied to Optuna's engine as well, so both share one journal mode. Existing pooled connections
    are dropped so that every connection gets the settings.
    """
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        event.listen(engine, "connect", _sqlite_pragmas)
        engine.dispose()
    return engine


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets a long busy timeout (several workers share one file)."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    return tune_sqlite(create_engine(url, **kwargs))


_lock = threading.Lock()


@functools.cache
def _open(url: str) -> "ResultsDB":
    return ResultsDB(url)


def open_db(url: str = DEFAULT_URL) -> "ResultsDB":
    """The results database at ``url``, migrated to the newest schema (one instance per URL)."""
    with _lock:
        return _open(url)


class ResultsDB:
    """The qsearch tables of one database: the writes a running study makes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        upgrade(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self.sessions.begin() as s:
            yield s

    # --- studies ----------------------------------------------------------------------------
    def record_study(self, name: str, optuna_study_id: int, spec_yaml: str, spec_json: dict[str, Any]) -> None:
        """Store the space of a new study (an existing row is kept: the first submission wins)."""
        try:
            with self.session() as s:
                row = s.scalar(select(StudyRow).where(StudyRow.name == name))
                if row is None:
                    s.add(StudyRow(name=name, optuna_study_id=optuna_study_id, spec_yaml=spec_yaml,
                                   spec_json=spec_json, created_at=utcnow()))
                elif row.optuna_study_id != optuna_study_id:  # the Optuna study was deleted and recreated
                    row.optuna_study_id, row.spec_yaml, row.spec_json = optuna_study_id, spec_yaml, spec_json
                    row.seeded_at = None
        except IntegrityError:  # another process inserted it first: theirs is the same study
            pass

    def study_spec(self, name: str) -> dict[str, Any] | None:
        """The stored space of a study (parsed JSON), or ``None``."""
        with self.session() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            return None if row is None else row.spec_json

    def claim_seeding(self, name: str) -> bool:
        """True for exactly one caller per study: the process that enqueues the first trials."""
        with self.session() as s:
            result = s.execute(update(StudyRow).where(StudyRow.name == name, StudyRow.seeded_at.is_(None))
                               .values(seeded_at=utcnow()))
            return result.rowcount == 1

    def _study_id(self, s: Session, name: str) -> int:
        sid = s.scalar(select(StudyRow.id).where(StudyRow.name == name))
        if sid is None:
            raise LookupError(f"no study named {name!r} in {self.url}")
        return sid

    # --- trials -----------------------------------------------------------------------------
    def record_trial(
        self,
        study: str,
        number: int,
        *,
        state: str,
        optuna_trial_id: int | None = None,
        origin: str | None = None,
        seed: int | None = None,
        params: dict[str, Any] | None = None,
        recipe: dict[str, Any] | None = None,
        layers: dict[str, Any] | None = None,
        error: str | None = None,
        metrics: dict[str, dict[str, float]] | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        """Insert or update a trial's row; ``metrics`` maps a fidelity (proxy/full) to its values."""
        with self.session() as s:
            sid = self._study_id(s, study)
            row = s.scalar(select(TrialRow).where(TrialRow.study_id == sid, TrialRow.number == number))
            if row is None:
                row = TrialRow(study_id=sid, number=number, state=state, started_at=utcnow())
                s.add(row)
            row.state = state
            for key, value in (("optuna_trial_id", optuna_trial_id), ("origin", origin), ("seed", seed),
                               ("params_json", params), ("recipe_json", recipe), ("layers_json", layers),
                               ("error", error)):
                if value is not None:
                    setattr(row, key, value)
            if state not in ("RUNNING", "WAITING"):
                row.finished_at = utcnow()
            s.flush()
            for fidelity, values in (metrics or {}).items():
                existing = {(m.fidelity, m.name): m for m in row.metrics}
                for name, value in values.items():
                    value = float(value) if value is not None and math.isfinite(float(value)) else None
                    if (fidelity, name) in existing:
                        existing[(fidelity, name)].value = value
                    else:
                        row.metrics.append(MetricRow(fidelity=fidelity, name=name, value=value))
            existing_t = {t.name: t for t in row.timings}
            for name, seconds in (timings or {}).items():
                if name in existing_t:
                    existing_t[name].seconds = float(seconds)
                else:
                    row.timings.append(TimingRow(name=name, seconds=float(seconds)))

    def sync_states(self, study: str, states: dict[int, str]) -> None:
        """Mark rows still RUNNING whose Optuna trial has finished (a worker killed mid-trial, whose
        trial the heartbeat failed) with Optuna's state."""
        with self.session() as s:
            sid = self._study_id(s, study)
            for row in s.scalars(select(TrialRow).where(TrialRow.study_id == sid, TrialRow.state == "RUNNING")):
                if row.number in states:
                    row.state = states[row.number]
                    row.finished_at = utcnow()

    # --- fronts -----------------------------------------------------------------------------
    def record_front(
        self,
        study: str,
        points: list[tuple[int, float, float]],
        *,
        n_complete: int,
        hypervolume: float,
        reference: tuple[float, float],
        quality_metric: str,
        size_metric: str,
    ) -> None:
        """Append a snapshot of the front: ``(trial number, quality, size)`` per point."""
        with self.session() as s:
            sid = self._study_id(s, study)
            front = FrontRow(study_id=sid, n_complete=n_complete, hypervolume=hypervolume,
                             ref_quality=reference[0], ref_size=reference[1], created_at=utcnow(),
                             quality_metric=quality_metric, size_metric=size_metric)
            front.points = [FrontPointRow(trial_number=n, quality=q, size=z) for n, q, z in points]
            s.add(front)
