"""Schema v1: studies (space as submitted), trials (configuration), metrics (timings among them).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qsearch_studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(512), nullable=False, unique=True),
        sa.Column("optuna_study_id", sa.Integer),
        sa.Column("spec_yaml", sa.Text, nullable=False),
        sa.Column("spec_json", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "qsearch_trials",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("qsearch_studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("optuna_trial_id", sa.Integer),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("origin", sa.String(128)),
        sa.Column("seed", sa.Integer),
        sa.Column("params_json", sa.JSON),
        sa.Column("recipe_json", sa.JSON),
        sa.Column("layers_json", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.UniqueConstraint("study_id", "number"),
    )
    op.create_index("ix_qsearch_trials_study_id", "qsearch_trials", ["study_id"])
    op.create_table(
        "qsearch_metrics",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("trial_id", sa.Integer, sa.ForeignKey("qsearch_trials.id", ondelete="CASCADE"), nullable=False),
        sa.Column("fidelity", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("value", sa.Float),
        sa.UniqueConstraint("trial_id", "fidelity", "name"),
    )
    op.create_index("ix_qsearch_metrics_trial_id", "qsearch_metrics", ["trial_id"])


def downgrade() -> None:
    op.drop_table("qsearch_metrics")
    op.drop_table("qsearch_trials")
    op.drop_table("qsearch_studies")
