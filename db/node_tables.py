"""The node's tables: received instances, studies, jobs and sends (issue 5).

The node keeps all of its state here so that a restart, or a second node process sharing one
PostgreSQL database, resumes where the last one stopped:

* ``node_instances`` — one row per received SOP instance (kept MR objects with their spool path;
  other storage objects are recorded with ``kept = False`` and no file, counted and never processed,
  in their study and series where the data set's bytes say them plainly: node/scp.py ``ignored_uids``).
* ``node_studies`` — one row per study with MR instances; ``last_received_at`` is the idle timer that
  survives restarts, ``pending`` says instances arrived that no job covers yet.
* ``node_jobs`` — one run of the pipeline over a study; ``status`` is queued, running, done, failed,
  skipped or review; ``stages`` holds the stage timings in seconds as JSON; ``requeues`` counts the
  runs that never ended (db/job_queue.py MAX_REQUEUES).
* ``node_sends`` — one row per (job, destination, output object): C-STORE state with retry schedule.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from db.models import Base

#: Job states.
JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "skipped", "review")
#: Send states: only ``pending`` is ever tried; ``refused`` the destination refused for good,
#: ``superseded`` a retry of the job withdrew (db/job_queue.py retry_job) while pending or refused,
#: ``dismissed`` an administrator acknowledged a refused one (db/send_queue.py dismiss_refused_sends).
SEND_STATES: tuple[str, ...] = ("pending", "done", "refused", "superseded", "dismissed")


class NodeInstance(Base):
    """A received SOP instance."""

    __tablename__ = "node_instances"
    #: Spool retention forgets ignored rows (kept false) by age every pass: without it, a scan of the
    #: whole table in a write transaction (about 1 s at 2 million rows on SQLite).
    __table_args__ = (Index("ix_node_instances_kept_received", "kept", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    #: False for an instance not processed (no path), and for one whose file spool retention is
    #: removing (its path still set until the row is forgotten: db/retention.py begin_removal).
    kept: Mapped[bool] = mapped_column(Boolean)
    path: Mapped[str | None] = mapped_column(Text)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class NodeStudy(Base):
    """A study with at least one kept (MR) instance."""

    __tablename__ = "node_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    pending: Mapped[bool] = mapped_column(Boolean, default=True)
    runs: Mapped[int] = mapped_column(Integer, default=0)


class NodeJob(Base):
    """One run of the pipeline over a study."""

    __tablename__ = "node_jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "run", name="uq_node_jobs_study_run"),
        Index("ix_node_jobs_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("node_studies.id"))
    run: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    stages: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    #: Times the job was queued again after a run that never ended (its node stopped, or lost the
    #: database, mid-run); at ``db.job_queue.MAX_REQUEUES`` it ends ``failed`` instead.
    requeues: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    owner: Mapped[str | None] = mapped_column(String(128))
    model_id: Mapped[int | None] = mapped_column(Integer)
    model_label: Mapped[str | None] = mapped_column(String(256))
    output_dir: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NodeSend(Base):
    """Delivery of one output object of a job to one destination."""

    __tablename__ = "node_sends"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", "sop_instance_uid", name="uq_node_sends_job_dest_sop"),
        Index("ix_node_sends_status_next", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("node_jobs.id"))
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
