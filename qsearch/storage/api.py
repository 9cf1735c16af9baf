"""Queries over the results database: what ``qsearch studies/pareto/show`` and the export read.

Every function takes the storage URL and a study name, reads the qsearch tables only (no Optuna
needed) and returns plain dicts. Unknown studies and trials raise ``LookupError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from qsearch.storage.db import ResultsDB, open_db
from qsearch.storage.schema import FrontRow, StudyRow, TimingRow, TrialRow


def _db(storage: str) -> ResultsDB:
    """The database, refusing to create an empty SQLite file for a read."""
    url = make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).exists():
            raise LookupError(f"no study database at {storage} (run `qsearch search SPACE.yaml` first)")
    return open_db(storage)


def _study(s: Any, name: str, storage: str) -> StudyRow:
    row = s.scalar(select(StudyRow).where(StudyRow.name == name))
    if row is None:
        known = s.scalars(select(StudyRow.name)).all()
        raise LookupError(f"no study {name!r} in {storage}; studies: {', '.join(known) or 'none'}")
    return row


def _trial(s: Any, study: StudyRow, number: int) -> TrialRow:
    row = s.scalar(select(TrialRow).where(TrialRow.study_id == study.id, TrialRow.number == number))
    if row is None:
        raise LookupError(f"study {study.name!r} has no trial {number}")
    return row


def _metrics(row: TrialRow) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for m in row.metrics:
        out.setdefault(m.fidelity, {})[m.name] = m.value
    return out


def list_studies(storage: str) -> list[dict[str, Any]]:
    """One row per study: name, trials by state, current front size and hypervolume."""
    db = _db(storage)
    rows = []
    with db.session() as s:
        for study in s.scalars(select(StudyRow).order_by(StudyRow.created_at)):
            states = dict(s.execute(select(TrialRow.state, func.count()).where(TrialRow.study_id == study.id)
                                    .group_by(TrialRow.state)).all())
            front = s.scalar(select(FrontRow).where(FrontRow.study_id == study.id).order_by(FrontRow.id.desc()).limit(1))
            objectives = study.spec_json.get("objectives", {})
            rows.append({
                "name": study.name,
                "model": study.spec_json.get("base", {}).get("model"),
                "created_at": study.created_at.isoformat(timespec="seconds"),
                "trials": sum(states.values()),
                "states": states,
                "front_size": len(front.points) if front else 0,
                "hypervolume": front.hypervolume if front else None,
                "objectives": [objectives.get("quality", "fid"), objectives.get("size", "avg_weight_bits")],
            })
    return rows


def study_spec(storage: str, study: str) -> dict[str, Any]:
    """The space as submitted: ``yaml`` (text) and ``json`` (parsed)."""
    with _db(storage).session() as s:
        row = _study(s, study, storage)
        return {"yaml": row.spec_yaml, "json": row.spec_json}


def pareto_front(storage: str, study: str) -> list[dict[str, Any]]:
    """The study's current Pareto front, sorted by size: one dict per trial.

    Each row: ``number``, the two objectives under their metric names (e.g. ``fid`` and
    ``avg_weight_bits``), ``quality``/``size`` (the same values), ``origin``, ``params`` and
    ``metrics`` (the full-fidelity metrics of the trial).
    """
    with _db(storage).session() as s:
        row = _study(s, study, storage)
        front = s.scalar(select(FrontRow).where(FrontRow.study_id == row.id).order_by(FrontRow.id.desc()).limit(1))
        if front is None:
            return []
        out = []
        for p in sorted(front.points, key=lambda p: (p.size, p.quality)):
            trial = _trial(s, row, p.trial_number)
            out.append({
                "number": p.trial_number,
                front.quality_metric: p.quality,
                front.size_metric: p.size,
                "quality": p.quality,
                "size": p.size,
                "origin": trial.origin,
                "params": trial.params_json,
                "metrics": _metrics(trial).get("full", {}),
            })
        return out


def front_history(storage: str, study: str) -> list[dict[str, Any]]:
    """Hypervolume after each finished trial (snapshots in order)."""
    with _db(storage).session() as s:
        row = _study(s, study, storage)
        fronts = s.scalars(select(FrontRow).where(FrontRow.study_id == row.id).order_by(FrontRow.id))
        return [{"n_complete": f.n_complete, "hypervolume": f.hypervolume, "points": len(f.points),
                 "reference": [f.ref_quality, f.ref_size]} for f in fronts]


def trials(storage: str, study: str) -> list[dict[str, Any]]:
    """Every trial: number, state, origin, seed, params, error, metrics by fidelity, and ``feasible``
    (its constraint values, stored as metrics of fidelity ``constraint``, are all <= 0)."""
    with _db(storage).session() as s:
        row = _study(s, study, storage)
        rows = s.scalars(select(TrialRow).where(TrialRow.study_id == row.id).order_by(TrialRow.number))
        out = []
        for t in rows:
            metrics = _metrics(t)
            feasible = all(v is not None and v <= 0 for v in metrics.get("constraint", {}).values())
            out.append({"number": t.number, "state": t.state, "origin": t.origin, "seed": t.seed,
                        "params": t.params_json, "error": t.error, "metrics": metrics, "feasible": feasible})
        return out


def trial_recipe(storage: str, study: str, trial_number: int) -> dict[str, Any]:
    """The complete recipe dict the trial ran (``parse_recipe`` accepts it)."""
    with _db(storage).session() as s:
        trial = _trial(s, _study(s, study, storage), trial_number)
        if trial.recipe_json is None:
            raise LookupError(f"trial {trial_number} of {study!r} has no recipe (it failed before building one)")
        return trial.recipe_json


def trial_metrics(storage: str, study: str, trial_number: int) -> dict[str, dict[str, float | None]]:
    """The trial's metrics by fidelity: ``{"proxy": {...}, "full": {...}}`` (those it reached)."""
    with _db(storage).session() as s:
        return _metrics(_trial(s, _study(s, study, storage), trial_number))


def trial_info(storage: str, study: str, trial_number: int) -> dict[str, Any]:
    """Everything stored about a trial: state, origin, seed, params, per-layer specs, recipe,
    metrics by fidelity, timings and error."""
    with _db(storage).session() as s:
        t = _trial(s, _study(s, study, storage), trial_number)
        timings = {r.name: r.seconds for r in s.scalars(select(TimingRow).where(TimingRow.trial_id == t.id))}
        return {
            "study": study, "number": t.number, "state": t.state, "origin": t.origin, "seed": t.seed,
            "params": t.params_json, "layers": t.layers_json, "recipe": t.recipe_json,
            "metrics": _metrics(t), "timings": timings, "error": t.error,
            "started_at": t.started_at.isoformat(timespec="seconds") if t.started_at else None,
            "finished_at": t.finished_at.isoformat(timespec="seconds") if t.finished_at else None,
        }

