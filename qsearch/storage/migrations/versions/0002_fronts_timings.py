"""Schema v2: Pareto-front snapshots with hypervolume, a timings table, and the seeding claim.

v1 stored timings as metrics named ``*_seconds`` (fidelity ``timing``); they move to
``qsearch_timings`` here so that metric queries return measurements only.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qsearch_timings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("trial_id", sa.Integer, sa.ForeignKey("qsearch_trials.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.UniqueConstraint("trial_id", "name"),
    )
    op.create_index("ix_qsearch_timings_trial_id", "qsearch_timings", ["trial_id"])
    op.execute(
        "INSERT INTO qsearch_timings (trial_id, name, seconds) "
        "SELECT trial_id, name, value FROM qsearch_metrics "
        "WHERE fidelity = 'timing' AND value IS NOT NULL"
    )
    op.execute("DELETE FROM qsearch_metrics WHERE fidelity = 'timing'")
    op.create_table(
        "qsearch_fronts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("qsearch_studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("n_complete", sa.Integer, nullable=False),
        sa.Column("quality_metric", sa.String(64), nullable=False),
        sa.Column("size_metric", sa.String(64), nullable=False),
        sa.Column("hypervolume", sa.Float, nullable=False),
        sa.Column("ref_quality", sa.Float, nullable=False),
        sa.Column("ref_size", sa.Float, nullable=False),
    )
    op.create_index("ix_qsearch_fronts_study_id", "qsearch_fronts", ["study_id"])
    op.create_table(
        "qsearch_front_points",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("front_id", sa.Integer, sa.ForeignKey("qsearch_fronts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("trial_number", sa.Integer, nullable=False),
        sa.Column("quality", sa.Float, nullable=False),
        sa.Column("size", sa.Float, nullable=False),
    )
    op.create_index("ix_qsearch_front_points_front_id", "qsearch_front_points", ["front_id"])
    with op.batch_alter_table("qsearch_studies") as batch:
        batch.add_column(sa.Column("seeded_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("qsearch_studies") as batch:
        batch.drop_column("seeded_at")
    op.drop_table("qsearch_front_points")
    op.drop_table("qsearch_fronts")
    op.execute(
        "INSERT INTO qsearch_metrics (trial_id, fidelity, name, value) "
        "SELECT trial_id, 'timing', name, seconds FROM qsearch_timings"
    )
    op.drop_table("qsearch_timings")
