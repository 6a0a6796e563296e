"""Received instances and studies: recording each C-STORE, and deciding when a study is complete.

A study is complete when no kept instance of it has arrived for ``idle_seconds`` (its idle timer,
``node_studies.last_received_at``, survives restarts) and no association still open is delivering it;
:func:`schedule_due_studies` then queues a job for it (see :mod:`db.job_queue`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, cast

from sqlalchemy import DateTime, Table, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from db.exceptions import DatabaseUnavailableError
from db.node_tables import NodeInstance, NodeJob, NodeStudy
from db.transactions import (
    DriverDialect,
    SessionFactory,
    as_utc,
    bind_value,
    database_errors,
    describe_driver_error,
    driver_dialect,
    driver_writing,
    utcnow,
    writing,
)

logger = logging.getLogger(__name__)


#: A study's idle timer stamped further ahead than this was stamped by a clock since set back; it
#: restarts from the clock's time (receiving hosts' clocks may differ by less than this). A smaller
#: step of a receiving host's own clock is set right by the process that received the study, which
#: knows its stamps' monotonic times (node/idle_timers.py, :func:`restamp_study`).
CLOCK_STEP_SECONDS = 300

_INSTANCES = cast(Table, NodeInstance.__table__)
_STUDIES = cast(Table, NodeStudy.__table__)
# The statements of record_instances_through_session, built once (SQLAlchemy then caches their
# compiled form), as the node's C-STORE path had them before it went to the driver.
_RECORDED = select(_INSTANCES.c.sop_instance_uid).where(
    _INSTANCES.c.sop_instance_uid.in_(bindparam("b_uids", expanding=True))
)
_TOUCH_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.study_instance_uid == bindparam("b_uid"))
    .values(
        # Never backwards (a later instance or touch_studies may have committed a newer time), except
        # past a clock step: a time further ahead than CLOCK_STEP_SECONDS was stamped by a clock that
        # has since been set back.
        last_received_at=case(
            (or_(_STUDIES.c.last_received_at < bindparam("b_now", type_=DateTime(timezone=True)),
                 _STUDIES.c.last_received_at > bindparam("b_ahead", type_=DateTime(timezone=True))),
             bindparam("b_now", type_=DateTime(timezone=True))),
            else_=_STUDIES.c.last_received_at,
        ),
        pending=True,
    )
)


@dataclass(frozen=True)
class ReceivedInstance:
    """One C-STORE to record (see :func:`record_instances`)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    kept: bool
    path: str | None
    calling_ae: str


@database_errors
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

    Raises
    ------
    DatabaseUnavailableError
        The database failed, or concurrent inserts of the same instance or study still collided
        on the third attempt.
    """
    row = ReceivedInstance(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        kept=kept,
        path=path,
        calling_ae=calling_ae,
    )
    return record_instances(sf, [row], now)[0]


@database_errors
def record_instances(
    sf: SessionFactory, rows: Sequence[ReceivedInstance], now: datetime | None = None
) -> list[bool]:
    """Record received instances in one transaction (a group commit): one query for the ones already
    recorded, one multi-row insert, one touch of each study that got a kept instance.

    This runs once per C-STORE before its response, so it goes to the driver directly
    (:class:`_RecordStatements`); SQLAlchemy's session and execution machinery cost about 1 ms of
    CPU per call here, more than the statements themselves.

    Returns
    -------
    list[bool]
        For each row, False when its SOP Instance UID was already recorded (before, or earlier in
        ``rows``): a repeat is idempotent, as in :func:`record_instance`.

    Raises
    ------
    DatabaseUnavailableError
        The database failed, or concurrent inserts of the same instance or study still collided
        on the third attempt. Nothing of ``rows`` is recorded then.
    """
    statements = _RecordStatements.of(sf)
    driver = statements.driver
    for attempt in range(3):
        try:
            with driver_writing(sf) as cursor:
                # The idle timer counts from the commit, not from before the wait for the write lock.
                return statements.record(cursor, rows, now or utcnow())
        except driver.integrity_error as exc:  # a concurrent process stored the same instance or study
            if attempt == 2:
                raise DatabaseUnavailableError(describe_driver_error(exc)) from exc
        except driver.error as exc:
            raise DatabaseUnavailableError(describe_driver_error(exc)) from exc
    return [False] * len(rows)  # pragma: no cover


def _uids(rows: Sequence[ReceivedInstance]) -> list[str]:
    """The distinct SOP Instance UIDs of ``rows``, sorted."""
    return sorted({r.sop_instance_uid for r in rows})


def _new_rows(
    rows: Sequence[ReceivedInstance], seen: set[str]
) -> tuple[list[bool], list[ReceivedInstance]]:
    """For each row, whether it is new (not in ``seen`` nor earlier in ``rows``); and the new rows."""
    new: list[bool] = []
    inserted: list[ReceivedInstance] = []
    for r in rows:
        new.append(r.sop_instance_uid not in seen)
        if new[-1]:
            seen.add(r.sop_instance_uid)
            inserted.append(r)
    return new, inserted


def _touched_studies(inserted: Sequence[ReceivedInstance]) -> list[str]:
    """The studies whose idle timer the kept rows of ``inserted`` restart, in order (so that two
    processes touching the same studies cannot deadlock)."""
    return sorted({r.study_instance_uid for r in inserted if r.kept and r.study_instance_uid})


@database_errors
def record_instances_through_session(
    sf: SessionFactory, rows: Sequence[ReceivedInstance], now: datetime | None = None
) -> list[bool]:
    """:func:`record_instances` through SQLAlchemy Core statements on a session, as the node did before
    it went to the driver: the reference its driver SQL is tested against (tests/node/test_units.py),
    and the ``node:driver`` row of benchmarks/ingest.py. Same results, ~1 ms more CPU per call."""
    for attempt in range(3):
        try:
            with writing(sf) as s:
                conn = s.connection()
                stamp = now or utcnow()
                new, inserted = _new_rows(rows, set(conn.scalars(_RECORDED, {"b_uids": _uids(rows)})))
                if inserted:
                    conn.execute(insert(_INSTANCES), [{**asdict(r), "received_at": stamp} for r in inserted])
                for study in _touched_studies(inserted):
                    ahead = stamp + timedelta(seconds=CLOCK_STEP_SECONDS)
                    touched = conn.execute(_TOUCH_STUDY, {"b_uid": study, "b_now": stamp, "b_ahead": ahead})
                    if touched.rowcount == 0:
                        first = {"first_received_at": stamp, "last_received_at": stamp, "pending": True}
                        conn.execute(insert(_STUDIES), {"study_instance_uid": study, "runs": 0, **first})
            return new
        except IntegrityError:
            if attempt == 2:
                raise
    return [False] * len(rows)  # pragma: no cover


@dataclass(frozen=True)
class _RecordStatements:
    """:func:`record_instances`' statements in the driver's own SQL, written once per database."""

    driver: DriverDialect
    recorded: str  # ... WHERE sop_instance_uid IN ({}), formatted with one marker per UID
    insert_instance: str
    touch_study: str
    insert_study: str
    when: Callable[[datetime], Any]
    flag: Callable[[bool], Any]

    _cache: ClassVar[dict[tuple[str, str], _RecordStatements]] = {}

    @classmethod
    def of(cls, sf: SessionFactory) -> _RecordStatements:
        """The statements for ``sf``'s kind of database and driver (built on first use)."""
        dialect = sf.kw["bind"].dialect
        key = (dialect.name, dialect.driver)
        found = cls._cache.get(key)
        if found is None:
            found = cls._cache[key] = cls._build(sf)
        return found

    @classmethod
    def _build(cls, sf: SessionFactory) -> _RecordStatements:
        driver = driver_dialect(sf)
        p = driver.placeholder
        return cls(
            driver=driver,
            recorded="SELECT sop_instance_uid FROM node_instances WHERE sop_instance_uid IN ({})",
            insert_instance=(
                "INSERT INTO node_instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
                f"series_instance_uid, kept, path, calling_ae, received_at) VALUES ({', '.join([p] * 8)})"
            ),
            # Never backwards, except past a clock step (as _TOUCH_STUDY).
            touch_study=(
                f"UPDATE node_studies SET last_received_at = CASE WHEN last_received_at < {p} OR "
                f"last_received_at > {p} THEN {p} ELSE last_received_at END, pending = {p} "
                f"WHERE study_instance_uid = {p}"
            ),
            insert_study=(
                "INSERT INTO node_studies (study_instance_uid, first_received_at, last_received_at, pending, "
                f"runs) VALUES ({p}, {p}, {p}, {p}, 0)"
            ),
            when=bind_value(sf, _INSTANCES.c.received_at),
            flag=bind_value(sf, _INSTANCES.c.kept),
        )

    def record(self, cursor: Any, rows: Sequence[ReceivedInstance], now: datetime) -> list[bool]:
        """Run the statements of :func:`record_instances` on ``cursor`` (inside its transaction)."""
        uids = _uids(rows)
        cursor.execute(self.recorded.format(", ".join([self.driver.placeholder] * len(uids))), uids)
        new, inserted = _new_rows(rows, {uid for (uid,) in cursor.fetchall()})
        at, pending = self.when(now), self.flag(True)
        ahead = self.when(now + timedelta(seconds=CLOCK_STEP_SECONDS))
        if inserted:
            cursor.executemany(
                self.insert_instance,
                [
                    (r.sop_instance_uid, r.sop_class_uid, r.study_instance_uid, r.series_instance_uid,
                     self.flag(r.kept), r.path, r.calling_ae, at)
                    for r in inserted
                ],
            )
        for study in _touched_studies(inserted):
            cursor.execute(self.touch_study, (at, ahead, at, pending, study))
            if cursor.rowcount == 0:  # its first instance
                cursor.execute(self.insert_study, (study, at, at, pending))
        return new


