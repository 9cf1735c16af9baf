"""``launch``: one study run by several Ray workers, with dead workers replaced and one progress view.

Without ``address`` a local Ray is started with this machine's CPUs and GPUs (the embedded default,
shut down again at the end); with ``address="auto"`` or ``"ray://host:10001"`` / ``"host:6379"`` the
driver joins that cluster. Each worker is a Ray task holding ``gpus_per_trial`` GPUs (fractional
values put several workers on one GPU) and ``cpus_per_worker`` CPUs; all write to one database (see
``qsearch.distributed.storage`` for SQLite on one host versus PostgreSQL for several). Workers post
their state to the launch's ``Board`` actor, which the driver reads for its progress view.

Fault tolerance: every trial runs with an Optuna heartbeat; a worker that dies (SIGKILL, OOM, a lost
node) leaves its trial RUNNING with a stale heartbeat, and one grace period later a live process
marks it FAILED and queues its parameters again as a new trial (system attribute ``failed_trial``).
The driver starts a new worker in place of a dead one (up to ``max_respawns``) and ends only when the
study has its ``n_trials`` finished trials, so a death loses at most the dead worker's current
trial's work, never a finished trial. A polite stop (``stop`` event, Ctrl-C) lets the running trials
finish; a second Ctrl-C kills the workers, whose trials are then failed and retried by the next
launch: running ``launch`` again with the same space continues the study.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qsearch.distributed.storage import RunningTrialWatch, shared_url, with_retries
from qsearch.distributed.board import Board
from qsearch.distributed.worker import EvaluatorFactory, run_worker
from qsearch.search.space import SearchSpace
from qsearch.search.study import StudyStatus
from qsearch.storage.db import DEFAULT_URL

logger = logging.getLogger(__name__)

HEARTBEAT_S = 30  # a RUNNING trial's worker writes a beat this often
GRACE_S = 120  # ... and is declared dead after this long without one (a trial's slowest DB write must fit)


@dataclass
class LaunchView:
    """What the progress view shows: the study's counts and front, and each worker's state."""

    status: StudyStatus
    workers: list[dict[str, Any]]
    elapsed_s: float
    deaths: int = 0
    respawns: int = 0


@dataclass
class LaunchResult:
    """How a launch ended."""

    status: StudyStatus
    wall_seconds: float
    workers: list[dict[str, Any]] = field(default_factory=list)  # the last info of every worker that ran
    deaths: int = 0
    respawns: int = 0
    stopped: bool = False

    @property
    def complete(self) -> bool:
        return self.status.finished >= self.status.n_trials


def _init_ray(address: str | None, workers: int, cpus_per_worker: float) -> bool:
    """Start or join Ray; returns whether this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(workers * cpus_per_worker)),
                 include_dashboard=False, log_to_driver=False)
    return True


