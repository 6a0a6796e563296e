"""Spool retention: which studies' received instances may leave the spool, and forgetting their rows.

Two rules, each with its own cut-off:

* **delivered**: the study's latest run's job is ``done`` (a job held for review counts once an
  administrator released it) and finished before the delivered cut-off, and every send of that job is
  done, or refused and dismissed by an administrator (of the latest done run that queued sends, when
  that job sent nothing again because its inputs were unchanged); a send refused and not dismissed
  keeps the study as a pending one does, for ``segnode jobs retry``. A study none of whose runs queued
  a send (no ``[[destinations]]``) leaves by this rule too, but the outputs of its ``done`` runs stay
  in the jobs directory: they are the only copy of its result;
* **failed or skipped**: the latest run's job ended ``failed`` or ``skipped`` (nothing was sent) before
  the failed cut-off, so that ``segnode jobs retry`` had that long to use the files.

Either way the study is not pending, no instance of it arrived since the cut-off and no run of it is
queued or running. A study with a job held for review (``review``) that no later run supersedes
(:func:`db.job_queue.held_for_release`, which ``segnode jobs retry ID --send-anyway`` may still send,
even when a later run failed or was skipped), or with a send still pending, keeps its files.
The node (node/spool_retention.py) finds the studies (:func:`removable_studies`, a read), then per
study takes it out of use in one transaction (:func:`begin_removal`: checked again, its instance rows
marked not kept, so a ``segnode jobs retry`` accepted since is seen and one arriving after is refused),
removes the files, and forgets the rows last; a crash in between leaves marked rows that the next
pass removes again. An instance the PACS sends again while its row is marked is refused with a transient
status (:func:`db.instances.instance_replaced` and :func:`db.instances.instance_kept` tell node/scp.py),
since the pass removes its file and row; once its row is forgotten, the PACS's resend is a new instance
of a new run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, exists, select, update
from sqlalchemy.orm import Session

from db.job_queue import held_for_release
from db.node_tables import NodeInstance, NodeJob, NodeSend, NodeStudy
from db.transactions import SessionFactory, as_utc, database_errors, writing

#: Latest-run job states whose study may leave the spool under the failed cut-off.
UNSENT_END_STATES: tuple[str, ...] = ("failed", "skipped")
#: Send states of a result not delivered: on its way, or refused for good and not dismissed.
UNDELIVERED_SEND_STATES: tuple[str, ...] = ("pending", "refused")


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
    #: Its jobs (every run) with no send pending: their outputs (SEG, SR, preview) may go too (a refused
    #: send of an earlier run is superseded by the later one);
    #: not those of its ``done`` runs when none of its runs queued a send (their only copy).
    finished_job_ids: tuple[int, ...] = ()
    #: For a ``done`` study, what became of its result: ``delivered`` (every send acknowledged),
    #: ``dismissed`` (a destination refused it and an administrator dismissed the refusal) or ``unsent``
    #: (no run queued a send: no destinations; its outputs stay); empty else.
    delivery: str = ""


def _cutoffs(delivered_before: datetime | None, failed_before: datetime | None) -> dict[str, datetime | None]:
    """Per latest-run job state, the cut-off its study's end must precede (None: that rule is off)."""
    return {"done": as_utc(delivered_before)} | dict.fromkeys(UNSENT_END_STATES, as_utc(failed_before))


def _removable(s: Session, study: NodeStudy, cutoffs: dict[str, datetime | None]) -> RemovableStudy | None:
    """``study`` as a :class:`RemovableStudy` when its instances may leave the spool under ``cutoffs``
    (see the module docstring), else None."""
    active = [c for c in cutoffs.values() if c is not None]
    received = as_utc(study.last_received_at)
    if study.pending or not active or received is None or received >= max(active):
        return None
    jobs = s.scalars(
        select(NodeJob).where(NodeJob.study_id == study.id).order_by(NodeJob.run.desc(), NodeJob.id.desc())
    ).all()
    if not jobs or any(job.status in ("queued", "running") for job in jobs):
        return None
    if s.scalar(select(NodeJob.id).where(NodeJob.study_id == study.id, held_for_release()).limit(1)):
        return None  # a held result an administrator may still send: its outputs must stay
    latest = jobs[0]
    cutoff = cutoffs.get(latest.status)
    finished = as_utc(latest.finished_at)
    if cutoff is None or finished is None or finished >= cutoff or received >= cutoff:
        return None  # not ended long enough ago, or instances came after this rule's cut-off
    # A send refused for good is not tried again, but its result was not delivered: the study stays
    # for `segnode jobs retry` until an administrator dismisses the refusal (`segnode jobs dismiss`).
    sends = s.execute(
        select(NodeSend.job_id, NodeSend.status).where(NodeSend.job_id.in_([j.id for j in jobs]))
    ).all()
    sending = {job_id for job_id, status in sends if status in UNDELIVERED_SEND_STATES}
    # Outputs a sender may still read: those of runs with a send pending. An earlier run's refusal is
    # superseded by the later run (only the latest run can be retried): its outputs go with the study.
    pending = {job_id for job_id, status in sends if status == "pending"}
    queued = {job_id for job_id, _ in sends}
    # No run of the study queued a send (no [[destinations]]): its done runs' outputs are the only copy
    # of its result, which the node said stays in the jobs directory; only the spool files go.
    only_copies = set() if queued else {j.id for j in jobs if j.status == "done"}
    delivery = ""
    if latest.status == "done" and not queued:
        delivery = "unsent"
    elif latest.status == "done":
        # A latest run over unchanged inputs sent nothing again (node/pipeline.py): the study's result
        # is that of the last run with sends queued, which may still be on its way.
        delivering = next((j.id for j in jobs if j.status == "done" and j.id in queued), latest.id)
        if delivering in sending:
            return None  # not delivered yet, or refused and not dismissed
        dismissed = (delivering, "dismissed") in {tuple(send) for send in sends}
        delivery = "dismissed" if dismissed else "delivered"
    rows = s.execute(
        select(NodeInstance.id, NodeInstance.path)
        .where(NodeInstance.study_instance_uid == study.study_instance_uid)
        .order_by(NodeInstance.id)
    ).all()
    if not rows:
        return None
    return RemovableStudy(
        study_instance_uid=study.study_instance_uid,
        job_id=latest.id,
        status=latest.status,
        finished_at=finished,
        instance_ids=tuple(int(i) for i, _ in rows),
        paths=tuple(str(p) for _, p in rows if p),
        finished_job_ids=tuple(sorted(j.id for j in jobs if j.id not in pending | only_copies)),
        delivery=delivery,
    )