@database_errors
def move_instance(sf: SessionFactory, row: ReceivedInstance, now: datetime | None = None) -> str | None:
    """Record a kept instance received again in another study or series where it now is.

    A PACS that merges or corrects a study sends its instances again with the same SOP Instance UIDs
    and new Study or Series Instance UIDs. :func:`record_instances` saw a repeat and kept the old
    row, so the corrected study never got a row (nor a job) and its file stayed in the spool for
    good. Here the row takes the new study, series, path and calling AE, and the new study's idle
    timer starts (or restarts), in one transaction. A plain repeat costs one read, no write.

    Returns
    -------
    str or None
        The row's former path when it was moved (the caller removes that file); None when the
        instance is not recorded, not kept, or already recorded in that study and series.
    """
    if not row.kept or not _recorded_elsewhere(sf, row):
        return None
    for attempt in range(3):
        try:
            return _move(sf, row, now)
        except IntegrityError:  # another process inserted the new study's row first: its touch now works
            if attempt == 2:
                raise
    return None  # pragma: no cover


def _recorded_elsewhere(sf: SessionFactory, row: ReceivedInstance) -> bool:
    """Whether ``row``'s instance is recorded, kept, in another study or series (a read, no lock)."""
    with sf() as s:
        columns = (NodeInstance.kept, NodeInstance.study_instance_uid, NodeInstance.series_instance_uid)
        old = s.execute(select(*columns).where(NodeInstance.sop_instance_uid == row.sop_instance_uid)).first()
    return old is not None and bool(old.kept) and (
        old.study_instance_uid != row.study_instance_uid or old.series_instance_uid != row.series_instance_uid
    )


def _move(sf: SessionFactory, row: ReceivedInstance, now: datetime | None) -> str | None:
    """:func:`move_instance`'s transaction."""
    with writing(sf) as s:
        old = s.scalar(select(NodeInstance).where(NodeInstance.sop_instance_uid == row.sop_instance_uid))
        if old is None or not old.kept or (
            old.study_instance_uid == row.study_instance_uid
            and old.series_instance_uid == row.series_instance_uid
        ):
            return None  # moved by another process meanwhile
        previous, former_study = old.path or "", old.study_instance_uid
        stamp = now or utcnow()
        old.study_instance_uid, old.series_instance_uid = row.study_instance_uid, row.series_instance_uid
        old.path, old.calling_ae, old.received_at = row.path, row.calling_ae, stamp
        conn = s.connection()
        ahead = stamp + timedelta(seconds=CLOCK_STEP_SECONDS)
        touched = conn.execute(
            _TOUCH_STUDY, {"b_uid": row.study_instance_uid, "b_now": stamp, "b_ahead": ahead}
        )
        if touched.rowcount == 0:
            first = {"first_received_at": stamp, "last_received_at": stamp, "pending": True}
            conn.execute(insert(_STUDIES), {"study_instance_uid": row.study_instance_uid, "runs": 0, **first})
        s.flush()
        left = s.scalar(
            select(func.count()).select_from(NodeInstance).where(
                NodeInstance.study_instance_uid == former_study, NodeInstance.kept.is_(True)
            )
        )
        if not left:  # the study it left is empty now: nothing to analyse there
            s.execute(
                update(NodeStudy).where(NodeStudy.study_instance_uid == former_study).values(pending=False)
            )
        return previous


@database_errors
def instance_replaced(sf: SessionFactory, row: ReceivedInstance, now: datetime | None = None) -> bool:
    """Record that a kept instance was received again in its own study and series with other content
    (a corrected image or header, whose file the caller replaces): its row takes the calling AE and the
    time, and its study's idle timer restarts with the study pending, as a late instance's does in
    :func:`record_instances`, so that a new run reads the corrected file.

    Returns False, changing nothing, when the instance has no kept row: spool retention took its study
    out of use (:func:`db.retention.begin_removal`) and removes its file and row, or has forgotten the
    row since the caller saw it. Its content would go with them, acknowledged; the caller refuses it
    with a transient failure instead, so that the PACS's resend, once the row is forgotten, is a new
    instance. The update is conditional on the row being kept, in the transaction that makes the study
    pending: a ``begin_removal`` committed first is seen (on PostgreSQL the update waits for its row
    locks and reads the row again), and one committing after finds the study pending and leaves it."""
    stamp = now or utcnow()
    with writing(sf) as s:
        updated = s.execute(
            update(NodeInstance)
            .where(NodeInstance.sop_instance_uid == row.sop_instance_uid, NodeInstance.kept.is_(True))
            .values(calling_ae=row.calling_ae, received_at=stamp)
        ).rowcount  # type: ignore[attr-defined]
        if not updated:
            return False
        conn = s.connection()
        ahead = stamp + timedelta(seconds=CLOCK_STEP_SECONDS)
        touched = conn.execute(
            _TOUCH_STUDY, {"b_uid": row.study_instance_uid, "b_now": stamp, "b_ahead": ahead}
        )
        if touched.rowcount == 0:  # its study row is gone
            first = {"first_received_at": stamp, "last_received_at": stamp, "pending": True}
            conn.execute(insert(_STUDIES), {"study_instance_uid": row.study_instance_uid, "runs": 0, **first})
    return True


@database_errors
def instance_kept(sf: SessionFactory, sop_instance_uid: str) -> bool:
    """Whether the instance has a kept row (a read): False once spool retention has taken its study out
    of use (:func:`db.retention.begin_removal`), and once the row is forgotten."""
    with sf() as s:
        kept = s.scalar(select(NodeInstance.kept).where(NodeInstance.sop_instance_uid == sop_instance_uid))
    return bool(kept)


@database_errors
def forget_instance(sf: SessionFactory, sop_instance_uid: str) -> None:
    """Delete an instance row whose spool file could not be written (the sender got a failure)."""
    with writing(sf) as s:
        s.execute(delete(NodeInstance).where(NodeInstance.sop_instance_uid == sop_instance_uid))


@database_errors
def touch_studies(sf: SessionFactory, study_uids: Iterable[str], now: datetime | None = None) -> None:
    """Restart the idle timer of pending studies that are still being received (an open association
    is delivering them), so that none becomes due in the middle of its transfer."""
    uids = sorted(study_uids)
    if not uids:
        return
    with writing(sf) as s:
        stamp = now or utcnow()  # taken once the write lock is held
        s.execute(
            update(NodeStudy)
            .where(
                NodeStudy.study_instance_uid.in_(uids),
                NodeStudy.pending.is_(True),
                or_(
                    NodeStudy.last_received_at < stamp,
                    NodeStudy.last_received_at > stamp + timedelta(seconds=CLOCK_STEP_SECONDS),
                ),
            )
            .values(last_received_at=stamp)
        )


@database_errors
def restamp_study(
    sf: SessionFactory, study_uid: str, at: datetime, *, ours_until: datetime, last_instance: str
) -> bool:
    """Set a waiting study's idle timer to ``at``, forwards or back: the receiving process's own
    timer after its wall clock was stepped (node/idle_timers.py), which says when its last stamp of
    the study was by the clock now. Only while the timer is still that process's: stamped no later
    than ``ours_until`` (the latest it stamped) and no instance of the study recorded after
    ``last_instance`` (another host's or process's later stamps may hide behind one from before a
    step back). True when set."""
    mine = aliased(NodeInstance)
    last_id = select(mine.id).where(mine.sop_instance_uid == last_instance).scalar_subquery()
    # Kept ones only: an acknowledged, not processed instance (a KOS, an SR) is recorded in its study too
    # but never stamps the timer.
    later = (
        select(NodeInstance.id)
        .where(
            NodeInstance.study_instance_uid == study_uid,
            NodeInstance.kept.is_(True),
            NodeInstance.id > func.coalesce(last_id, 0),
        )
        .exists()
    )
    with writing(sf) as s:
        changed = s.execute(
            update(NodeStudy)
            .where(
                NodeStudy.study_instance_uid == study_uid,
                NodeStudy.pending.is_(True),
                NodeStudy.last_received_at <= ours_until,
                ~later,
            )
            .values(last_received_at=at)
        ).rowcount  # type: ignore[attr-defined]
    return bool(changed == 1)


@database_errors
def seconds_until_due(
    sf: SessionFactory, idle_seconds: float, receiving: Collection[str] = (), now: datetime | None = None
) -> float | None:
    """Seconds until the next study waiting for a job becomes due (<= 0: one is due now); None when no
    study waits. Studies in ``receiving`` are left out, as :func:`schedule_due_studies` leaves them."""
    with sf() as s:
        oldest = s.scalar(
            select(func.min(NodeStudy.last_received_at)).where(
                NodeStudy.pending.is_(True),
                NodeStudy.study_instance_uid.not_in(sorted(receiving)),
            )
        )
    oldest = as_utc(oldest)
    if oldest is None:
        return None
    return (oldest + timedelta(seconds=idle_seconds) - (now or utcnow())).total_seconds()


@database_errors
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
    _restart_timers_after_a_clock_step(sf, now)
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
            with writing(sf) as s:
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


def _restart_timers_after_a_clock_step(sf: SessionFactory, now: datetime) -> None:
    """Restart, from ``now``, the idle timer of every pending study stamped further ahead than
    :data:`CLOCK_STEP_SECONDS`: the wall clock was set back (NTP stepping a clock that ran ahead, a
    host clock kept in local time), and such a study would otherwise wait for the clock to catch up,
    an hour for an hour's step. A read per poll; the write only when one is found."""
    ahead = now + timedelta(seconds=CLOCK_STEP_SECONDS)
    future = NodeStudy.pending.is_(True) & (NodeStudy.last_received_at > ahead)
    with sf() as s:
        if s.scalar(select(func.count(NodeStudy.id)).where(future)) == 0:
            return
    with writing(sf) as s:
        result = s.execute(update(NodeStudy).where(future).values(last_received_at=now))
        moved = int(getattr(result, "rowcount", 0) or 0)
    if moved:
        logger.warning(
            "the clock was set back: %d pending studies were stamped more than %d s ahead; their idle "
            "timers restart now",
            moved, CLOCK_STEP_SECONDS,
        )


