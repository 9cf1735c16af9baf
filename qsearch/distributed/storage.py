"""The study database as several processes (and hosts) share it.

Which URL: ``sqlite:///studies.db`` (the default) is right for workers on ONE host: SQLite serialises
writers with file locks, and with the write-ahead log and a 60 s busy timeout
(``qsearch.storage.db.tune_sqlite`` and the ``connect_args`` that ``qsearch.search.study.rdb_storage``
gives Optuna's ``RDBStorage`` through ``engine_kwargs``) a handful of workers each committing a few
times per trial wait for each other instead of failing. The busy timeout cannot help a transaction
that read before another process committed and then writes (SQLite answers "database is locked" at
once); ``with_retries`` re-runs such a step, and the workers wrap ``run_trials`` in it. For workers on SEVERAL hosts use a server
database, e.g. ``postgresql://user:password@dbhost:5432/qsearch``: SQLite over a network file system
(NFS, SMB, most cluster home directories) is unsafe, because those file systems do not implement the
POSIX advisory locks SQLite relies on correctly, and its WAL mode needs shared memory that only
exists on one machine; two hosts writing the same file can corrupt it (https://sqlite.org/faq.html#q5,
https://sqlite.org/wal.html).

Why relative SQLite paths are made absolute here: Ray starts workers in their own working
directory, so ``sqlite:///studies.db`` would name a different file in every worker.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def shared_url(url: str, *, multi_host: bool = False) -> str:
    """``url`` as every worker must see it: a SQLite file path made absolute.

    ``multi_host``: the workers may run on other machines (a Ray cluster address was given); a
    SQLite URL then gets a warning (see the module docstring), since nothing can tell here whether
    the path is on a network file system that every host mounts.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database
    if database in (None, "", ":memory:"):
        raise ValueError("an in-memory SQLite database cannot be shared by worker processes; "
                         "use sqlite:///path/to/studies.db or a postgresql:// URL")
    if multi_host:
        warnings.warn(
            "SQLite storage with a Ray cluster: correct only if every worker runs on this host. "
            "Workers on other hosts need a server database (postgresql://...): SQLite's locking is "
            "unsafe on network file systems.", stacklevel=2)
    return parsed.set(database=str(Path(database).expanduser().resolve())).render_as_string(hide_password=False)


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: SQLite busy/locked, a dropped server connection."""
    if not isinstance(exc, OperationalError):
        return False
    text = str(exc).lower()
    return any(s in text for s in ("database is locked", "database is busy", "could not connect",
                                   "server closed the connection", "connection refused", "terminating connection"))


def with_retries(fn: Callable[[], T], *, attempts: int = 5, backoff_s: float = 0.5) -> T:
    """``fn()``, retried with exponential back-off while it raises a transient database error."""
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            logger.warning("database busy (%s), retrying", str(exc).splitlines()[0])
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class RunningTrialWatch:
    """Give every RUNNING trial a heartbeat, so that one whose process died can never stay RUNNING.

    Why: Optuna fails a RUNNING trial as stale only when it has a heartbeat record older than the
    grace period; a worker killed between ``study.ask()`` and its heartbeat thread's first beat
    leaves a trial with no record, which would stay RUNNING forever. Recording one beat for each
    RUNNING trial the first time it is seen is harmless for a live worker (it keeps beating) and
    makes a dead worker's trial stale one grace period later, so that it is failed and retried.
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def __call__(self, study: optuna.Study) -> None:
        storage = study._storage  # Optuna has no public accessor; heartbeat functions take it too
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id not in self.seen:
                storage.record_heartbeat(trial._trial_id)
                self.seen.add(trial._trial_id)
