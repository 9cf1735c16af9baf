"""The Optuna study driver: sample a configuration, quantize, measure, tell, store.

``open_study`` creates or loads the study of ``space.name`` in any SQLAlchemy database (Optuna's
``RDBStorage``, heartbeat and retry of stale trials when a heartbeat interval is given) and records
the space in qsearch's own tables. ``run_trials`` runs trials one at a time in this process with
Optuna's ask/tell interface until the study has ``n_trials`` finished trials in total, so several
processes (``qsearch.distributed``) can run it on one database together.

A trial:

1. samples one categorical choice per decision (``space.distributions``) and builds the complete
   recipe (``space.build_recipe``); a configuration that fails validation is FAILED;
2. measures its size from the per-layer specs; a sampled configuration over a budget is PRUNED
   without being calibrated (its constraint values are set, so Optuna sees it as infeasible);
3. quantizes it (seeded ``space.seed + trial number``), then, with multi-fidelity on, measures the
   proxy (MSE to the FP samples on a few hundred seeds). It is PRUNED, with its proxy value, when a
   finished trial of no larger size has a proxy better by ``fidelity.margin`` (relative): that
   trial's measured quality makes it very unlikely that this one enters the front. Otherwise
4. the full evaluation (FID) gives the objective values, told as COMPLETE with constraint values
   (``Trial.set_constraint``: Optuna 5 deprecates samplers' ``constraints_func`` for it; NSGA-II,
   TPE and ``best_trials`` read these), and the front snapshot with its hypervolume is stored.

Plain Optuna (``optuna.load_study``) and optuna-dashboard read the database as it is; note that the
dashboard's Pareto view ignores constraint values, so it also shows over-budget trials that nothing
feasible dominates (``qsearch pareto`` and ``best_trials`` do not).

Errors (NaN samples, bad configurations) make the trial FAILED with the error in its user attrs;
Ctrl-C makes the running trial FAILED, enqueues its configuration again, and stops.

The first trials are enqueued once per study (by whichever process claims it in the database): the
uniform configurations (every group at each weight-bit choice: the baselines the front must
dominate; always fully evaluated even when over budget) and, for each ``seed_trials.
sensitivity_targets`` average, a BitsFusion-style assignment from per-layer sensitivities
(``methods.bitsfusion.layer_sensitivity`` / ``assign_bits``, with groups as the units). With
``seed_trials.descent_rounds``, whenever the queue is empty, one-step-down moves of the front
points just above each target that land at or under it are queued (``TrialRunner.descend``) before
the sampler proposes anything more.
"""

from __future__ import annotations

import logging
import math
import random
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled  # no public API for ask/tell
from optuna.trial import FrozenTrial, Trial, TrialState

from qsearch.recipe import parse_recipe
from qsearch.search.evaluate import Evaluator, SessionEvaluator, session_for
from qsearch.search import samplers
from qsearch.search.pareto import hypervolume, reference_point
from qsearch.search.space import (
    Group,
    SearchSpace,
    build_recipe,
    canonical_json,
    default_params,
    distributions,
    layer_groups,
    source_text,
)
from qsearch.storage.db import ResultsDB, open_db, tune_sqlite

logger = logging.getLogger(__name__)

# user attributes of a trial (visible in optuna-dashboard)
ORIGIN = "qsearch:origin"  # sampler | uniform-w4 | sensitivity-3.5 (enqueued) ...
SEED = "qsearch:seed"
PROXY = "qsearch:proxy"  # the proxy metric's value
PRUNED_BY = "qsearch:pruned"  # "infeasible" or "proxy-dominated by trial N"
ERROR = "qsearch:error"
DESCENT_FROM = "qsearch:descent_from"  # the front trial a descent move started from
RETRY_OF = "qsearch:retry_of"  # an interrupted trial re-enqueued
SURPLUS = "qsearch:surplus"  # asked after the study was already full (a race between workers)
BASELINE_PREFIX = "uniform-"

