"""The node's tables: received instances, studies, jobs and sends (db/node_tables.py).

Revision ID: 0003_node_tables
Revises: 0002_rollout_events
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0003_node_tables"
down_revision: str | None = "0002_rollout_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "node_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("kept", sa.Boolean(), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_node_instances_sop_instance_uid")),
    )
    with op.batch_alter_table("node_instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_node_instances_study_instance_uid"), ["study_instance_uid"], unique=False
        )

    op.create_table(
        "node_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pending", sa.Boolean(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_studies")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_node_studies_study_instance_uid")),
    )
    op.create_table(
        "node_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("stages", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("model_label", sa.String(length=256), nullable=True),
        sa.Column("output_dir", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["node_studies.id"], name=op.f("fk_node_jobs_study_id_node_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_jobs")),
        sa.UniqueConstraint("study_id", "run", name="uq_node_jobs_study_run"),
    )
    with op.batch_alter_table("node_jobs", schema=None) as batch_op:
        batch_op.create_index("ix_node_jobs_status", ["status"], unique=False)

    op.create_table(
        "node_sends",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["node_jobs.id"], name=op.f("fk_node_sends_job_id_node_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_sends")),
        sa.UniqueConstraint("job_id", "destination", "sop_instance_uid", name="uq_node_sends_job_dest_sop"),
    )
    with op.batch_alter_table("node_sends", schema=None) as batch_op:
        batch_op.create_index("ix_node_sends_status_next", ["status", "next_attempt_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("node_sends", schema=None) as batch_op:
        batch_op.drop_index("ix_node_sends_status_next")

    op.drop_table("node_sends")
    with op.batch_alter_table("node_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_node_jobs_status")

    op.drop_table("node_jobs")
    op.drop_table("node_studies")
    with op.batch_alter_table("node_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_instances_study_instance_uid"))

    op.drop_table("node_instances")
