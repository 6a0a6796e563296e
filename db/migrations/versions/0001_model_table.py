"""The model table: one row per model artifact, and the files of each artifact.

Revision ID: 0001_model_table
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_model_table"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=100), nullable=False),
        sa.Column("task", sa.String(length=50), nullable=False),
        sa.Column("modalities", sa.JSON(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("precision", sa.String(length=10), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("calibration", sa.JSON(), nullable=True),
        sa.Column("training", sa.JSON(), nullable=True),
        sa.Column("card", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('checkpoint', 'onnx', 'ir')", name=op.f("ck_models_kind")),
        sa.CheckConstraint("precision IN ('fp32', 'fp16', 'int8')", name=op.f("ck_models_precision")),
        sa.CheckConstraint("status IN ('candidate', 'active', 'retired')", name=op.f("ck_models_status")),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["models.id"], name=op.f("fk_models_parent_id_models"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", "version", "kind", "precision", name="uq_models_artifact"),
    )
    op.create_index(op.f("ix_models_parent_id"), "models", ["parent_id"], unique=False)
    op.create_table(
        "model_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("size >= 0", name=op.f("ck_model_files_size")),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_model_files_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_files")),
        sa.UniqueConstraint("model_id", "path", name="uq_model_files_model_path"),
    )
    op.create_index(op.f("ix_model_files_model_id"), "model_files", ["model_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_model_files_model_id"), table_name="model_files")
    op.drop_table("model_files")
    op.drop_index(op.f("ix_models_parent_id"), table_name="models")
    if op.get_bind().dialect.name == "sqlite":
        # With foreign keys on, SQLite's DROP TABLE first deletes the rows one by one, and deleting a
        # model that another row names as its parent (ON DELETE RESTRICT) fails.
        op.execute("UPDATE models SET parent_id = NULL")
    op.drop_table("models")