SIZE_KEYS = ("avg_weight_bits", "model_mb", "model_bytes", "weight_params", "total_params")
MAX_RETRIES = 3
MAX_CONSECUTIVE_FAILURES = 5  # with nothing complete yet: the space itself is broken, stop


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The space's Optuna sampler, seeded with ``space.seed``, with its ``sampler_options``."""
    return samplers.make_sampler(space.sampler, seed=space.seed, population_size=space.population_size,
                                 options=space.sampler_options)


def rdb_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None) -> RDBStorage:
    """Optuna's storage on ``url``; with a heartbeat, stale trials are FAILED and retried."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():  # heartbeat and its retry callback are "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            heartbeat_stale_trial_callback=(RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
                                            if heartbeat_interval else None),
        )
    tune_sqlite(storage.engine)
    return storage


def open_study(
    space: SearchSpace,
    storage: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
) -> optuna.Study:
    """Create or load the study ``space.name`` in ``storage`` (any SQLAlchemy URL).

    Both objectives are minimized: ``[quality, size]`` (e.g. ``[fid, avg_weight_bits]``). A study of
    the same name with a different space (apart from ``trials`` and the eval device/batch size)
    is refused: its trials would not be comparable. The sampler is seeded with ``space.seed``; worker
    processes of one study should call ``study.sampler.reseed_rng()`` (as Optuna does for
    ``n_jobs > 1``) so that they do not propose the same configurations.
    """
    db = open_db(storage)
    stored = db.study_spec(space.name)
    if stored is not None:
        previous = SearchSpace.model_validate(stored).fingerprint()
        if canonical_json(previous) != canonical_json(space.fingerprint()):
            changed = sorted(k for k in previous if canonical_json(previous[k]) != canonical_json(space.fingerprint().get(k)))
            raise ValueError(
                f"study {space.name!r} already exists in {storage} with a different search space "
                f"(changed: {', '.join(changed)}); give the space a new name to start a new study"
            )
    rdb = rdb_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study = optuna.create_study(
        storage=rdb, study_name=space.name, directions=["minimize", "minimize"],
        sampler=make_sampler(space), load_if_exists=True,
    )
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([space.objectives.quality, space.objectives.size])
    db.record_study(space.name, study._study_id, source_text(space), space.model_dump(mode="json"))
    return study


# --- counting ---------------------------------------------------------------------------------


def _retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of FAILED trials that were queued again (heartbeat retry or interrupt)."""
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
        if RETRY_OF in t.user_attrs:
            out.add(int(t.user_attrs[RETRY_OF]))
    return out


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that count toward ``n_trials``: all but surplus and retried FAILED ones."""
    retried = _retried(trials)
    return [t for t in trials if not t.user_attrs.get(SURPLUS)
            and not (t.state == TrialState.FAIL and t.number in retried)]


@dataclass
class StudyStatus:
    """Where a study stands (what the progress views show)."""

    n_trials: int
    complete: int = 0
    pruned_proxy: int = 0
    pruned_infeasible: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    front: list[tuple[int, float, float]] = field(default_factory=list)
    objectives: tuple[str, str] = ("fid", "avg_weight_bits")
    last: str = ""

    @property
    def finished(self) -> int:
        return self.complete + self.pruned_proxy + self.pruned_infeasible + self.failed

    @property
    def full_evaluations_saved(self) -> int:
        """Trials that would have needed a full evaluation without the proxy."""
        return self.pruned_proxy


def study_status(study: optuna.Study, n_trials: int) -> StudyStatus:
    """Counts by state and the current front of a study (reads the storage)."""
    trials = _counted(study.get_trials(deepcopy=False))
    names = study.metric_names or ["fid", "avg_weight_bits"]
    status = StudyStatus(n_trials=n_trials, objectives=(names[0], names[1]))
    for t in trials:
        if t.state == TrialState.COMPLETE:
            status.complete += 1
        elif t.state == TrialState.PRUNED:
            if t.user_attrs.get(PRUNED_BY) == "infeasible":
                status.pruned_infeasible += 1
            else:
                status.pruned_proxy += 1
        elif t.state == TrialState.FAIL:
            status.failed += 1
        elif t.state == TrialState.RUNNING:
            status.running += 1
        elif t.state == TrialState.WAITING:
            status.waiting += 1
    status.front = sorted(((t.number, t.values[0], t.values[1]) for t in study.best_trials), key=lambda p: p[2])
    return status


def _feasible(t: FrozenTrial) -> bool:
    return all(v <= 0 for v in t.constraints.values())


# --- the runner -------------------------------------------------------------------------------


class TrialRunner:
    """Runs trials of one study in this process (see the module docstring)."""

    def __init__(self, space: SearchSpace, study: optuna.Study, evaluator: Evaluator, db: ResultsDB) -> None:
        self.space = space
        self.study = study
        self.evaluator = evaluator
        self.db = db
        self.params = evaluator.layer_params()
        self.groups: list[Group] = layer_groups(space, list(self.params))
        self.choices = distributions(space, self.groups)
        self.last_error = ""
        self._avg_bits_of: dict[str, float] = {}

    # seeding ----------------------------------------------------------------------------------
    def seed_queue(self) -> None:
        """Enqueue the uniform and sensitivity-based configurations, once per study."""
        if not self.db.claim_seeding(self.space.name):
            return
        seeds = self.space.seed_trials
        w_choices = self._common_w_choices()
        if seeds.uniform:
            for bits in w_choices or [None]:
                fixed = {"w_bits": bits} if bits is not None else {}
                label = f"{BASELINE_PREFIX}w{bits}" if bits is not None else f"{BASELINE_PREFIX}base"
                self.study.enqueue_trial(default_params(self.space, self.groups, **fixed),
                                         user_attrs={ORIGIN: label}, skip_if_exists=True)
        if seeds.sensitivity_targets:
            for target, params in self._sensitivity_params(w_choices):
                self.study.enqueue_trial(params, user_attrs={ORIGIN: f"sensitivity-{target:g}"},
                                         skip_if_exists=True)
                for k, variant in enumerate(self._neighbours(params, seeds.sensitivity_neighbours, target)):
                    self.study.enqueue_trial(variant, user_attrs={ORIGIN: f"sensitivity-{target:g}-n{k}"},
                                             skip_if_exists=True)

    def _neighbours(self, params: dict[str, Any], n: int, target: float) -> list[dict[str, Any]]:
        """``n`` variants of an assignment, each moving 1 or 2 groups' weight bits one choice up or
        down: a local search around the sensitivity seeds, where random proposals rarely land (one
        group at the lowest bits is enough to break a model)."""
        rng = random.Random(f"{self.space.seed}-{target}")
        keys = [g.param("w_bits") for g in self.groups if g.searches("w_bits")]
        choices = {g.param("w_bits"): list(g.choices["w_bits"]) for g in self.groups if "w_bits" in g.choices}
        variants: list[dict[str, Any]] = []
        for _ in range(n if keys else 0):
            variant = dict(params)
            for key in rng.sample(keys, min(len(keys), rng.choice((1, 2)))):
                i = choices[key].index(variant[key])
                steps = [j for j in (i - 1, i + 1) if 0 <= j < len(choices[key])]
                variant[key] = choices[key][rng.choice(steps)]
            variants.append(variant)
        return variants

    def descend(self) -> int:
        """Enqueue one-step-down moves that land at or under each sensitivity target; returns how many.

        Every front point the seeded trials find is a local move from a seed (BENCHMARKS, issue 6),
        and the sampler's proposals rarely are. So, while rounds are left, the front points above a
        target (in average weight bits) are tried nearest first, each moved one weight-bit choice
        down in one group at a time; the first whose moves include new ones at or under the target
        gives this round's moves. A front point no single move brings under the target gives none:
        this refines the front near the budget, it does not walk down from far above it. Queued
        trials are fully evaluated, like the seeds.
        """
        seeds = self.space.seed_trials
        if not seeds.descent_rounds or not seeds.sensitivity_targets:
            return 0
        trials = self.study.get_trials(deepcopy=False)
        origins = [str(t.user_attrs.get(ORIGIN, "")) for t in trials]
        rounds_done = {}
        for target in seeds.sensitivity_targets:
            prefix = f"descent-{target:g}-r"
            done = max((int(o[len(prefix):]) for o in origins if o.startswith(prefix)), default=0)
            if done < seeds.descent_rounds:
                rounds_done[target] = done
        if not rounds_done:  # the usual case once the rounds are spent: nothing more to compute
            return 0
        existing = {canonical_json(t.params or t.system_attrs.get("fixed_params", {})) for t in trials}
        front = [(self._avg_bits(t.params), t) for t in self.study.best_trials if _feasible(t)]
        added = 0
        for target, done in rounds_done.items():
            prefix = f"descent-{target:g}-r"
            for _, source in sorted((pair for pair in front if pair[0] > target), key=lambda pair: pair[0]):
                moves = [m for m in self._moves_down(source.params)
                         if canonical_json(m) not in existing and self._avg_bits(m) <= target]
                for move in moves:
                    existing.add(canonical_json(move))
                    self.study.enqueue_trial(move, user_attrs={ORIGIN: f"{prefix}{done + 1}",
                                                               DESCENT_FROM: source.number})
                added += len(moves)
                if moves:
                    break
        return added

    def _moves_down(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """``params`` with one group's weight bits one choice lower, for each group that can go lower."""
        moves = []
        for g in self.groups:
            if not g.searches("w_bits"):
                continue
            key = g.param("w_bits")
            lower = [b for b in g.choices["w_bits"] if b is not None and (params[key] is None or b < params[key])]
            if lower:
                moves.append({**params, key: max(lower)})
        return moves

    def _avg_bits(self, params: dict[str, Any]) -> float:
        """Average weight bits of a configuration, computed once (``descend`` runs before every
        sampled trial and asks again for the same front points and moves)."""
        key = canonical_json(params)
        if key not in self._avg_bits_of:
            recipe = parse_recipe(build_recipe(self.space, self.groups, params), "descent move")
            self._avg_bits_of[key] = float(self.evaluator.size(recipe)["avg_weight_bits"])
        return self._avg_bits_of[key]

    def _common_w_choices(self) -> list[int]:
        """The weight-bit choices shared by every group that searches them (empty when none); groups
        pinned to one width are not searching it."""
        sets = [set(g.choices["w_bits"]) for g in self.groups if g.searches("w_bits")]
        return sorted(set.intersection(*sets) - {None}) if sets else []

    def _sensitivity_params(self, w_choices: list[int]) -> list[tuple[float, dict[str, Any]]]:
        """One configuration per target: groups' summed sensitivities through ``assign_bits``."""
        searched = [g for g in self.groups if g.searches("w_bits")]
        if not searched or not w_choices:
            logger.warning("no weight-bit decisions: no sensitivity-seeded trials")
            return []
        try:
            from methods.bitsfusion import assign_bits
        except ImportError as exc:
            logger.warning("sensitivity seeding skipped: %s", exc)
            return []
        seeds = self.space.seed_trials
        started = time.perf_counter()
        try:
            layer_drop = self.evaluator.sensitivity(self.space.recipe(), seeds.sensitivity_low_bits,
                                                    seeds.sensitivity_samples)
        except Exception as exc:  # the seeds are a head start, not a requirement of the study
            logger.warning("sensitivity seeding failed, the sampler starts without it: %s", exc)
            return []
        logger.info("layer sensitivity in %.1f s", time.perf_counter() - started)
        drop = {g.key: sum(layer_drop.get(n, 0.0) for n in g.layers) for g in searched}
        size = {g.key: sum(self.params[n] for n in g.layers) for g in searched}
        base = default_params(self.space, self.groups)
        # groups that do not search their width (pinned by one choice, or not a w_bits pattern) keep it:
        # the searched ones share what is left of the target
        plan = self.space.recipe().layer_plan()
        fixed = {n: (base[g.param("w_bits")] if "w_bits" in g.choices else plan.spec_for(n).w_bits) or 16
                 for g in self.groups if not g.searches("w_bits") for n in g.layers}  # None: 16-bit float
        pinned_size = sum(self.params[n] for n in fixed)
        pinned_bits = sum(bits * self.params[n] for n, bits in fixed.items())
        out = []
        for target in seeds.sensitivity_targets:
            searched_target = (target * (sum(size.values()) + pinned_size) - pinned_bits) / sum(size.values())
            if searched_target < w_choices[0]:
                logger.warning("sensitivity target %g is below the lowest choice %d (with the pinned layers): "
                               "skipped", target, w_choices[0])
                continue
            bits = assign_bits(drop, size, w_choices, searched_target)
            params = dict(base)
            params.update({g.param("w_bits"): bits[g.key] for g in searched})
            out.append((target, params))
        return out

    # one trial --------------------------------------------------------------------------------
    def run(self, trial: Trial) -> TrialState:
        """Run one asked trial to its end; returns its final state."""
        origin = trial.user_attrs.get(ORIGIN, "sampler")
        seed = int(trial.user_attrs.get(SEED, self.space.seed + trial.number))
        if ORIGIN not in trial.user_attrs:
            trial.set_user_attr(ORIGIN, origin)
        trial.set_user_attr(SEED, seed)
        params = {name: trial.suggest_categorical(name, choices) for name, choices in self.choices.items()}
        record = dict(optuna_trial_id=trial._trial_id, origin=origin, seed=seed, params=params)
        self.db.record_trial(self.space.name, trial.number, state="RUNNING", **record)
        timings: dict[str, float] = {}
        metrics: dict[str, dict[str, float]] = {}
        try:
            with get_heartbeat_thread(trial._trial_id, self.study._storage):
                state = self._measure(trial, origin, seed, params, record, metrics, timings)
        except KeyboardInterrupt:
            told = self.study._storage.get_trial(trial._trial_id).state
            if told.is_finished():  # interrupted while storing: the result stands
                self.db.record_trial(self.space.name, trial.number, state=told.name, metrics=metrics,
                                     timings=timings, **record)
            else:
                self._fail(trial, "interrupted", record, metrics, timings)
                self._requeue(trial, params, seed)
            raise
        except Exception as exc:  # a failed configuration must not stop the study
            logger.debug("%s", traceback.format_exc())
            return self._fail(trial, f"{type(exc).__name__}: {exc}", record, metrics, timings)
        return state

    def _measure(self, trial: Trial, origin: str, seed: int, params: dict[str, Any], record: dict[str, Any],
                 metrics: dict[str, dict[str, float]], timings: dict[str, float]) -> TrialState:
        space, ev = self.space, self.evaluator
        recipe_data = build_recipe(space, self.groups, params)
        recipe = parse_recipe(recipe_data, f"trial {trial.number}")
        record.update(recipe=recipe_data, layers=ev.layer_specs(recipe))
        size = ev.size(recipe)
        size_value = size[space.objectives.size]
        violations = space.constraints.violations(size)
        if any(v > 0 for v in violations.values()) and origin == "sampler":
            for key, value in violations.items():
                trial.set_constraint(key, value)
            metrics["estimate"] = {k: size[k] for k in SIZE_KEYS if k in size}
            metrics["constraint"] = violations
            return self._tell_pruned(trial, "infeasible", record, metrics, timings)

        started = time.perf_counter()
        handle = ev.quantize(recipe, seed)
        timings["quantize_seconds"] = time.perf_counter() - started
        for stage, seconds in (getattr(handle, "state", {}) or {}).get("stage_seconds", {}).items():
            timings[f"stage_{stage}_seconds"] = seconds

        if space.multi_fidelity:
            started = time.perf_counter()
            metrics["proxy"] = _split_timings(ev.proxy(handle, recipe), "proxy", timings)
            timings["proxy_seconds"] = time.perf_counter() - started
            value = _metric(metrics["proxy"], space.fidelity.proxy, "proxy")
            trial.set_user_attr(PROXY, value)
            dominator = self._proxy_dominator(value, size_value) if origin == "sampler" else None
            if dominator is not None:
                return self._tell_pruned(trial, f"proxy-dominated by trial {dominator}", record, metrics, timings)

        started = time.perf_counter()
        metrics["full"] = full = _split_timings(ev.full(handle, recipe), "full", timings)
        timings["full_seconds"] = time.perf_counter() - started
        del handle
        values = [_metric(full, space.objectives.quality, "quality"), _metric(full, space.objectives.size, "size")]
        metrics["constraint"] = space.constraints.violations(full)
        for key, value in metrics["constraint"].items():
            trial.set_constraint(key, value)
        self.study.tell(trial, values)
        self.db.record_trial(space.name, trial.number, state="COMPLETE", metrics=metrics, timings=timings, **record)
        self.update_front()
        return TrialState.COMPLETE

    def _requeue(self, trial: Trial, params: dict[str, Any] | None, seed: int | None) -> None:
        """Queue an interrupted trial's configuration again (a sampled one keeps its parameters)."""
        if params is None:
            params = self.study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
        if params is None:
            return  # interrupted before its parameters were sampled: nothing to repeat
        attrs = {ORIGIN: trial.user_attrs.get(ORIGIN, "sampler"), RETRY_OF: trial.number}
        if seed is not None:
            attrs[SEED] = seed
        self.study.enqueue_trial(params, user_attrs=attrs)

    def abandon(self, trial: Trial) -> None:
        """Fail a trial interrupted before ``run`` started it, and queue its configuration again."""
        if self._fail(trial, "interrupted", {}, {}, {}) == TrialState.FAIL:
            self._requeue(trial, None, None)

    def _proxy_dominator(self, proxy: float, size: float) -> int | None:
        """A finished feasible trial no larger whose proxy is better by the margin, if any."""
        limit = proxy / (1.0 + self.space.fidelity.margin)
        best = None
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            q = t.user_attrs.get(PROXY)
            if q is not None and _feasible(t) and t.values[1] <= size and q < limit:
                if best is None or q < best[1]:
                    best = (t.number, q)
        return None if best is None else best[0]

    def _tell_pruned(self, trial: Trial, reason: str, record: dict[str, Any],
                     metrics: dict[str, dict[str, float]], timings: dict[str, float]) -> TrialState:
        trial.set_user_attr(PRUNED_BY, reason)
        self.study.tell(trial, state=TrialState.PRUNED)
        self.db.record_trial(self.space.name, trial.number, state="PRUNED", error=reason, metrics=metrics,
                             timings=timings, **record)
        return TrialState.PRUNED

    def _fail(self, trial: Trial, message: str, record: dict[str, Any],
              metrics: dict[str, dict[str, float]], timings: dict[str, float]) -> TrialState:
        """Fail the trial; returns its final state. A trial already finished keeps its stored state:
        another process failed it as stale while it ran (this worker's heartbeat came later than the
        grace period, e.g. on an overloaded host) and queued its retry, which measures it again."""
        stored = self.study._storage.get_trial(trial._trial_id).state
        if stored.is_finished():
            logger.warning("trial %d is already %s; not failed again (%s)",
                           trial.number, stored.name, message)
            return stored
        logger.warning("trial %d failed: %s", trial.number, message)
        self.last_error = message
        trial.set_user_attr(ERROR, message[:2000])
        self.study.tell(trial, state=TrialState.FAIL)
        self.db.record_trial(self.space.name, trial.number, state="FAIL", error=message, metrics=metrics,
                             timings=timings, **record)
        return TrialState.FAIL

    # the front --------------------------------------------------------------------------------
    def update_front(self) -> None:
        """Store the current front (Optuna's ``best_trials``) with its hypervolume."""
        complete = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _feasible(t)]
        best = self.study.best_trials
        ref_cfg = self.space.hypervolume_reference
        reference = reference_point([tuple(t.values) for t in complete], ref_cfg.quality, ref_cfg.size)
        hv = hypervolume([(t.values[0], t.values[1]) for t in best], reference)
        self.db.record_front(
            self.space.name, [(t.number, t.values[0], t.values[1]) for t in best], n_complete=len(complete),
            hypervolume=hv, reference=reference, quality_metric=self.space.objectives.quality,
            size_metric=self.space.objectives.size,
        )


