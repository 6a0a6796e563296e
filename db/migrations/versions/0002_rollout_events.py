"""The rollout audit trail, and at most one active model per task (partial unique index).

Revision ID: 0002_rollout_events
Revises: 0001_model_table
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_rollout_events"
down_revision: str | None = "0001_model_table"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=50), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("from_model_id", sa.Integer(), nullable=True),
        sa.Column("to_model_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.CheckConstraint(
            "action IN ('register', 'promote', 'rollback', 'retire', 'refused')",
            name=op.f("ck_rollout_events_action"),
        ),
        sa.ForeignKeyConstraint(
            ["from_model_id"],
            ["models.id"],
            name=op.f("fk_rollout_events_from_model_id_models"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["to_model_id"],
            ["models.id"],
            name=op.f("fk_rollout_events_to_model_id_models"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollout_events")),
    )
    op.create_index(op.f("ix_rollout_events_task"), "rollout_events", ["task"], unique=False)
    # Exactly one active model per task, enforced by the database (SQLite and PostgreSQL both
    # support partial indexes).
    op.create_index(
        "uq_models_one_active_per_task",
        "models",
        ["task"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )


def downgrade() -> None:
    op.drop_index("uq_models_one_active_per_task", table_name="models")
    op.drop_index(op.f("ix_rollout_events_task"), table_name="rollout_events")
    op.drop_table("rollout_events")