def _kept_count(s: Session, study_uid: str) -> int:
    return int(
        s.scalar(
            select(func.count(NodeInstance.id)).where(
                NodeInstance.study_instance_uid == study_uid, NodeInstance.kept.is_(True)
            )
        )
        or 0
    )


@database_errors
def settled_series(
    sf: SessionFactory, quiet_seconds: float, now: datetime | None = None
) -> dict[str, dict[str, int]]:
    """The series of studies still being received that look complete already, with their sizes.

    A PACS sends a study series by series, so a series is settled when an instance of another series
    of its study has arrived after its own last one (the PACS moved on), or when none of its instances
    has come for ``quiet_seconds``. Only pending studies (no job queued for their latest instances)
    count. Early analysis (node/early.py) polls this while studies arrive, so it is one aggregate
    query; :func:`series_paths` reads the files of the series it takes up. The job re-checks that it
    got the same files.

    Returns
    -------
    dict
        ``{study UID: {series UID: number of kept instances}}``; studies without a settled series are
        left out.
    """
    now = now or utcnow()
    with sf() as s:
        spans = s.execute(
            select(
                NodeInstance.study_instance_uid,
                NodeInstance.series_instance_uid,
                func.count(NodeInstance.id),
                func.min(NodeInstance.received_at),
                func.max(NodeInstance.received_at),
            )
            .join(NodeStudy, NodeStudy.study_instance_uid == NodeInstance.study_instance_uid)
            .where(NodeStudy.pending.is_(True), NodeInstance.kept.is_(True), NodeInstance.path.is_not(None))
            .group_by(NodeInstance.study_instance_uid, NodeInstance.series_instance_uid)
        ).all()
    studies: dict[str, dict[str, tuple[int, datetime, datetime]]] = {}
    for study, series, count, first, last in spans:
        if study and series and first is not None and last is not None:
            studies.setdefault(study, {})[series] = (int(count), as_utc(first), as_utc(last))  # type: ignore[assignment]
    settled: dict[str, dict[str, int]] = {}
    for study, series_spans in studies.items():
        for series, (count, _, last) in series_spans.items():
            moved_on = any(f > last for other, (_, f, _) in series_spans.items() if other != series)
            if moved_on or (now - last).total_seconds() >= quiet_seconds:
                settled.setdefault(study, {})[series] = count
    return settled


@database_errors
def series_paths(sf: SessionFactory, study_uid: str, series_uids: Collection[str]) -> dict[str, list[str]]:
    """Spool paths of the kept instances of some series of a study, per series, in the order received."""
    out: dict[str, list[str]] = {}
    with sf() as s:
        rows = s.execute(
            select(NodeInstance.series_instance_uid, NodeInstance.path)
            .where(
                NodeInstance.study_instance_uid == study_uid,
                NodeInstance.series_instance_uid.in_(sorted(series_uids)),
                NodeInstance.kept.is_(True),
                NodeInstance.path.is_not(None),
            )
            .order_by(NodeInstance.id)
        ).all()
    for series, path in rows:
        out.setdefault(str(series), []).append(str(path))
    return out


@database_errors
def instance_counts(sf: SessionFactory) -> dict[str, int]:
    """Received instances (kept and ignored) and studies."""
    with sf() as s:
        kept = s.scalar(select(func.count(NodeInstance.id)).where(NodeInstance.kept.is_(True))) or 0
        ignored = s.scalar(select(func.count(NodeInstance.id)).where(NodeInstance.kept.is_(False))) or 0
        studies = s.scalar(select(func.count(NodeStudy.id))) or 0
    return {"kept": int(kept), "ignored": int(ignored), "studies": int(studies)}