def launch(
    space: SearchSpace,
    storage: str = DEFAULT_URL,
    *,
    workers: int,
    n_trials: int | None = None,
    gpus_per_trial: float = 0.0,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    heartbeat_interval: int = HEARTBEAT_S,
    grace_period: int = GRACE_S,
    max_respawns: int | None = None,
    poll_s: float = 1.0,
    stop: threading.Event | None = None,
    progress: Callable[[LaunchView], None] | None = None,
    evaluator_factory: EvaluatorFactory | None = None,
) -> LaunchResult:
    """Run the study of ``space`` on ``workers`` Ray workers until it has ``n_trials`` finished trials.

    ``n_trials`` defaults to ``space.trials``; ``max_respawns`` (default ``2 * workers``) bounds how
    many dead workers are replaced; ``stop``: set it for a polite stop (running trials finish);
    ``progress`` is called every ``poll_s`` with a ``LaunchView`` (from the driver's thread: it may
    kill a worker, which the tests do); ``evaluator_factory(space)`` replaces each worker's
    Session-based measurements (tests, benchmarks of the machinery).
    """
    import ray
    from ray.exceptions import RayError, RayTaskError

    from qsearch.search.study import open_study, study_status

    if workers < 1:
        raise ValueError("workers must be at least 1")
    n_trials = n_trials or space.trials
    storage = shared_url(storage, multi_host=address is not None)
    max_respawns = 2 * workers if max_respawns is None else max_respawns
    stop = stop or threading.Event()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = with_retries(lambda: open_study(space, storage, heartbeat_interval=heartbeat_interval,
                                                grace_period=grace_period))  # one creator: no race between workers
    watch = RunningTrialWatch()
    started_ray = _init_ray(address, workers, cpus_per_worker)
    if gpus_per_trial and ray.cluster_resources().get("GPU", 0) < gpus_per_trial:
        gpus = ray.cluster_resources().get("GPU", 0)
        if started_ray:
            ray.shutdown()
        raise RuntimeError(f"--gpus-per-trial {gpus_per_trial}: the Ray cluster has {gpus} GPUs")
    board = ray.remote(Board).options(num_cpus=0).remote()
    task = ray.remote(run_worker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_trial, max_retries=0)
    options = dict(board=board, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                   threads=max(1, int(cpus_per_worker)), poll_s=poll_s, evaluator_factory=evaluator_factory)

    running: dict[Any, int] = {task.remote(i, space, storage, n_trials, **options): i for i in range(workers)}
    ended: dict[int, dict[str, Any]] = {}  # workers that returned or died: their last state
    next_index, deaths, respawns = workers, 0, 0
    clock = time.perf_counter()
    interrupted = False

    def view() -> LaunchView:
        posted = _snapshot(board)
        states = {**posted, **ended}
        return LaunchView(with_retries(lambda: study_status(study, n_trials)), [states[i] for i in sorted(states)],
                          time.perf_counter() - clock, deaths, respawns)

    try:
        while running:
            try:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
                for ref in ready:
                    index = running.pop(ref)
                    try:
                        ended[index] = ray.get(ref)
                        if stop.is_set() or with_retries(lambda: study_status(study, n_trials)).finished >= n_trials:
                            continue
                    except RayTaskError:  # the worker's own error (e.g. every trial fails): not retried
                        raise
                    except RayError as exc:  # the process died (SIGKILL, OOM, lost node)
                        deaths += 1
                        ended[index] = {**_snapshot(board).get(index, {"worker": index}), "state": "died", "trial": None}
                        logger.warning("worker %d died: %s", index, type(exc).__name__)
                    if stop.is_set():
                        continue
                    if respawns >= max_respawns:
                        logger.warning("not replacing worker %d: %d workers replaced already", index, respawns)
                        continue
                    running[task.remote(next_index, space, storage, n_trials, **options)] = next_index
                    next_index, respawns = next_index + 1, respawns + 1  # the dead trial is re-queued once stale
                if stop.is_set():
                    board.stop.remote()
                with_retries(lambda: watch(study))
                if progress:
                    progress(view())
            except KeyboardInterrupt:
                if interrupted:  # the second Ctrl-C: kill; the trials are retried by the next launch
                    for ref in running:
                        ray.cancel(ref, force=True)
                    raise
                interrupted = True
                stop.set()
                logger.warning("stopping: the running trials finish first (Ctrl-C again to kill them)")
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        ray.kill(board)
        if started_ray:
            ray.shutdown()
    status = with_retries(lambda: study_status(study, n_trials))
    return LaunchResult(status, time.perf_counter() - clock, [ended[i] for i in sorted(ended)], deaths, respawns,
                        stopped=stop.is_set())


def _snapshot(board: Any, timeout_s: float = 5.0) -> dict[int, dict[str, Any]]:
    """The board's worker states (empty if it does not answer in time)."""
    import ray

    ref = board.snapshot.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    return ray.get(ref) if ready else {}

