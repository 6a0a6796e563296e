"""How many times a job was queued again after a run that never ended (db/node_tables.py NodeJob.requeues).

Revision ID: 0004_job_requeues
Revises: 0003_node_tables
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_job_requeues"
down_revision: str | None = "0003_node_tables"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("node_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requeues", sa.Integer(), nullable=False, server_default="0"))


#: First SQLite with ``ALTER TABLE ... DROP COLUMN``.
SQLITE_DROP_COLUMN = (3, 35, 0)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= SQLITE_DROP_COLUMN:
        # Not batch mode: its rebuild drops node_jobs, and with foreign keys on (they cannot be turned
        # off inside the migration's transaction) that fails once node_sends has rows referencing it.
        op.execute("ALTER TABLE node_jobs DROP COLUMN requeues")
        return
    with op.batch_alter_table("node_jobs", schema=None) as batch_op:
        batch_op.drop_column("requeues")
