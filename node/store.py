"""The node's database operations: instances, study completion, job queue, sends.

Every function opens its own short transaction through a ``sessionmaker`` so callers never hold
ORM objects; results come back as plain dataclasses.

Job claiming is atomic so that several node processes can share one database: on PostgreSQL the
candidate row is taken with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite (one writer at a time)
a conditional ``UPDATE ... WHERE status = 'queued'`` whose row count is checked. A job is claimable
only when its study is idle (``pending`` false), so a job never sees half a study.

Jobs left ``running`` by a process that died are queued again by :func:`requeue_stale`: at start,
every running job owned by this host whose process id no longer exists, and on any host a job whose
heartbeat is older than ``stale_seconds``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, DateTime, Table, bindparam, case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.node_tables import NodeInstance, NodeJob, NodeSend, NodeStudy
from db.session import write_options
from node.exceptions import NotFoundError

logger = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` as aware UTC (SQLite returns naive datetimes that were stored as UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: One write transaction at a time in this process. Threads (SCP associations, the scheduler's
#: touch of studies being received, workers, the sender) queue here instead of in SQLite's busy
#: handler, whose back-off sleeps (1, 2, 5, 10 ... ms) held C-STOREs up behind the scheduler's
#: 20-per-second touches and made four associations slower than one. Reentrant: harmless if a
#: caller nests. Other processes still queue in the database itself.
_WRITE_LOCK = threading.RLock()


@contextmanager
def _writing(sf: SessionFactory) -> Iterator[Session]:
    """A write transaction (``BEGIN IMMEDIATE`` on SQLite, so concurrent writers queue)."""
    with _WRITE_LOCK, sf.begin() as s:
        s.connection(execution_options=write_options())
        yield s


def owner_id() -> str:
    """``host:pid`` of this process, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


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


@dataclass(frozen=True)
class SendInfo:
    """A snapshot of one send row."""

    id: int
    job_id: int
    destination: str
    ae_title: str
    host: str
    port: int
    path: str
    sop_instance_uid: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str


@dataclass(frozen=True)
class OutputObject:
    """A file a job produced, to be sent to every destination."""

    path: str
    sop_instance_uid: str


# -- instances and studies ---------------------------------------------------------------------------


_INSTANCES = cast(Table, NodeInstance.__table__)
_STUDIES = cast(Table, NodeStudy.__table__)
# Statements of the C-STORE path, built once (compiled once, then cached by SQLAlchemy) and run on the
# session's connection: no ORM unit of work for a row that is written once per instance.
_INSTANCE_EXISTS = select(_INSTANCES.c.id).where(_INSTANCES.c.sop_instance_uid == bindparam("b_uid"))
_INSERT_INSTANCE = insert(_INSTANCES)
_TOUCH_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.study_instance_uid == bindparam("b_uid"))
    .values(
        # Never backwards: a later instance (or touch_studies) may have committed a newer time.
        last_received_at=case(
            (_STUDIES.c.last_received_at < bindparam("b_now", type_=DateTime(timezone=True)),
             bindparam("b_now", type_=DateTime(timezone=True))),
            else_=_STUDIES.c.last_received_at,
        ),
        pending=True,
    )
)
_INSERT_STUDY = insert(_STUDIES)


def record_instance(
    sf: SessionFactory,
    *,
    sop_instance_uid: str,
    sop_class_uid: str,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    kept: bool,
    path: str | None,
    calling_ae: str,
    now: datetime | None = None,
) -> bool:
    """Record a received instance; a kept one restarts its study's idle timer.

    Returns
    -------
    bool
        False when the SOP Instance UID was already recorded (a repeat is idempotent: the row,
        the file and the study are left as they are).
    """
    given = now
    now = now or utcnow()
    row = {
        "sop_instance_uid": sop_instance_uid,
        "sop_class_uid": sop_class_uid,
        "study_instance_uid": study_instance_uid,
        "series_instance_uid": series_instance_uid,
        "kept": kept,
        "path": path,
        "calling_ae": calling_ae,
        "received_at": now,
    }
    for attempt in range(3):
        try:
            with _writing(sf) as s:
                conn = s.connection()
                # The idle timer counts from the commit, not from before the wait for the write lock.
                touched_at = given or utcnow()
                if conn.execute(_INSTANCE_EXISTS, {"b_uid": sop_instance_uid}).first() is not None:
                    return False
                conn.execute(_INSERT_INSTANCE, row)
                if kept and study_instance_uid:
                    _touch_study(conn, study_instance_uid, touched_at)
            return True
        except IntegrityError:  # a concurrent association stored the same instance or study
            if attempt == 2:
                raise
    return False  # pragma: no cover


def _touch_study(conn: Connection, study_uid: str, now: datetime) -> None:
    """Mark the study pending and move its idle timer to ``now`` (never backwards); creates the study
    row with its first instance."""
    if conn.execute(_TOUCH_STUDY, {"b_uid": study_uid, "b_now": now}).rowcount == 0:
        conn.execute(
            _INSERT_STUDY,
            {
                "study_instance_uid": study_uid,
                "first_received_at": now,
                "last_received_at": now,
                "pending": True,
                "runs": 0,
            },
        )


def forget_instance(sf: SessionFactory, sop_instance_uid: str) -> None:
    """Delete an instance row whose spool file could not be written (the sender got a failure)."""
    with _writing(sf) as s:
        s.execute(delete(NodeInstance).where(NodeInstance.sop_instance_uid == sop_instance_uid))


def touch_studies(sf: SessionFactory, study_uids: Iterable[str], now: datetime | None = None) -> None:
    """Restart the idle timer of pending studies that are still being received (an open association
    is delivering them), so that none becomes due in the middle of its transfer."""
    uids = sorted(study_uids)
    if not uids:
        return
    with _writing(sf) as s:
        stamp = now or utcnow()  # taken once the write lock is held
        s.execute(
            update(NodeStudy)
            .where(
                NodeStudy.study_instance_uid.in_(uids),
                NodeStudy.pending.is_(True),
                NodeStudy.last_received_at < stamp,
            )
            .values(last_received_at=stamp)
        )


