"""An index on node_instances (kept, received_at) for spool retention's forgetting of ignored rows.

db/retention.py forget_ignored_instances deletes, every retention pass, the oldest rows of instances
acknowledged and not kept. Without the index each pass scanned the whole table inside a write
transaction (about 1 s at 2 million rows on SQLite), holding up the receivers' commits.

Revision ID: 0005_instances_kept_index
Revises: 0004_job_requeues
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_instances_kept_index"
down_revision: str | None = "0004_job_requeues"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_node_instances_kept_received", "node_instances", ["kept", "received_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_node_instances_kept_received", table_name="node_instances")
