"""Spool retention: which studies' received instances may leave the spool, and forgetting their rows.

Two rules, each with its own cut-off:

* **delivered**: the study's latest run's job is ``done`` (a job held for review counts once an
  administrator released it) and finished before the delivered cut-off, and every send of that job is
  done;
* **failed or skipped**: the latest run's job ended ``failed`` or ``skipped`` (nothing was sent) before
  the failed cut-off, so that ``segnode jobs retry`` had that long to use the files.

Either way the study is not pending, no instance of it arrived since the cut-off and no run of it is
queued or running. A study held for review (``review``) or with a send still pending keeps its files.
The node (node/spool_retention.py) removes the files first and forgets the rows after, so a crash in
between leaves rows that the next pass removes again; an instance the PACS sends again once its row
is forgotten is a new instance of a new run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, exists, func, select

from db.node_tables import NodeInstance, NodeJob, NodeSend, NodeStudy
from db.transactions import SessionFactory, as_utc, database_errors, writing

#: Latest-run job states whose study may leave the spool under the failed cut-off.
UNSENT_END_STATES: tuple[str, ...] = ("failed", "skipped")


@dataclass(frozen=True)
class RemovableStudy:
    """A study whose received instances may leave the spool, with the rows of its instances."""

    study_instance_uid: str
    job_id: int
    #: Its latest run's job state: ``done`` (delivered), ``failed`` or ``skipped``.
    status: str
    finished_at: datetime
    instance_ids: tuple[int, ...]
    #: Spool paths of its kept instances (ignored instances have none).
    paths: tuple[str, ...]
    #: Its jobs (every run) with no send pending: their outputs (SEG, SR, preview) may go too.
    finished_job_ids: tuple[int, ...] = ()


@database_errors
def removable_studies(
    sf: SessionFactory,
    delivered_before: datetime | None,
    failed_before: datetime | None = None,
    limit: int = 50,
) -> list[RemovableStudy]:
    """Up to ``limit`` studies whose instances may leave the spool (see the module docstring), oldest
    end first. ``delivered_before`` and ``failed_before`` are the two rules' cut-offs (now minus each
    retention time); None turns a rule off."""
    cutoffs = {"done": as_utc(delivered_before)} | dict.fromkeys(UNSENT_END_STATES, as_utc(failed_before))
    active = [c for c in cutoffs.values() if c is not None]
    if not active:
        return []
    latest_cutoff = max(active)
    found: list[RemovableStudy] = []
    with sf() as s:
        studies = s.scalars(
            select(NodeStudy)
            .where(
                NodeStudy.pending.is_(False),
                NodeStudy.last_received_at < latest_cutoff,
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
            cutoff = cutoffs.get(latest.status)
            finished = as_utc(latest.finished_at)
            if cutoff is None or finished is None or finished >= cutoff:
                continue
            received = as_utc(study.last_received_at)
            if received is not None and received >= cutoff:
                continue  # instances came after this rule's cut-off
            pending = NodeSend.status == "pending"  # a send refused for good will not be tried again
            if latest.status == "done" and s.scalar(
                select(func.count(NodeSend.id)).where(NodeSend.job_id == latest.id, pending)
            ):
                continue  # not delivered yet
            rows = s.execute(
                select(NodeInstance.id, NodeInstance.path)
                .where(NodeInstance.study_instance_uid == study.study_instance_uid)
                .order_by(NodeInstance.id)
            ).all()
            sending = set(
                s.scalars(
                    select(NodeSend.job_id).where(NodeSend.job_id.in_([j.id for j in jobs]), pending)
                ).all()
            )
            found.append(
                RemovableStudy(
                    study_instance_uid=study.study_instance_uid,
                    job_id=latest.id,
                    status=latest.status,
                    finished_at=finished,
                    instance_ids=tuple(int(i) for i, _ in rows),
                    paths=tuple(str(p) for _, p in rows if p),
                    finished_job_ids=tuple(sorted(j.id for j in jobs if j.id not in sending)),
                )
            )
            if len(found) >= limit:
                break
    return sorted(found, key=lambda d: d.finished_at)


@database_errors
def forget_instances(sf: SessionFactory, instance_ids: tuple[int, ...]) -> int:
    """Delete these instance rows (their spool files are gone); returns how many were deleted.

    Only the rows read by :func:`removable_studies`: an instance received since then has a row of
    its own and stays.
    """
    deleted = 0
    with writing(sf) as s:
        for start in range(0, len(instance_ids), 500):  # bound the statement's parameters
            chunk = instance_ids[start : start + 500]
            result = s.execute(delete(NodeInstance).where(NodeInstance.id.in_(chunk)))
            deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted
