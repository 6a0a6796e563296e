"""The job queue: one job per run of the pipeline over a complete study.

Job claiming is atomic so that several node processes can share one database: on PostgreSQL the
candidate row is taken with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite (one writer at a time)
a conditional ``UPDATE ... WHERE status = 'queued'`` whose row count is checked. A job is claimable
only when its study is idle (``pending`` false), so a job never sees half a study, and only when no
other run of its study is running or queued ahead of it (a lower id): a study's runs run one at a
time, in order, whatever the number of workers and nodes. Otherwise an older run (fewer instances)
could end after a newer one and queue its stale result to the PACS last, and two runs would share
the study's CPU and spool files. A run queued ahead holds it back too: on PostgreSQL another node's
claim skips that run's row while a node is claiming it (locked, still ``queued`` to others), and must
not take the later run meanwhile. A dead node's run holds its study only until :func:`requeue_stale`
takes it back.

Jobs left ``running`` by a process that died are queued again by :func:`requeue_stale`: at start,
every running job owned by this host whose process id no longer exists, and on any host a job whose
heartbeat is older than ``stale_seconds``, its owner alive or not (a hung run). A run heartbeats and
ends its job only at its own claim (:class:`Claim`: owner and attempt), so a run superseded this
way, even one in the process that claimed the job again, can never end it. A job whose run itself
stops the node (the kernel's OOM killer, a crash in a native library) would be queued again at every
start and, the oldest, claimed first every time: after :data:`MAX_REQUEUES` such re-queues it ends
``failed`` instead, with a reason that names ``segnode jobs retry`` (which resets the count). A run
cut short by a database fault stays ``running`` until the database answers; then its process queues
it again (:func:`requeue_interrupted`, counted the same way).

Jobs are created by :func:`db.instances.schedule_due_studies`; a finished job queues its sends
(:mod:`db.send_queue`) in the transaction that ends it.

States: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``skipped`` | ``review``; a run whose
chosen series has fewer images than its headers announce goes back to ``queued`` (:func:`defer_job`)
to wait for the rest, for at most ``[node] incomplete_series_wait_seconds`` (node/pipeline.py). A ``review``
job wrote its outputs but failed a check before sending (node/qc.py): nothing is queued until an
administrator releases it (:func:`release_job`), which queues the sends of the outputs already
written and marks it ``done``, recording who released it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, literal, select, update
from sqlalchemy.orm import Session, aliased

from db.exceptions import JobNotFoundError, JobStateError
from db.node_tables import NodeInstance, NodeJob, NodeSend, NodeStudy
from db.send_queue import SendInfo, send_info
from db.transactions import SessionFactory, as_utc, database_errors, utcnow, writing

logger = logging.getLogger(__name__)


def owner_id() -> str:
    """``host:pid`` of this process, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: The states a job can end in.
FINAL_STATES = ("done", "failed", "skipped", "review")

