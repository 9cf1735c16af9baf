"""One worker of a distributed study: it runs trials with ``run_trials`` until the study is done.

The driver (``qsearch.distributed.driver``) runs ``run_worker`` as a Ray task holding ``num_gpus`` /
``num_cpus``. A worker builds its measurement state once (one ``Session``: FP model, calibration
trajectories, reference samples and statistics, cached per process by ``session_for``), then loops
on the shared database:

* ``run_trials`` asks, measures and tells trials until finished + running trials reach the target;
* while trials that other workers run are still open, it waits and polls: a worker that died leaves
  its trial RUNNING with a heartbeat that stops; one grace period later the next ``run_trials`` of
  any worker fails it and re-queues its configuration (``RetryHeartbeatStaleTrialCallback``, system
  attribute ``failed_trial``), and a live worker runs it. So one live worker suffices for the study
  to finish with every trial done.

Why tasks and not actors: Ray reuses a finished task's process for the next task of the same shape,
so a second launch in the same Ray session (a relaunch, the next point of a scaling benchmark) does
not pay the seconds of importing torch and diffusers again, and keeps the process's cached Session.
State goes to the launch's ``Board`` actor, which also carries the polite-stop flag.
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

from qsearch.distributed.storage import with_retries
from qsearch.search.space import SearchSpace

# what run_trials's progress callback says (qsearch.search.study._status): "trial 7 running", "trial 7: COMPLETE"
_STARTED = re.compile(r"^trial (\d+) running$")
_FINISHED = re.compile(r"^trial (\d+): (\w+)$")

EvaluatorFactory = Callable[[SearchSpace], Any]


class StudyWorker:
    """Runs trials of one study from one process, posting its state to ``board`` (see the module docstring)."""

    def __init__(
        self,
        index: int,
        space: SearchSpace,
        storage: str,
        n_trials: int,
        *,
        board: Any,
        heartbeat_interval: int,
        grace_period: int,
        threads: int = 1,
        poll_s: float = 1.0,
        evaluator_factory: EvaluatorFactory | None = None,
    ) -> None:
        self.index = index
        self.space = space
        self.storage = storage
        self.n_trials = n_trials
        self.board = board
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.threads = threads
        self.poll_s = poll_s
        self.evaluator_factory = evaluator_factory
        self.info: dict[str, Any] = {"worker": index, "pid": os.getpid(), "host": socket.gethostname(),
                                     "state": "preparing", "trial": None, "done": {}, "setup_seconds": None,
                                     "trial_seconds": []}
        self._trial_started = 0.0

    def stopped(self) -> bool:
        import ray

        return bool(ray.get(self.board.stopped.remote()))

    def run(self) -> dict[str, Any]:
        """Run trials until the study has ``n_trials`` finished ones (or the board says stop)."""
        import optuna
        import torch

        from qsearch.search.study import open_study, run_trials, study_status

        torch.set_num_threads(self.threads)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self._post()
        started = time.perf_counter()
        study = with_retries(lambda: open_study(self.space, self.storage, heartbeat_interval=self.heartbeat_interval,
                                                grace_period=self.grace_period))
        study.sampler.reseed_rng()  # as Optuna does for n_jobs > 1: workers must not propose the same points
        evaluator = self._evaluator()
        self._post(setup_seconds=time.perf_counter() - started)
        while not self.stopped():
            self._post(state="running")
            with_retries(lambda: run_trials(self.space, study, self.n_trials, evaluator=evaluator,
                                            progress=self._progress, stop=self.stopped))
            if with_retries(lambda: study_status(study, self.n_trials)).finished >= self.n_trials:
                break
            self._post(state="waiting")  # others' trials are open: they finish, or go stale and are re-queued
            time.sleep(self.poll_s)
        self._post(state="stopped" if self.stopped() else "done", trial=None)
        return dict(self.info)

    def _evaluator(self) -> Any:
        """The worker's one evaluator: its Session computes the FP references once, for every trial."""
        if self.evaluator_factory is not None:
            return self.evaluator_factory(self.space)
        from qsearch.search.evaluate import SessionEvaluator, session_for

        return SessionEvaluator(session_for(self.space), self.space)

    def _progress(self, status: Any) -> None:
        last = status.last or ""
        if m := _STARTED.match(last):
            self._trial_started = time.perf_counter()
            self._post(trial=int(m.group(1)))
        elif m := _FINISHED.match(last):
            done = self.info["done"]
            done[m.group(2)] = done.get(m.group(2), 0) + 1
            self.info["trial_seconds"].append(time.perf_counter() - self._trial_started)
            self._post(trial=None)

    def _post(self, **changes: Any) -> None:
        self.info.update(changes)
        self.board.post.remote(self.index, dict(self.info))  # fire and forget


def run_worker(index: int, space: SearchSpace, storage: str, n_trials: int, **options: Any) -> dict[str, Any]:
    """The Ray task body: one ``StudyWorker`` run; returns its final state."""
    return StudyWorker(index, space, storage, n_trials, **options).run()
