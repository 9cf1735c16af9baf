"""The project's own tables, beside Optuna's in the same database.

Optuna's tables hold what a sampler needs (parameters, objective values, states, attributes); these
hold what a user asks of a study afterwards, in a form that needs no Optuna to read:

* ``qsearch_studies``: the search space as submitted (the YAML text and its parsed JSON);
* ``qsearch_trials``: each trial's complete configuration: the recipe it ran (``parse_recipe``
  accepts it as it is) and the per-layer quantization (bits, granularity), its seed and origin;
* ``qsearch_metrics``: every measured metric, tagged with its fidelity (``proxy`` or ``full``);
* ``qsearch_timings``: seconds per phase (calibration, each stage, proxy, full evaluation);
* ``qsearch_fronts`` / ``qsearch_front_points``: the Pareto front after each finished trial, with
  its hypervolume and reference point (the last snapshot is the study's current front).

The schema version lives in ``qsearch_schema_version`` (alembic's version table, renamed so it never
collides with Optuna's own ``alembic_version``); ``migrations/`` upgrades older databases at open.
These models describe the newest revision; the migrations are the frozen history.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

VERSION_TABLE = "qsearch_schema_version"


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "qsearch_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    optuna_study_id: Mapped[int | None] = mapped_column(Integer)
    spec_yaml: Mapped[str] = mapped_column(Text)
    spec_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    seeded_at: Mapped[datetime | None] = mapped_column(DateTime)

    trials: Mapped[list["TrialRow"]] = relationship(back_populates="study", cascade="all, delete-orphan")
    fronts: Mapped[list["FrontRow"]] = relationship(back_populates="study", cascade="all, delete-orphan")


class TrialRow(Base):
    __tablename__ = "qsearch_trials"
    __table_args__ = (UniqueConstraint("study_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("qsearch_studies.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    origin: Mapped[str | None] = mapped_column(String(128))
    seed: Mapped[int | None] = mapped_column(Integer)
    params_json: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    recipe_json: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    layers_json: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    study: Mapped[StudyRow] = relationship(back_populates="trials")
    metrics: Mapped[list["MetricRow"]] = relationship(cascade="all, delete-orphan")
    timings: Mapped[list["TimingRow"]] = relationship(cascade="all, delete-orphan")


class MetricRow(Base):
    __tablename__ = "qsearch_metrics"
    __table_args__ = (UniqueConstraint("trial_id", "fidelity", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("qsearch_trials.id", ondelete="CASCADE"), index=True)
    fidelity: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float | None] = mapped_column(Float)


class TimingRow(Base):
    __tablename__ = "qsearch_timings"
    __table_args__ = (UniqueConstraint("trial_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("qsearch_trials.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    seconds: Mapped[float] = mapped_column(Float)


class FrontRow(Base):
    __tablename__ = "qsearch_fronts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("qsearch_studies.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    n_complete: Mapped[int] = mapped_column(Integer)
    quality_metric: Mapped[str] = mapped_column(String(64))
    size_metric: Mapped[str] = mapped_column(String(64))
    hypervolume: Mapped[float] = mapped_column(Float)
    ref_quality: Mapped[float] = mapped_column(Float)
    ref_size: Mapped[float] = mapped_column(Float)

    study: Mapped[StudyRow] = relationship(back_populates="fronts")
    points: Mapped[list["FrontPointRow"]] = relationship(cascade="all, delete-orphan", order_by="FrontPointRow.size")


class FrontPointRow(Base):
    __tablename__ = "qsearch_front_points"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    front_id: Mapped[int] = mapped_column(ForeignKey("qsearch_fronts.id", ondelete="CASCADE"), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    quality: Mapped[float] = mapped_column(Float)
    size: Mapped[float] = mapped_column(Float)