#: Runs of a job that may end without the job ending (its node stopped mid-run) before it ends
#: ``failed``: a study that crashes the node must not crash-loop it and hold up every later study.
MAX_REQUEUES = 3


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one job row."""

    id: int
    study_instance_uid: str
    run: int
    status: str
    reason: str
    stages: dict[str, Any]
    attempts: int
    instance_count: int
    owner: str | None
    model_label: str | None
    output_dir: str | None
    result: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    sends: list[SendInfo] = field(default_factory=list)
    #: Runs that never ended (see :data:`MAX_REQUEUES`).
    requeues: int = 0


@dataclass(frozen=True)
class OutputObject:
    """A file a job produced, to be sent to every destination."""

    path: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Claim:
    """One claim of a job: its id and the claim's attempt number (``attempts`` after the claim).

    Every worker thread of a process records the same owner (``host:pid``), so the owner alone does
    not tell one run of a job from the next: a run heartbeats and ends its job with its claim's
    attempt, and once the job is claimed again (re-queued behind a slow or hung run's back, even by
    another thread of the same process) the superseded run can neither keep it alive nor end it.
    """

    job_id: int
    attempt: int


def claim_job(sf: SessionFactory, owner: str | None = None, now: datetime | None = None) -> int | None:
    """Atomically take the oldest claimable queued job and mark it running; None when there is none.

    A run of the job needs its claim's attempt as well: see :func:`claim`.
    """
    claimed = claim(sf, owner, now)
    return claimed.job_id if claimed is not None else None


@database_errors
def claim(sf: SessionFactory, owner: str | None = None, now: datetime | None = None) -> Claim | None:
    """Atomically take the oldest claimable queued job and mark it running; None when there is none.

    A job whose study has another run running, or queued with a lower id, is not claimable: see the
    module's doc."""
    owner = owner or owner_id()
    now = now or utcnow()
    other = aliased(NodeJob)
    # Another run of the study running, or queued ahead: the job waits for it (see the module's doc).
    ahead = select(other.id).where(
        other.study_id == NodeJob.study_id,
        other.id != NodeJob.id,
        (other.status == "running") | ((other.status == "queued") & (other.id < NodeJob.id)),
    )
    candidates = (
        select(NodeJob.id, NodeJob.attempts)
        .join(NodeStudy, NodeStudy.id == NodeJob.study_id)
        .where(NodeJob.status == "queued", NodeStudy.pending.is_(False), ~ahead.exists())
        .order_by(NodeJob.id)
        .limit(1)
    )
    with sf() as s:  # a cheap read first: no write lock while there is nothing to claim
        if s.scalar(candidates) is None:
            return None
    for _ in range(20):
        with writing(sf) as s:
            postgres = s.get_bind().dialect.name == "postgresql"
            query = candidates.with_for_update(skip_locked=True, of=NodeJob) if postgres else candidates
            row = s.execute(query).first()
            if row is None:
                return None
            job_id, attempt = int(row.id), int(row.attempts or 0) + 1
            count = s.scalar(
                select(func.count(NodeInstance.id))
                .join(NodeStudy, NodeStudy.study_instance_uid == NodeInstance.study_instance_uid)
                .join(NodeJob, NodeJob.study_id == NodeStudy.id)
                .where(NodeJob.id == job_id, NodeInstance.kept.is_(True))
            )  # the instances this run covers: see _job_instances
            changed = s.execute(
                update(NodeJob)
                .where(NodeJob.id == job_id, NodeJob.status == "queued", NodeJob.attempts == attempt - 1)
                .values(
                    status="running",
                    owner=owner,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=attempt,
                    instance_count=count or 0,
                )
            ).rowcount  # type: ignore[attr-defined]
            if changed == 1:
                return Claim(job_id, attempt)
    return None


def _ours(job_id: int, attempt: int | None) -> Any:
    """The job's row while it is running under this process (and at claim ``attempt``, when given)."""
    where = (NodeJob.id == job_id) & (NodeJob.status == "running") & (NodeJob.owner == owner_id())
    return where if attempt is None else where & (NodeJob.attempts == attempt)


@database_errors
def heartbeat(
    sf: SessionFactory, job_id: int, now: datetime | None = None, *, attempt: int | None = None
) -> bool:
    """Mark a running job of this process alive; False (nothing written) when it is no longer running
    under this process, or (``attempt`` given: the run's :attr:`Claim.attempt`) no longer at that
    claim: the run was superseded and should stop."""
    with writing(sf) as s:
        changed = s.execute(
            update(NodeJob).where(_ours(job_id, attempt)).values(heartbeat_at=now or utcnow())
        ).rowcount  # type: ignore[attr-defined]
    return bool(changed == 1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@database_errors
def requeue_stale(
    sf: SessionFactory, stale_seconds: float = 120.0, *, at_start: bool = False, now: datetime | None = None
) -> list[int]:
    """Queue again the running jobs whose process died; returns their ids.

    A job counts as abandoned when its owner is on this host and that pid is gone (or, with
    ``at_start``, is this very process: a restarted container may get the same pid), or when its
    heartbeat is older than ``stale_seconds``, whatever its owner.

    A live owner on this host, this very process included, is not spared: its run may be hung (a
    worker thread stuck in a native library or on a dead file system), and sparing it would hold its
    study until the node restarts. Re-queuing it is safe because a run heartbeats and ends its job only
    at its own claim's attempt (:class:`Claim`): the superseded run, owner ``host:pid`` though it
    shares with the next one, can neither end the job nor keep it alive, and stops at its next
    heartbeat. A run that is merely slow between heartbeats loses its work, which the next run redoes.

    Each job is written back only as it was read (:func:`_unchanged`: still running, same claim; and
    for a stale heartbeat, still stale): on PostgreSQL another node's run may end the job (its sends
    queued) or heartbeat it between this read and the write, and must not be turned back into
    ``queued`` and run (and sent) twice.
    """
    now = now or utcnow()
    host = socket.gethostname()
    me = owner_id()
    cutoff = now - timedelta(seconds=stale_seconds)
    requeued: list[tuple[int, int]] = []
    ended: list[tuple[int, int]] = []
    with writing(sf) as s:
        running = s.execute(
            select(NodeJob.id, NodeJob.owner, NodeJob.attempts, NodeJob.requeues, NodeJob.heartbeat_at)
            .where(NodeJob.status == "running")
            .order_by(NodeJob.id)
        ).all()
        for job in running:
            owner_host, _, pid = (job.owner or ":").rpartition(":")
            dead_here = owner_host == host and (
                (at_start and job.owner == me) or not pid.isdigit() or not _pid_alive(int(pid))
            )
            stale = (as_utc(job.heartbeat_at) or cutoff) < cutoff
            if not (dead_here or stale):
                continue
            reason = (
                f"re-queued: owner {job.owner} stopped while the job was running"
                if dead_here
                else f"re-queued: no heartbeat from owner {job.owner} for over {stale_seconds:.0f} s "
                "(stopped, hung or cut off while the job was running)"
            )
            values = _requeue_values(
                job.id,
                job.requeues or 0,
                reason,
                f"the node stopped {(job.requeues or 0) + 1} times while running this job (the job itself "
                "may stop it: out of memory, a crash in a native library); it is not run again automatically",
                now,
            )
            where = _unchanged(job.id, job.owner, job.attempts, job.requeues)
            if not dead_here:  # a heartbeat since the read: the run is alive after all
                where &= NodeJob.heartbeat_at < cutoff
            if s.execute(update(NodeJob).where(where).values(**values)).rowcount != 1:  # type: ignore[attr-defined]
                continue  # ended, heartbeat or claimed again since the read: not abandoned
            (ended if values["status"] == "failed" else requeued).append((job.id, values["requeues"]))
    for job_id, requeues in requeued:
        logger.warning(
            "job %d was left running by a stopped process; queued again (stopped %d of at most %d times)",
            job_id,
            requeues,
            MAX_REQUEUES,
        )
    for job_id, requeues in ended:
        logger.warning(
            "job %d: the node stopped %d times while running it; ended failed (segnode jobs retry %d)",
            job_id,
            requeues,
            job_id,
        )
    return [job_id for job_id, _ in requeued]


@database_errors
def requeue_interrupted(
    sf: SessionFactory,
    job_id: int,
    error: str,
    *,
    attempts: int | None = None,
    now: datetime | None = None,
) -> str | None:
    """Queue again a job of this process whose run a database fault (``error``) cut short; call it
    once the database answers again. The job must still be running under this process (and at its
    claim ``attempts``, when given: a later claim of the job is left alone). A run cut short counts
    as one that never ended (:data:`MAX_REQUEUES`). Returns the job's new state, None when untouched.
    """
    now = now or utcnow()
    with writing(sf) as s:
        job = s.execute(
            select(NodeJob.owner, NodeJob.attempts, NodeJob.requeues).where(_ours(job_id, attempts))
        ).first()
        if job is None:
            return None
        kind = error.split(":", 1)[0].strip() or "database error"  # the driver's error class
        values = _requeue_values(
            job_id,
            job.requeues or 0,
            f"re-queued: the database failed while the job was running ({kind})",
            f"the job's run was cut short {(job.requeues or 0) + 1} times (the node stopped, or lost "
            f"its database, mid-run; the last time the database: {kind}); it is not run again automatically",
            now,
        )
        # Only as read: another node's requeue_stale may have taken the job meanwhile (PostgreSQL).
        where = _unchanged(job_id, job.owner, job.attempts, job.requeues)
        if s.execute(update(NodeJob).where(where).values(**values)).rowcount != 1:  # type: ignore[attr-defined]
            return None
        status, requeues = values["status"], values["requeues"]
    if status == "failed":
        logger.warning(
            "job %d: its run was cut short %d times; ended failed (segnode jobs retry %d)",
            job_id,
            requeues,
            job_id,
        )
    else:
        logger.warning(
            "job %d: the database failed while it ran; queued again (cut short %d of at most %d times)",
            job_id,
            requeues,
            MAX_REQUEUES,
        )
    return str(status)


def _unchanged(job_id: int, owner: str | None, attempts: int, requeues: int | None) -> Any:
    """The job's row while it is still the running claim that was read (``owner``, ``attempts``,
    ``requeues``): for a write that must not land on a job another process ended, re-queued or
    claimed again since the read."""
    return (
        (NodeJob.id == job_id)
        & (NodeJob.status == "running")
        & NodeJob.owner.is_not_distinct_from(owner)
        & (NodeJob.attempts == attempts)
        & NodeJob.requeues.is_not_distinct_from(requeues)
    )


def _requeue_values(job_id: int, requeues: int, requeued: str, ended: str, now: datetime) -> dict[str, Any]:
    """The values that queue a running job again with reason ``requeued``, counting the run that
    never ended (the job had ``requeues`` such runs before); at :data:`MAX_REQUEUES` such runs they
    end it ``failed`` instead, with reason ``ended`` and how to run it again."""
    count = requeues + 1
    if count < MAX_REQUEUES:
        return {"status": "queued", "reason": requeued, "owner": None, "requeues": count}
    return {
        "status": "failed",
        "reason": f"{ended}; `segnode jobs retry {job_id}` runs it again",
        "owner": None,
        "requeues": count,
        "finished_at": now,
    }


def _job_instances(s: Session, job_id: int) -> list[tuple[str | None, str]]:
    """(series UID, spool path) of the kept instances a job covers, in the order received.

    Once claimed, a job covers the ``instance_count`` instances its claim counted (the study as it
    was when idle), not those that arrived since: those set the study pending again and make the
    next run, so a late instance is never half in this run and left out of its count (nor read
    before its spool file is in place). On SQLite row ids follow commit order, so these are exactly
    the claimed instances; on PostgreSQL an id is taken at insert, so an instance committed just
    after the claim may stand in for a claimed one, and the next run, which it made, covers both.
    A queued job covers every kept instance received so far.
    """
    job = s.get(NodeJob, job_id)
    if job is None:
        return []
    query = (
        select(NodeInstance.series_instance_uid, NodeInstance.path)
        .join(NodeStudy, NodeStudy.study_instance_uid == NodeInstance.study_instance_uid)
        .where(NodeStudy.id == job.study_id, NodeInstance.kept.is_(True))
        .order_by(NodeInstance.id)
    )
    if job.status != "queued":
        query = query.limit(job.instance_count)
    return [(series, path) for series, path in s.execute(query).all() if path]


@database_errors
def job_instance_paths(sf: SessionFactory, job_id: int) -> list[str]:
    """Spool paths of the kept instances the job covers (see :func:`job_series_paths`)."""
    with sf() as s:
        return [path for _, path in _job_instances(s, job_id)]


@database_errors
def job_series_paths(sf: SessionFactory, job_id: int) -> dict[str, list[str]]:
    """Spool paths of the kept instances the job covers, grouped by SeriesInstanceUID.

    A claimed job covers the ``instance_count`` instances counted when it was claimed; instances
    that arrived later belong to the next run of the study.
    """
    groups: dict[str, list[str]] = {}
    with sf() as s:
        for series, path in _job_instances(s, job_id):
            groups.setdefault(str(series), []).append(path)
    return groups


@database_errors
def finish_job(
    sf: SessionFactory,
    job_id: int,
    *,
    status: str,
    reason: str = "",
    stages: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    output_dir: str | None = None,
    model_label: str | None = None,
    model_id: int | None = None,
    outputs: list[OutputObject] | None = None,
    destinations: list[Any] | None = None,
    attempt: int | None = None,
    now: datetime | None = None,
) -> bool:
    """End a running job and, in the same transaction, queue a send per output and destination.

    A job ending ``review`` queues no send: its outputs wait for :func:`release_job`.

    Returns False (and changes nothing) when the job is no longer running under this owner, e.g.
    it was re-queued meanwhile: its outputs are then simply not sent, so nothing is sent twice. A run
    passes its claim's ``attempt`` (:attr:`Claim.attempt`): the owner, ``host:pid``, is the same for
    every worker thread of the process, so without it a run superseded by a later claim of the job in
    this very process would end the job with its stale result and the later run's would be dropped.
    """
    if status not in FINAL_STATES:
        raise ValueError(f"job {job_id}: status {status!r} is not a final state")
    now = now or utcnow()
    with writing(sf) as s:
        changed = s.execute(
            update(NodeJob)
            .where(_ours(job_id, attempt))
            .values(
                status=status,
                reason=reason,
                stages=stages or {},
                result=result or {},
                output_dir=output_dir,
                model_label=model_label,
                model_id=model_id,
                finished_at=now,
            )
        ).rowcount  # type: ignore[attr-defined]
        if changed != 1:
            logger.warning("job %d was no longer ours when it finished; its outputs are not sent", job_id)
            return False
        if status != "review":
            _queue_sends(s, job_id, outputs or [], destinations or [], now)
    return True


def _queue_sends(
    s: Session, job_id: int, outputs: list[OutputObject], destinations: list[Any], now: datetime
) -> int:
    """Add a pending send per output and destination; returns how many."""
    for out in outputs:
        for dest in destinations:
            s.add(
                NodeSend(
                    job_id=job_id,
                    destination=dest.name,
                    ae_title=dest.ae_title,
                    host=dest.host,
                    port=dest.port,
                    path=out.path,
                    sop_instance_uid=out.sop_instance_uid,
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    last_error="",
                )
            )
    return len(outputs) * len(destinations)


@database_errors
def defer_job(
    sf: SessionFactory, job_id: int, *, attempt: int, reason: str, now: datetime | None = None
) -> bool:
    """Put a running job of this process (claim ``attempt``) back in the queue to wait for more of its
    study, with ``reason``: its study is pending again with its idle timer restarted, so the job is
    claimed again once the study has been idle for ``study_idle_seconds`` (at once when an instance
    arrives meanwhile and then nothing more). Returns False (nothing changed) when the run was
    superseded. No requeue is counted: the run ended of its own accord."""
    now = now or utcnow()
    with writing(sf) as s:
        study_id = s.scalar(select(NodeJob.study_id).where(_ours(job_id, attempt)))
        if study_id is None:
            return False
        s.execute(
            update(NodeJob).where(_ours(job_id, attempt)).values(status="queued", reason=reason, owner=None)
        )
        received = as_utc(s.scalar(select(NodeStudy.last_received_at).where(NodeStudy.id == study_id)))
        s.execute(
            update(NodeStudy)
            .where(NodeStudy.id == study_id)
            .values(pending=True, last_received_at=max(received or now, now))
        )
    return True


@dataclass(frozen=True)
class SentRun:
    """A study's latest run whose outputs were queued for sending (:func:`last_sent_run`)."""

    job_id: int
    result: dict[str, Any]
    #: (name, AE title, host, port) of each destination that has these outputs or will get them, from
    #: this run or an earlier one over the same inputs: a send done or pending (not one a destination
    #: refused for good, nor one a retry superseded).
    destinations: frozenset[tuple[str, str, str, int]]


#: The result key of a job queued again by :func:`retry_job`: its next run sends whatever it finds
#: (an administrator's request), even a result of inputs that an earlier run sent already.
RETRY_REQUESTED = "retry_requested_at"


@database_errors
def last_sent_run(sf: SessionFactory, job_id: int) -> SentRun | None:
    """The latest run (by run number) of ``job_id``'s study, other than that job, that ended ``done``
    with a send still pending or done; None when there is none. Its ``destinations`` are those that
    any such run over the same inputs (``inputs_digest``) reached or will reach.

    A run over the very inputs of that one makes the same SEG and SR; node/pipeline.py then sends
    nothing again, which would only add an identical series to the PACS. The latest run, not the one
    whose sends were queued last: an earlier run that ended after a later one (two workers, before a
    study's runs waited for each other: :func:`claim`) must not stand for the study's result.
    """
    with sf() as s:
        study_id = s.scalar(select(NodeJob.study_id).where(NodeJob.id == job_id))
        if study_id is None:
            raise JobNotFoundError(f"job {job_id} does not exist (see `segnode jobs list`)")
        rows = s.execute(
            select(NodeJob.id, NodeSend.destination, NodeSend.ae_title, NodeSend.host, NodeSend.port)
            .join(NodeSend, NodeSend.job_id == NodeJob.id)
            .where(
                NodeJob.study_id == study_id,
                NodeJob.id != job_id,
                NodeJob.status == "done",
                NodeSend.status.in_(("pending", "done")),
            )
            .order_by(NodeJob.run.desc(), NodeJob.id.desc(), NodeSend.id.desc())
        ).all()
        if not rows:
            return None
        ids = {int(r.id) for r in rows}
        results = {
            int(job): dict(result or {})
            for job, result in s.execute(select(NodeJob.id, NodeJob.result).where(NodeJob.id.in_(ids)))
        }
    last = int(rows[0].id)
    digest = results[last].get("inputs_digest")
    # Every run over those same inputs counts: a run that sent only to a destination the one before
    # had not reached must not make that one's destinations look unreached.
    same = {
        job
        for job, result in results.items()
        if job == last or (digest and result.get("inputs_digest") == digest)
    }
    destinations = frozenset((r.destination, r.ae_title, r.host, int(r.port)) for r in rows if r.id in same)
    return SentRun(last, results[last], destinations)


@database_errors
def release_job(
    sf: SessionFactory,
    job_id: int,
    *,
    by: str,
    destinations: list[Any],
    now: datetime | None = None,
) -> JobInfo:
    """Send a ``review`` job's outputs after all: queue their sends and mark the job ``done``.

    The model does not run again: the outputs are those the job wrote (``result["outputs"]``). The
    job's reason and result record who released it and when, and which checks it had failed.

    A later run of the study that ended ``done``, is queued or running, or sent its outputs supersedes
    the job: its older result is not sent, since the PACS would get it after the newer one. A later run
    held too, failed or skipped, with nothing sent, does not.

    Raises
    ------
    JobNotFoundError
        No job with ``job_id``.
    JobStateError
        The job is not in ``review``, a later run of its study supersedes it, its result lists no
        outputs, or an output file is gone (nothing is queued then).
    """
    now = now or utcnow()
    with writing(sf) as s:
        job = s.get(NodeJob, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist (see `segnode jobs list`)")
        # The study's row locked (PostgreSQL), as retry_job locks it: two releases of one study's runs
        # take turns, and each sees what the other did. The job is read again after the lock.
        s.execute(select(NodeStudy.id).where(NodeStudy.id == job.study_id).with_for_update()).all()
        s.refresh(job)
        if job.status != "review":
            raise JobStateError(
                f"job {job_id} is {job.status}; only a job in review can be sent anyway "
                "(`segnode jobs list --status review`)"
            )
        _refuse_superseded_release(s, job)
        result = dict(job.result or {})
        outputs = [OutputObject(o["path"], o["sop_instance_uid"]) for o in result.get("outputs") or []]
        if not outputs:
            raise JobStateError(f"job {job_id} has no outputs to send; retry it without --send-anyway")
        missing = [o.path for o in outputs if not Path(o.path).is_file()]
        if missing:  # queued, their sends would fail "cannot read the file" on every try, for good
            raise JobStateError(
                f"job {job_id}: {len(missing)} of its {len(outputs)} outputs are gone ({missing[0]}); "
                "nothing was sent. A retry of the study's latest run analyses it again while its instances "
                "are in the spool (`segnode jobs list`); else send the study again"
            )
        changed = s.execute(
            update(NodeJob)
            .where(NodeJob.id == job_id, NodeJob.status == "review")
            .values(
                status="done",
                reason=f"released by {by} after review ({job.reason})"[:2000],
                result={**result, "released_by": by, "released_at": now.isoformat()},
            )
        ).rowcount  # type: ignore[attr-defined]
        if changed != 1:
            raise JobStateError(f"job {job_id} changed state meanwhile; see `segnode jobs show {job_id}`")
        queued = _queue_sends(s, job_id, outputs, destinations, now)
    logger.info("job %d released by %s: %d sends queued", job_id, by, queued)
    return get_job(sf, job_id)


def _refuse_older_run(s: Session, job: NodeJob) -> None:
    """Raise :class:`JobStateError` when ``job`` is not its study's latest run (see :func:`retry_job`),
    naming the latest."""
    latest = s.execute(
        select(NodeJob.id, NodeJob.run, NodeJob.status)
        .where(NodeJob.study_id == job.study_id, NodeJob.run > job.run)
        .order_by(NodeJob.run.desc())
        .limit(1)
    ).first()
    if latest is None:
        return
    if latest.status in ("queued", "running"):
        then = f"it is {latest.status} and analyses the study as it is now"
    else:
        then = f"`segnode jobs retry {latest.id}` analyses the study as it is now"
    raise JobStateError(
        f"job {job.id} is run {job.run} of its study, whose latest run is job {latest.id} (run "
        f"{latest.run}); only the latest run can be retried: {then}"
    )


def _supersedes(later: Any, study_id: Any, run: Any) -> Any:
    """Whether job row ``later`` (:class:`NodeJob` or an alias of it) is a run of study ``study_id``
    after ``run`` that supersedes a held one (see :func:`release_job`): it ended done, is queued or
    running, or sent its result."""
    sent = select(NodeSend.id).where(NodeSend.job_id == later.id, NodeSend.status.in_(("pending", "done")))
    return (
        (later.study_id == study_id)
        & (later.run > run)
        & (later.status.in_(("done", "queued", "running")) | sent.exists())
    )


def _refuse_superseded_release(s: Session, job: NodeJob) -> None:
    """Raise :class:`JobStateError` when a later run of ``job``'s study supersedes it (see
    :func:`release_job`), naming the latest such run and what to do."""
    later = s.execute(
        select(NodeJob.id, NodeJob.run, NodeJob.status)
        .where(_supersedes(NodeJob, job.study_id, job.run))
        .order_by(NodeJob.run.desc())
        .limit(1)
    ).first()
    if later is None:
        return
    if later.status in ("queued", "running"):
        state, then = f"is {later.status}", f"see `segnode jobs show {later.id}` once it ends"
    else:
        state = "ended done" if later.status == "done" else f"sent its result (now {later.status})"
        then = f"see `segnode jobs show {later.id}`; `segnode jobs retry {later.id}` runs the study again"
    raise JobStateError(
        f"job {job.id} (run {job.run}) is not sent: job {later.id}, run {later.run} of the same study, "
        f"{state} and supersedes it (the PACS would get the older result last); {then}"
    )


def _job_info(s: Session, job: NodeJob, with_sends: bool) -> JobInfo:
    study_uid = s.scalar(select(NodeStudy.study_instance_uid).where(NodeStudy.id == job.study_id)) or ""
    sends = []
    if with_sends:
        sends = [send_info(r) for r in s.scalars(select(NodeSend).where(NodeSend.job_id == job.id))]
    return JobInfo(
        id=job.id,
        study_instance_uid=study_uid,
        run=job.run,
        status=job.status,
        reason=job.reason,
        stages=dict(job.stages or {}),
        attempts=job.attempts,
        instance_count=job.instance_count,
        owner=job.owner,
        model_label=job.model_label,
        output_dir=job.output_dir,
        result=dict(job.result or {}),
        created_at=as_utc(job.created_at) or job.created_at,
        started_at=as_utc(job.started_at),
        finished_at=as_utc(job.finished_at),
        sends=sends,
        requeues=job.requeues or 0,
    )


@database_errors
def get_job(sf: SessionFactory, job_id: int) -> JobInfo:
    """One job with its sends; :class:`~db.exceptions.JobNotFoundError` when there is no such job."""
    with sf() as s:
        job = s.get(NodeJob, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist (see `segnode jobs list`)")
        return _job_info(s, job, with_sends=True)


@database_errors
def list_jobs(sf: SessionFactory, status: str | None = None, limit: int = 100) -> list[JobInfo]:
    """The most recent jobs, newest first."""
    with sf() as s:
        query = select(NodeJob).order_by(NodeJob.id.desc()).limit(limit)
        if status:
            query = query.where(NodeJob.status == status)
        return [_job_info(s, j, with_sends=False) for j in s.scalars(query)]


def _spooled_instances(s: Session, study_id: int) -> int:
    """Kept instances of a study still in the spool (spool retention marks a removable study's not
    kept before it removes their files, then forgets them: :func:`db.retention.begin_removal`)."""
    return int(
        s.scalar(
            select(func.count(NodeInstance.id))
            .join(NodeStudy, NodeStudy.study_instance_uid == NodeInstance.study_instance_uid)
            .where(NodeStudy.id == study_id, NodeInstance.kept.is_(True), NodeInstance.path.is_not(None))
        )
        or 0
    )


@database_errors
def retry_job(sf: SessionFactory, job_id: int) -> JobInfo:
    """Queue a finished (failed, skipped, review or done) job again; a queued or running one is refused,
    and so is one that is not its study's latest run.

    A run reads every instance its study has when it starts, and its SEG and SR carry its run number
    (node/seg.py run_series): an older job run again would analyse the study as it is now under that
    older run's number, a second series with that number in the PACS beside the later run's. The
    refusal names the latest job, whose retry is the one that analyses the study again.

    The sends of the job's last run still pending (a destination down) end ``superseded`` in the same
    transaction: never tried again, so a destination gets the new run's SEG and SR, not both runs'.
    One already being delivered may still arrive (and is then marked done). Those a destination
    refused for good end ``superseded`` too (their reason kept): the retry answers them, and they no
    longer count as undelivered results (:func:`db.send_queue.refused_send_count`).

    The job's result records the request (:data:`RETRY_REQUESTED`): its run sends its outputs even
    when an earlier run of the study sent a result of the very same inputs.
    A job whose earlier result was queued for sending (a done job) makes series of its own, whose
    number and description say "retry N" (node/seg.py run_series), not a second series under those
    the PACS holds.

    Raises
    ------
    JobNotFoundError
        No job with ``job_id``.
    JobStateError
        The job is queued or running, a later run of its study exists, or its study's instances have
        left the spool (or are leaving it: spool retention has begun to remove them).
    """
    with writing(sf) as s:
        job = s.get(NodeJob, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist (see `segnode jobs list`)")
        # The study's row locked (PostgreSQL), as spool retention's db.retention.begin_removal locks
        # it: a removal is either seen whole (the instances gone) or waits for this retry, which it
        # then sees. The job is read again after the lock.
        s.execute(select(NodeStudy.id).where(NodeStudy.id == job.study_id).with_for_update()).all()
        s.refresh(job)
        if job.status in ("queued", "running"):
            raise JobStateError(f"job {job_id} is {job.status}; only a finished job can be retried")
        _refuse_older_run(s, job)
        if not _spooled_instances(s, job.study_id):
            raise JobStateError(
                f"job {job_id}: its study's instances are no longer in the spool (spool retention: [node] "
                "spool_keep_hours after delivery, failed_keep_hours after a failed or skipped run); "
                "send the study again"
            )
        # The result (shown until the run ends) records the request: the run sends what it makes.
        result = {**(job.result or {}), RETRY_REQUESTED: utcnow().isoformat()}
        changed = s.execute(  # only as read: never over a job queued or claimed meanwhile
            update(NodeJob)
            .where(NodeJob.id == job_id, NodeJob.status == job.status, NodeJob.attempts == job.attempts)
            .values(
                status="queued",
                reason="retry requested",
                finished_at=None,
                owner=None,
                requeues=0,
                result=result,
            )
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if changed != 1:
            raise JobStateError(f"job {job_id} changed state meanwhile; see `segnode jobs show {job_id}`")
        superseded = s.execute(
            update(NodeSend)
            .where(NodeSend.job_id == job_id, NodeSend.status == "pending")
            .values(status="superseded", last_error="superseded by `segnode jobs retry`")
        ).rowcount  # type: ignore[attr-defined]
        # Its refused sends too (the retry is what answers them), with the refusal kept in the reason.
        superseded += s.execute(
            update(NodeSend)
            .where(NodeSend.job_id == job_id, NodeSend.status == "refused")
            .values(
                status="superseded",
                last_error=literal("superseded by `segnode jobs retry`; refused: ") + NodeSend.last_error,
            )
        ).rowcount  # type: ignore[attr-defined]
    if superseded:
        logger.info(
            "job %d queued again; %d pending or refused sends of its last run superseded", job_id, superseded
        )
    return get_job(sf, job_id)


@database_errors
def dismiss_held_job(
    sf: SessionFactory, job_id: int, *, by: str, reason: str = "", now: datetime | None = None
) -> JobInfo:
    """End a ``review`` job without sending its result: an administrator judged the held result not to
    be sent (a wrong series, a study not meant for the node). The job ends ``skipped`` with who
    dismissed it and why, then the check it failed, in its reason; its finish time is now, so spool
    retention removes the study after ``failed_keep_hours`` as for any result not sent, and it no
    longer counts in :func:`held_job_count`. Its outputs stay with the job until then.

    Raises
    ------
    JobNotFoundError
        No job with ``job_id``.
    JobStateError
        The job is not in ``review``.
    """
    now = now or utcnow()
    note = f"held result dismissed by {by}" + (f": {reason}" if reason else "")
    with writing(sf) as s:
        job = s.get(NodeJob, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist (see `segnode jobs list`)")
        changed = s.execute(
            update(NodeJob)
            .where(NodeJob.id == job_id, NodeJob.status == "review")
            .values(
                status="skipped",
                reason=f"{note} (held for: {job.reason})"[:2000],
                result={**dict(job.result or {}), "dismissed_by": by, "dismissed_at": now.isoformat()},
                finished_at=now,
            )
        ).rowcount  # type: ignore[attr-defined]
        if changed != 1:
            raise JobStateError(
                f"job {job_id} is {job.status}, not held in review (see `segnode jobs show {job_id}`)"
            )
    logger.info("job %d: held result dismissed by %s", job_id, by)
    return get_job(sf, job_id)


@database_errors
def held_job_count(sf: SessionFactory) -> int:
    """Jobs in ``review`` that no later run of their study supersedes (:func:`release_job` would send
    them): results held by a check, waiting for an administrator to release (``segnode jobs retry ID
    --send-anyway``) or retry them. A superseded held job stays in ``review`` for good and is not
    counted: nothing can be done with it, and its study's later run stands for the study."""
    with sf() as s:
        return int(s.scalar(select(func.count(NodeJob.id)).where(held_for_release())) or 0)


def held_for_release() -> Any:
    """A where-clause on :class:`NodeJob`: the job is in ``review`` and no later run of its study
    supersedes it, so that :func:`release_job` may still send its outputs. What :func:`held_job_count`
    counts, and what keeps a study's files and outputs from spool retention (db/retention.py)."""
    later = aliased(NodeJob)
    superseded = select(later.id).where(_supersedes(later, NodeJob.study_id, NodeJob.run))
    return (NodeJob.status == "review") & ~superseded.exists()


@database_errors
def job_counts(sf: SessionFactory) -> dict[str, int]:
    """Number of jobs per status (every status present, zero when none)."""
    with sf() as s:
        rows = s.execute(select(NodeJob.status, func.count(NodeJob.id)).group_by(NodeJob.status)).all()
    counts = {state: 0 for state in ("queued", "running", *FINAL_STATES)}
    counts.update({str(k): int(v) for k, v in rows})
    return counts
