"""SQLAlchemy 2 models of the model table and its audit trail.

Tables
------
``models``
    One row per model artifact (checkpoint, ONNX, OpenVINO IR at a precision) with its lineage
    (``parent_id``: INT8 IR -> FP32 IR -> ONNX -> checkpoint), metrics, calibration, training
    record, model card and status (candidate / active / retired). At most one row per task is
    ``active``; the database enforces it with the partial unique index
    ``uq_models_one_active_per_task`` (``WHERE status = 'active'``, SQLite and PostgreSQL).
``model_files``
    The files of each artifact: absolute path, sha256 (hex) and size in bytes.
``rollout_events``
    The audit trail: promotions, rollbacks, retirements and refused promotions, with who, when,
    from which active model to which, why, and whether the gates were overridden.

The node's own tables live in :mod:`db.node_tables` (same :class:`Base`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Tasks a model can solve (DESIGN.md, "Model card"): the segmentation tasks, and the node's brain
#: extractor (its own task, so that it has its own active model and rollout).
TASKS: tuple[str, ...] = ("whole_tumor", "brats_regions", "brain_extraction")
#: Tasks whose models segment tumours (what ``[node] task`` may name).
SEGMENTATION_TASKS: tuple[str, ...] = ("whole_tumor", "brats_regions")
#: Artifact kinds, in lineage order.
KINDS: tuple[str, ...] = ("checkpoint", "onnx", "ir")
#: Numeric precisions of an artifact.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
#: Model statuses.
STATUSES: tuple[str, ...] = ("candidate", "active", "retired")
#: Kinds the node can run, hence the only kinds that may become active.
RUNNABLE_KINDS: tuple[str, ...] = ("ir",)
#: Actions in the audit trail.
ACTIONS: tuple[str, ...] = ("register", "promote", "rollback", "retire", "refused")
#: Longest ``models.name``, ``models.version`` and ``rollout_events.actor`` (checked before the database:
#: PostgreSQL refuses a longer value, SQLite would store it).
NAME_MAX = 200
VERSION_MAX = 100
ACTOR_MAX = 200
#: Largest id of a row (``Integer``: 32 bits on PostgreSQL, which refuses a larger literal).
ID_MAX = 2**31 - 1

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of every segnode table (naming convention fixed for stable migrations)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}  # noqa: RUF012


class Model(Base):
    """One model artifact: a row of the model table."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("name", "version", "kind", "precision", name="uq_models_artifact"),
        CheckConstraint(_in("kind", KINDS), name="kind"),
        CheckConstraint(_in("precision", PRECISIONS), name="precision"),
        CheckConstraint(_in("status", STATUSES), name="status"),
        Index(
            "uq_models_one_active_per_task",
            "task",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    version: Mapped[str] = mapped_column(String(VERSION_MAX))
    task: Mapped[str] = mapped_column(String(50))
    modalities: Mapped[list[str]] = mapped_column(JSON)
    kind: Mapped[str] = mapped_column(String(20))
    precision: Mapped[str] = mapped_column(String(10))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="candidate")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    calibration: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    training: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    files: Mapped[list[ModelFile]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="ModelFile.position"
    )

    def __repr__(self) -> str:
        return f"<Model #{self.id} {self.name} {self.version} {self.kind}/{self.precision} {self.status}>"


class ModelFile(Base):
    """One file of a model artifact, with the checksum recorded when it was registered."""

    __tablename__ = "model_files"
    __table_args__ = (
        UniqueConstraint("model_id", "path", name="uq_model_files_model_path"),
        CheckConstraint("size >= 0", name="size"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)

    model: Mapped[Model] = relationship(back_populates="files")


class RolloutEvent(Base):
    """One entry of the audit trail.

    ``from_model_id`` / ``to_model_id`` per action:

    * ``register``: None -> the newly registered model (import or trainer).
    * ``promote``: the task's active model before (None if none) -> the promoted model.
    * ``rollback``: the active model rolled back from -> the previous active model re-activated.
    * ``retire``: the retired model -> None.
    * ``refused``: the task's active model at the time (unchanged) -> the model whose promotion
      was refused; ``reason`` says why (a failed gate, or a concurrent change).
    """

    __tablename__ = "rollout_events"
    __table_args__ = (CheckConstraint(_in("action", ACTIONS), name="action"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(50), index=True)
    action: Mapped[str] = mapped_column(String(20))
    from_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    to_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    actor: Mapped[str] = mapped_column(String(ACTOR_MAX))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")
    forced: Mapped[bool] = mapped_column(default=False)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    def __repr__(self) -> str:
        return f"<RolloutEvent #{self.id} {self.action} {self.task} {self.from_model_id}->{self.to_model_id}>"
