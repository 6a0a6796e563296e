"""Spool retention: which studies' received instances may leave the spool, and forgetting their rows.

A study's spool files are kept until its result has been delivered: the study is not pending, no
instance of it arrived since the cut-off, its latest run's job is ``done`` (a job held for review
counts once an administrator released it) and finished before the cut-off, no run of it is queued or
running, and every send of that job is done. A failed, skipped or held study keeps its files for
``segnode jobs retry``. The node (node/spool_retention.py) removes the files first and forgets the
rows after, so a crash in between leaves rows that the next pass removes again; an instance the PACS
sends again once its row is forgotten is a new instance of a new run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, exists, func, select

from db.node_tables import NodeInstance, NodeJob, NodeSend, NodeStudy
from db.transactions import SessionFactory, as_utc, database_errors, writing


@dataclass(frozen=True)
class DeliveredStudy:
    """A study whose result was delivered before the cut-off, with the rows of its instances."""

    study_instance_uid: str
    job_id: int
    finished_at: datetime
    instance_ids: tuple[int, ...]
    #: Spool paths of its kept instances (ignored instances have none).
    paths: tuple[str, ...]


@database_errors
def delivered_studies(sf: SessionFactory, before: datetime, limit: int = 50) -> list[DeliveredStudy]:
    """Up to ``limit`` studies whose instances may leave the spool (see the module docstring), oldest
    delivery first; ``before`` is the cut-off (now minus the retention time)."""
    cutoff = as_utc(before)
    assert cutoff is not None
    found: list[DeliveredStudy] = []
    with sf() as s:
        studies = s.scalars(
            select(NodeStudy)
            .where(
                NodeStudy.pending.is_(False),
                NodeStudy.last_received_at < before,
                exists().where(NodeInstance.study_instance_uid == NodeStudy.study_instance_uid),
            )
            .order_by(NodeStudy.last_received_at)
        ).all()
        for study in studies:
            jobs = s.scalars(
                select(NodeJob)
                .where(NodeJob.study_id == study.id)
                .order_by(NodeJob.run.desc(), NodeJob.id.desc())
            ).all()
            if not jobs or any(job.status in ("queued", "running") for job in jobs):
                continue
            latest = jobs[0]
            finished = as_utc(latest.finished_at)
            if latest.status != "done" or finished is None or finished >= cutoff:
                continue
            undelivered = s.scalar(
                select(func.count(NodeSend.id)).where(NodeSend.job_id == latest.id, NodeSend.status != "done")
            )
            if undelivered:
                continue
            rows = s.execute(
                select(NodeInstance.id, NodeInstance.path)
                .where(NodeInstance.study_instance_uid == study.study_instance_uid)
                .order_by(NodeInstance.id)
            ).all()
            found.append(
                DeliveredStudy(
                    study_instance_uid=study.study_instance_uid,
                    job_id=latest.id,
                    finished_at=finished,
                    instance_ids=tuple(int(i) for i, _ in rows),
                    paths=tuple(str(p) for _, p in rows if p),
                )
            )
            if len(found) >= limit:
                break
    return sorted(found, key=lambda d: d.finished_at)


@database_errors
def forget_instances(sf: SessionFactory, instance_ids: tuple[int, ...]) -> int:
    """Delete these instance rows (their spool files are gone); returns how many were deleted.

    Only the rows read by :func:`delivered_studies`: an instance received since then has a row of
    its own and stays.
    """
    deleted = 0
    with writing(sf) as s:
        for start in range(0, len(instance_ids), 500):  # bound the statement's parameters
            chunk = instance_ids[start : start + 500]
            result = s.execute(delete(NodeInstance).where(NodeInstance.id.in_(chunk)))
            deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted
