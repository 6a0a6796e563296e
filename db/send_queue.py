"""The send queue: one row per (job, destination, output object), delivered by :mod:`node.sender`.

A due send is leased (:func:`claim_send`, a conditional update) before its C-STORE, so two senders
never both send it; it is marked done only after the destination's Success status, and a failed
attempt is scheduled again with exponential backoff. Rows are queued by
:func:`db.job_queue.finish_job` in the transaction that ends their job. A delivery that outlasts the lease
(many sends to a slow destination) renews it while it runs (:func:`renew_leases`). A send the
destination refused for good ends ``refused``; an administrator who has dealt with it otherwise (sent
it by hand, or the destination was wrong) dismisses it (:func:`dismiss_refused_sends`), and it no
longer counts as undelivered.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, literal, select, update

from db.exceptions import JobNotFoundError, JobStateError
from db.node_tables import NodeJob, NodeSend
from db.transactions import SessionFactory, as_utc, database_errors, utcnow, writing

logger = logging.getLogger(__name__)


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


def send_info(r: NodeSend) -> SendInfo:
    """The snapshot of a send row."""
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


@database_errors
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
        return [send_info(r) for r in rows]


@database_errors
def restart_sends_after_a_clock_step(
    sf: SessionFactory, horizon_seconds: float, now: datetime | None = None
) -> int:
    """Bring to ``now + horizon_seconds`` the next attempt of every pending send scheduled further ahead
    than that by more than :data:`db.instances.CLOCK_STEP_SECONDS`; returns how many. ``horizon_seconds``:
    the furthest a sender schedules (its longest backoff or its lease, whichever is longer).

    The wall clock was set back (NTP stepping a clock that ran ahead): a send waiting its retry would
    otherwise wait for the clock to catch up, an hour for an hour's step. Never earlier than the horizon:
    a send leased by a sender delivering it now stays leased. A read per call; the write only when one is
    found."""
    from db.instances import CLOCK_STEP_SECONDS

    now = now or utcnow()
    future = (NodeSend.status == "pending") & (
        NodeSend.next_attempt_at > now + timedelta(seconds=horizon_seconds + CLOCK_STEP_SECONDS)
    )
    with sf() as s:
        if s.scalar(select(func.count(NodeSend.id)).where(future)) == 0:
            return 0
    with writing(sf) as s:
        soon = now + timedelta(seconds=horizon_seconds)
        result = s.execute(update(NodeSend).where(future).values(next_attempt_at=soon))
        moved = int(getattr(result, "rowcount", 0) or 0)
    if moved:
        logger.warning(
            "the clock was set back: %d pending sends were scheduled more than %d s beyond the longest "
            "wait; they are due within %.0f s", moved, CLOCK_STEP_SECONDS, horizon_seconds,
        )  # fmt: skip
    return moved


@database_errors
def claim_send(sf: SessionFactory, send: SendInfo, lease_seconds: float, now: datetime | None = None) -> bool:
    """Take a due send for ``lease_seconds`` (conditional update), so two senders never both send it."""
    now = now or utcnow()
    with writing(sf) as s:
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


@database_errors
def renew_leases(
    sf: SessionFactory, sends: Collection[SendInfo], lease_seconds: float, now: datetime | None = None
) -> int:
    """Extend to ``lease_seconds`` from now the lease of those of ``sends`` still held: pending, with the
    attempts they were claimed at, and the lease not yet ended (once it has, another sender may have
    claimed the send, and its lease is not ours to extend). Returns how many were extended."""
    now = now or utcnow()
    changed = 0
    with writing(sf) as s:
        for send in sends:
            changed += s.execute(
                update(NodeSend)
                .where(
                    NodeSend.id == send.id,
                    NodeSend.status == "pending",
                    NodeSend.attempts == send.attempts,
                    NodeSend.next_attempt_at > now,
                )
                .values(next_attempt_at=now + timedelta(seconds=lease_seconds))
            ).rowcount  # type: ignore[attr-defined]
    return changed


@database_errors
def mark_sent(sf: SessionFactory, send_id: int, now: datetime | None = None, warning: str = "") -> None:
    """Record an acknowledged C-STORE. ``warning``: what the destination said when it stored the object
    with a Warning status (kept in ``last_error``, so that ``segnode jobs show`` gives it); empty for
    Success."""
    with writing(sf) as s:
        s.execute(
            update(NodeSend)
            .where(NodeSend.id == send_id)
            .values(
                status="done",
                sent_at=now or utcnow(),
                last_error=warning[:1000],
                attempts=NodeSend.attempts + 1,
            )
        )


@database_errors
def mark_send_failed(
    sf: SessionFactory,
    send_id: int,
    error: str,
    *,
    base_seconds: float,
    max_seconds: float,
    now: datetime | None = None,
    give_up: bool = False,
) -> datetime | None:
    """Record a failed attempt and schedule the next one with exponential backoff; returns its time.
    ``give_up``: the destination refused the object for good; the send ends ``refused`` (never tried
    again) and None is returned."""
    now = now or utcnow()
    with writing(sf) as s:
        send = s.get_one(NodeSend, send_id)
        send.attempts += 1
        if give_up:
            if send.status == "pending":  # a send superseded meanwhile (jobs retry) stays so
                send.status = "refused"
            send.last_error = error[:1000]
            return None
        delay = min(max_seconds, base_seconds * (2 ** (send.attempts - 1)))
        send.next_attempt_at = now + timedelta(seconds=delay)
        send.last_error = error[:1000]
        return send.next_attempt_at


@database_errors
def pending_send_count(sf: SessionFactory) -> int:
    """Sends not yet acknowledged."""
    with sf() as s:
        return int(s.scalar(select(func.count(NodeSend.id)).where(NodeSend.status == "pending")) or 0)


@database_errors
def refused_send_count(sf: SessionFactory) -> int:
    """Sends a destination refused for good (never tried again) that no retry of their job has
    superseded since, nor an administrator dismissed (:func:`dismiss_refused_sends`): results the node
    will not deliver unless someone acts."""
    with sf() as s:
        return int(s.scalar(select(func.count(NodeSend.id)).where(NodeSend.status == "refused")) or 0)


@database_errors
def dismiss_refused_sends(sf: SessionFactory, job_id: int, *, by: str, reason: str = "") -> int:
    """Mark the sends of ``job_id`` a destination refused for good ``dismissed``: an administrator has
    dealt with them otherwise (sent by hand, the destination was wrong), and they no longer count as
    undelivered (:func:`refused_send_count`). The way out for a job that is not to be retried, or cannot
    be (not its study's latest run); spool retention keeps the study until then. Each keeps its
    refusal in ``last_error``, after who dismissed it and why. Returns how many were dismissed.

    Raises
    ------
    JobNotFoundError
        No job with ``job_id``.
    JobStateError
        The job has no refused sends.
    """
    note = f"dismissed by {by}" + (f": {reason}" if reason else "")
    with writing(sf) as s:
        if s.get(NodeJob, job_id) is None:
            raise JobNotFoundError(f"job {job_id} does not exist (see `segnode jobs list`)")
        dismissed = int(
            s.execute(
                update(NodeSend)
                .where(NodeSend.job_id == job_id, NodeSend.status == "refused")
                .values(status="dismissed", last_error=literal(f"{note}; refused: ") + NodeSend.last_error)
            ).rowcount  # type: ignore[attr-defined]
            or 0
        )
        if not dismissed:
            raise JobStateError(f"job {job_id} has no refused sends (see `segnode jobs show {job_id}`)")
    logger.info("job %d: %d refused sends dismissed by %s", job_id, dismissed, by)
    return dismissed


@database_errors
def send_counts(sf: SessionFactory, job_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """Sends per state (pending, done, refused, superseded, dismissed; only those present) of each of
    ``job_ids``, in one query; a job without sends is absent."""
    ids = list(job_ids)
    if not ids:
        return {}
    counts: dict[int, dict[str, int]] = {}
    with sf() as s:
        rows = s.execute(
            select(NodeSend.job_id, NodeSend.status, func.count(NodeSend.id))
            .where(NodeSend.job_id.in_(ids))
            .group_by(NodeSend.job_id, NodeSend.status)
        ).all()
    for job_id, status, count in rows:
        counts.setdefault(int(job_id), {})[str(status)] = int(count)
    return counts