def schedule_due_studies(
    sf: SessionFactory, idle_seconds: float, now: datetime | None = None, receiving: Collection[str] = ()
) -> list[int]:
    """Queue a job for every study idle for ``idle_seconds`` with instances no job covers yet.

    A study that already has a queued (not yet started) job gets no second one: that job reads the
    study's instances when it starts. Studies in ``receiving`` (an association still open is
    delivering them) are never due, and a study without a kept instance (its C-STOREs all failed
    their spool writes) gets no job. Returns the ids of the jobs created.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=idle_seconds)
    created: list[int] = []
    with sf() as s:
        due = s.execute(
            select(NodeStudy.id, NodeStudy.last_received_at).where(
                NodeStudy.pending.is_(True),
                NodeStudy.last_received_at <= cutoff,
                NodeStudy.study_instance_uid.not_in(sorted(receiving)),
            )
        ).all()
    for study_id, seen in due:
        try:
            with _writing(sf) as s:
                changed = s.execute(
                    update(NodeStudy)
                    .where(
                        NodeStudy.id == study_id,
                        NodeStudy.pending.is_(True),
                        NodeStudy.last_received_at == seen,
                    )
                    .values(pending=False)
                ).rowcount  # type: ignore[attr-defined]
                if changed != 1:
                    continue  # another process took it, or a new instance arrived meanwhile
                queued = s.scalar(
                    select(NodeJob.id).where(NodeJob.study_id == study_id, NodeJob.status == "queued")
                )
                if queued is not None:
                    continue
                study = s.get_one(NodeStudy, study_id)
                if not _kept_count(s, study.study_instance_uid):
                    # Every C-STORE of the study failed its spool write (each took its row back), so
                    # there is nothing to run; an instance that does arrive sets pending again.
                    logger.warning(
                        "study %d has no kept instances (their spool writes failed); no job queued",
                        study_id,
                    )
                    continue
                study.runs += 1
                job = NodeJob(
                    study_id=study_id,
                    run=study.runs,
                    status="queued",
                    reason="",
                    stages={},
                    result={},
                    attempts=0,
                    created_at=now,
                )
                s.add(job)
                s.flush()
                created.append(job.id)
                logger.info("study %d idle: queued job %d (run %d)", study_id, job.id, study.runs)
        except IntegrityError:
            logger.info("study %d was scheduled by another process", study_id)
    return created


# -- jobs ------------------------------------------------------------------------------------------------


def claim_job(sf: SessionFactory, owner: str | None = None, now: datetime | None = None) -> int | None:
    """Atomically take the oldest claimable queued job and mark it running; None when there is none."""
    owner = owner or owner_id()
    now = now or utcnow()
    candidates = (
        select(NodeJob.id)
        .join(NodeStudy, NodeStudy.id == NodeJob.study_id)
        .where(NodeJob.status == "queued", NodeStudy.pending.is_(False))
        .order_by(NodeJob.id)
        .limit(1)
    )
    with sf() as s:  # a cheap read first: no write lock while there is nothing to claim
        if s.scalar(candidates) is None:
            return None
    for _ in range(20):
        with _writing(sf) as s:
            postgres = s.get_bind().dialect.name == "postgresql"
            query = candidates.with_for_update(skip_locked=True, of=NodeJob) if postgres else candidates
            job_id = s.scalar(query)
            if job_id is None:
                return None
            count = s.scalar(
                select(func.count(NodeInstance.id))
                .join(NodeStudy, NodeStudy.study_instance_uid == NodeInstance.study_instance_uid)
                .join(NodeJob, NodeJob.study_id == NodeStudy.id)
                .where(NodeJob.id == job_id, NodeInstance.kept.is_(True))
            )  # the instances this run covers: see _job_instances
            changed = s.execute(
                update(NodeJob)
                .where(NodeJob.id == job_id, NodeJob.status == "queued")
                .values(
                    status="running",
                    owner=owner,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=NodeJob.attempts + 1,
                    instance_count=count or 0,
                )
            ).rowcount  # type: ignore[attr-defined]
            if changed == 1:
                return int(job_id)
    return None


def heartbeat(sf: SessionFactory, job_id: int, now: datetime | None = None) -> None:
    """Mark a running job alive."""
    with _writing(sf) as s:
        s.execute(
            update(NodeJob)
            .where(NodeJob.id == job_id, NodeJob.status == "running")
            .values(heartbeat_at=now or utcnow())
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_stale(
    sf: SessionFactory, stale_seconds: float = 120.0, *, at_start: bool = False, now: datetime | None = None
) -> list[int]:
    """Queue again the running jobs whose process died; returns their ids.

    A job counts as abandoned when its owner is on this host and that pid is gone (or, with
    ``at_start``, is this very process: a restarted container may get the same pid), or when its
    heartbeat is older than ``stale_seconds`` (owner on another host).
    """
    now = now or utcnow()
    host = socket.gethostname()
    me = owner_id()
    cutoff = now - timedelta(seconds=stale_seconds)
    requeued: list[int] = []
    with _writing(sf) as s:
        for job in s.scalars(select(NodeJob).where(NodeJob.status == "running")):
            owner_host, _, pid = (job.owner or ":").rpartition(":")
            dead_here = owner_host == host and (
                (at_start and job.owner == me) or not pid.isdigit() or not _pid_alive(int(pid))
            )
            stale = (as_utc(job.heartbeat_at) or cutoff) < cutoff
            if dead_here or stale:
                job.status = "queued"
                job.reason = f"re-queued: owner {job.owner} stopped while the job was running"
                job.owner = None
                requeued.append(job.id)
    for job_id in requeued:
        logger.warning("job %d was left running by a stopped process; queued again", job_id)
    return requeued


def _kept_count(s: Session, study_uid: str) -> int:
    return int(
        s.scalar(
            select(func.count(NodeInstance.id)).where(
                NodeInstance.study_instance_uid == study_uid, NodeInstance.kept.is_(True)
            )
        )
        or 0
    )


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


def job_instance_paths(sf: SessionFactory, job_id: int) -> list[str]:
    """Spool paths of the kept instances the job covers (see :func:`job_series_paths`)."""
    with sf() as s:
        return [path for _, path in _job_instances(s, job_id)]


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
    now: datetime | None = None,
) -> bool:
    """End a running job and, in the same transaction, queue a send per output and destination.

    Returns False (and changes nothing) when the job is no longer running under this owner, e.g.
    it was re-queued meanwhile: its outputs are then simply not sent, so nothing is sent twice.
    """
    if status not in ("done", "failed", "skipped"):
        raise ValueError(f"job {job_id}: status {status!r} is not a final state")
    now = now or utcnow()
    with _writing(sf) as s:
        changed = s.execute(
            update(NodeJob)
            .where(NodeJob.id == job_id, NodeJob.status == "running", NodeJob.owner == owner_id())
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
        for out in outputs or []:
            for dest in destinations or []:
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
    return True


def _job_info(s: Session, job: NodeJob, with_sends: bool) -> JobInfo:
    study_uid = s.scalar(select(NodeStudy.study_instance_uid).where(NodeStudy.id == job.study_id)) or ""
    sends = []
    if with_sends:
        sends = [_send_info(r) for r in s.scalars(select(NodeSend).where(NodeSend.job_id == job.id))]
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
    )


def _send_info(r: NodeSend) -> SendInfo:
    return SendInfo(
        id=r.id,
        job_id=r.job_id,
        destination=r.destination,
        ae_title=r.ae_title,
        host=r.host,
        port=r.port,
        path=r.path,
        sop_instance_uid=r.sop_instance_uid,
        status=r.status,
        attempts=r.attempts,
        next_attempt_at=as_utc(r.next_attempt_at) or r.next_attempt_at,
        last_error=r.last_error,
    )


def get_job(sf: SessionFactory, job_id: int) -> JobInfo:
    """One job with its sends; :class:`NotFoundError` when there is no such job."""
    with sf() as s:
        job = s.get(NodeJob, job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist (see `segnode jobs list`)")
        return _job_info(s, job, with_sends=True)


def list_jobs(sf: SessionFactory, status: str | None = None, limit: int = 100) -> list[JobInfo]:
    """The most recent jobs, newest first."""
    with sf() as s:
        query = select(NodeJob).order_by(NodeJob.id.desc()).limit(limit)
        if status:
            query = query.where(NodeJob.status == status)
        return [_job_info(s, j, with_sends=False) for j in s.scalars(query)]


def retry_job(sf: SessionFactory, job_id: int) -> JobInfo:
    """Queue a finished (failed, skipped or done) job again; a queued or running one is refused."""
    with _writing(sf) as s:
        job = s.get(NodeJob, job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist (see `segnode jobs list`)")
        if job.status in ("queued", "running"):
            raise NotFoundError(f"job {job_id} is {job.status}; only a finished job can be retried")
        job.status = "queued"
        job.reason = "retry requested"
        job.finished_at = None
        job.owner = None
    return get_job(sf, job_id)


def job_counts(sf: SessionFactory) -> dict[str, int]:
    """Number of jobs per status (every status present, zero when none)."""
    with sf() as s:
        rows = s.execute(select(NodeJob.status, func.count(NodeJob.id)).group_by(NodeJob.status)).all()
    counts = {state: 0 for state in ("queued", "running", "done", "failed", "skipped")}
    counts.update({str(k): int(v) for k, v in rows})
    return counts


def instance_counts(sf: SessionFactory) -> dict[str, int]:
    """Received instances (kept and ignored) and studies."""
    with sf() as s:
        kept = s.scalar(select(func.count(NodeInstance.id)).where(NodeInstance.kept.is_(True))) or 0
        ignored = s.scalar(select(func.count(NodeInstance.id)).where(NodeInstance.kept.is_(False))) or 0
        studies = s.scalar(select(func.count(NodeStudy.id))) or 0
    return {"kept": int(kept), "ignored": int(ignored), "studies": int(studies)}


# -- sends -------------------------------------------------------------------------------------------------


def due_sends(
    sf: SessionFactory,
    now: datetime | None = None,
    limit: int = 100,
    exclude_destinations: Collection[str] = (),
) -> list[SendInfo]:
    """Pending sends whose next attempt is due, oldest first.

    ``exclude_destinations``: destination names left out (those being delivered now), so that the
    ``limit`` rows are all sends that can go out.
    """
    now = now or utcnow()
    query = select(NodeSend).where(NodeSend.status == "pending", NodeSend.next_attempt_at <= now)
    if exclude_destinations:
        query = query.where(NodeSend.destination.not_in(list(exclude_destinations)))
    with sf() as s:
        rows = s.scalars(query.order_by(NodeSend.id).limit(limit)).all()
        return [_send_info(r) for r in rows]


def claim_send(sf: SessionFactory, send: SendInfo, lease_seconds: float, now: datetime | None = None) -> bool:
    """Take a due send for ``lease_seconds`` (conditional update), so two senders never both send it."""
    now = now or utcnow()
    with _writing(sf) as s:
        changed = s.execute(
            update(NodeSend)
            .where(
                NodeSend.id == send.id,
                NodeSend.status == "pending",
                NodeSend.attempts == send.attempts,
                NodeSend.next_attempt_at <= now,
            )
            .values(next_attempt_at=now + timedelta(seconds=lease_seconds))
        ).rowcount  # type: ignore[attr-defined]
    return bool(changed == 1)


def mark_sent(sf: SessionFactory, send_id: int, now: datetime | None = None) -> None:
    """Record an acknowledged C-STORE."""
    with _writing(sf) as s:
        s.execute(
            update(NodeSend)
            .where(NodeSend.id == send_id)
            .values(status="done", sent_at=now or utcnow(), last_error="", attempts=NodeSend.attempts + 1)
        )


def mark_send_failed(
    sf: SessionFactory,
    send_id: int,
    error: str,
    *,
    base_seconds: float,
    max_seconds: float,
    now: datetime | None = None,
) -> datetime:
    """Record a failed attempt and schedule the next one with exponential backoff; returns its time."""
    now = now or utcnow()
    with _writing(sf) as s:
        send = s.get_one(NodeSend, send_id)
        send.attempts += 1
        delay = min(max_seconds, base_seconds * (2 ** (send.attempts - 1)))
        send.next_attempt_at = now + timedelta(seconds=delay)
        send.last_error = error[:1000]
        return send.next_attempt_at


def pending_send_count(sf: SessionFactory) -> int:
    """Sends not yet acknowledged."""
    with sf() as s:
        return int(s.scalar(select(func.count(NodeSend.id)).where(NodeSend.status == "pending")) or 0)