def _split_timings(metrics: dict[str, float], prefix: str, timings: dict[str, float]) -> dict[str, float]:
    """Move ``*_seconds`` entries of an evaluation into ``timings`` (as ``prefix_*_seconds``)."""
    for key in [k for k in metrics if k.endswith("_seconds")]:
        timings[f"{prefix}_{key}"] = metrics.pop(key)
    return metrics


def _metric(metrics: dict[str, float], name: str, role: str) -> float:
    if name not in metrics:
        raise KeyError(f"the {role} metric {name!r} was not measured (got: {', '.join(sorted(metrics))})")
    value = float(metrics[name])
    if not math.isfinite(value):
        raise ValueError(f"the {role} metric {name!r} is {value}")
    return value


def storage_url(study: optuna.Study) -> str:
    """The database URL of a study opened on an ``RDBStorage`` (qsearch's tables live beside it)."""
    storage = getattr(study._storage, "_backend", study._storage)
    if not isinstance(storage, RDBStorage):
        raise TypeError(f"qsearch studies need an RDBStorage (a database URL), not {type(storage).__name__}")
    return storage.url


def _should_stop(stop: Any) -> bool:
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return bool(stop.is_set())
    return bool(stop())


def run_trials(
    space: SearchSpace,
    study: optuna.Study,
    n_trials: int,
    *,
    session: Any = None,
    progress: Callable[[StudyStatus], None] | None = None,
    stop: Any = None,
    evaluator: Evaluator | None = None,
) -> None:
    """Run trials in this process until the study has ``n_trials`` finished trials in total.

    Finished means COMPLETE, PRUNED, or FAILED and not queued again; trials other processes are
    running count too, so several workers together never exceed ``n_trials``. ``session``: a
    ``qsearch.engine.Session`` to share (default: one per process, ``session_for``); ``progress``:
    called with a ``StudyStatus`` before and after every trial; ``stop``: an ``Event`` or a callable,
    checked between trials; ``evaluator``: replaces the session's measurements (tests). Ctrl-C fails
    the running trial, queues its configuration again and re-raises.
    """
    db = open_db(storage_url(study))
    if evaluator is None:
        evaluator = SessionEvaluator(session or session_for(space), space)
    runner = TrialRunner(space, study, evaluator, db)
    runner.seed_queue()
    heartbeat = is_heartbeat_enabled(study._storage)
    failures = 0
    while not _should_stop(stop):
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(study)
        all_trials = study.get_trials(deepcopy=False)
        db.sync_states(space.name, {t.number: t.state.name for t in all_trials if t.state.is_finished()})
        trials = _counted(all_trials)
        finished = sum(t.state.is_finished() for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if finished + running >= n_trials:
            break
        if not any(t.state == TrialState.WAITING for t in all_trials):
            runner.descend()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = study.ask()
        try:
            if _is_surplus(study, trial.number, n_trials):
                trial.set_user_attr(SURPLUS, True)
                study.tell(trial, state=TrialState.FAIL)
                break
            if progress:
                progress(_status(study, n_trials, f"trial {trial.number} running"))
        except KeyboardInterrupt:
            runner.abandon(trial)
            raise
        state = runner.run(trial)
        if progress:
            progress(_status(study, n_trials, f"trial {trial.number}: {state.name}"))
        failures = failures + 1 if state == TrialState.FAIL else 0
        if failures >= MAX_CONSECUTIVE_FAILURES and not study.get_trials(states=(TrialState.COMPLETE,)):
            raise RuntimeError(f"the first {failures} trials of this process failed and none is complete; "
                               f"last error: {runner.last_error}")


def _status(study: optuna.Study, n_trials: int, last: str) -> StudyStatus:
    status = study_status(study, n_trials)
    status.last = last
    return status


def _is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether this just-asked trial is beyond ``n_trials`` among the counted trials, by number."""
    counted = sorted(t.number for t in _counted(study.get_trials(deepcopy=False)))
    return number in counted and counted.index(number) >= n_trials