@database_errors
def removable_studies(
    sf: SessionFactory,
    delivered_before: datetime | None,
    failed_before: datetime | None = None,
    limit: int = 50,
) -> list[RemovableStudy]:
    """Up to ``limit`` studies whose instances may leave the spool (see the module docstring), oldest
    end first. ``delivered_before`` and ``failed_before`` are the two rules' cut-offs (now minus each
    retention time); None turns a rule off.

    A read: before removing anything of a study, :func:`begin_removal` checks it again."""
    cutoffs = _cutoffs(delivered_before, failed_before)
    active = [c for c in cutoffs.values() if c is not None]
    if not active:
        return []
    found: list[RemovableStudy] = []
    with sf() as s:
        studies = s.scalars(
            select(NodeStudy)
            .where(
                NodeStudy.pending.is_(False),
                NodeStudy.last_received_at < max(active),
                exists().where(NodeInstance.study_instance_uid == NodeStudy.study_instance_uid),
            )
            .order_by(NodeStudy.last_received_at)
        ).all()
        for study in studies:
            removable = _removable(s, study, cutoffs)
            if removable is not None:
                found.append(removable)
                if len(found) >= limit:
                    break
    return sorted(found, key=lambda d: d.finished_at)


@database_errors
def begin_removal(
    sf: SessionFactory,
    study_instance_uid: str,
    delivered_before: datetime | None,
    failed_before: datetime | None = None,
) -> RemovableStudy | None:
    """Take a study that :func:`removable_studies` found out of use, before its files are removed; None
    (nothing changed) when it is no longer removable under the same cut-offs.

    In one transaction: the study is checked again (a ``segnode jobs retry`` or a new instance may have
    come since it was found) and its instance rows are marked not kept, so that from the commit on a
    retry of its jobs is refused (its instances have left the spool) and no new run counts them. The
    caller then removes the files and :func:`forget_instances` the rows; a crash in between leaves
    marked rows, which the next pass finds and removes again. The rows are locked (on PostgreSQL) and
    :func:`db.job_queue.retry_job` locks the study row too, so the two exclude each other.
    """
    cutoffs = _cutoffs(delivered_before, failed_before)
    with writing(sf) as s:
        # The instance rows before the study row, the order in which a move of an instance locks them.
        s.execute(
            select(NodeInstance.id)
            .where(NodeInstance.study_instance_uid == study_instance_uid)
            .order_by(NodeInstance.id)
            .with_for_update()
        ).all()
        study = s.scalar(
            select(NodeStudy).where(NodeStudy.study_instance_uid == study_instance_uid).with_for_update()
        )
        removable = _removable(s, study, cutoffs) if study is not None else None
        if removable is None:
            return None
        for start in range(0, len(removable.instance_ids), 500):  # bound the statement's parameters
            chunk = removable.instance_ids[start : start + 500]
            s.execute(update(NodeInstance).where(NodeInstance.id.in_(chunk)).values(kept=False))
    return removable


@database_errors
def forget_instances(sf: SessionFactory, instance_ids: tuple[int, ...]) -> int:
    """Delete these instance rows (their spool files are gone); returns how many were deleted.

    Only the rows :func:`begin_removal` took out of use: an instance received since then has a row
    of its own and stays.
    """
    deleted = 0
    with writing(sf) as s:
        for start in range(0, len(instance_ids), 500):  # bound the statement's parameters
            chunk = instance_ids[start : start + 500]
            result = s.execute(delete(NodeInstance).where(NodeInstance.id.in_(chunk)))
            deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted


@database_errors
def forget_ignored_instances(sf: SessionFactory, received_before: datetime, limit: int = 1000) -> int:
    """Delete up to ``limit`` rows of instances the node acknowledged without keeping them (a SOP class
    it does not process, a CT routed to it: node/scp.py ``_ignore``; no file, no study row, no job)
    received before ``received_before``; returns how many were deleted, oldest first.

    Nothing reads these rows but the duplicate count of a resend (one sent again after its row went
    counts as ignored again): without this, a PACS routing every study to the node grows the table
    without bound. A row that spool retention marked not kept still has its path and is left to it
    (:func:`begin_removal`).
    """
    with writing(sf) as s:
        ids = s.scalars(
            select(NodeInstance.id)
            .where(
                NodeInstance.kept.is_(False),
                NodeInstance.path.is_(None),
                NodeInstance.received_at < as_utc(received_before),
            )
            .order_by(NodeInstance.received_at)  # the index's order (ix_node_instances_kept_received)
            .limit(limit)
        ).all()
        if ids:
            s.execute(delete(NodeInstance).where(NodeInstance.id.in_(ids)))
    return len(ids)
