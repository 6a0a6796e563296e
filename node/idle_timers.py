"""The idle timers of the studies this process received, kept right across steps of the wall clock.

A study's idle timer (``node_studies.last_received_at``, :mod:`db.instances`) is a wall-clock time
that every node process and host sharing the database stamps, and a later stamp never moves it back:
hosts' clocks differ by seconds. Only a timer stamped more than ``CLOCK_STEP_SECONDS`` (300 s) ahead
counts as a clock that was set back since. So when this host's clock was stepped (NTP correcting a
clock that ran ahead or behind), the stamps this process wrote before the step were off by the step:
stepped back by less than 300 s, a study became due that much late (290 s back, 10 s idle: 301 s
after its last instance); stepped forward, it became due early, perhaps before the rest of it came.

The receiving process knows better: for each study it stamped (an instance recorded, an open
association's touch) it keeps the monotonic time of that stamp and what the wall clock read then.
When the wall clock has since moved against the monotonic clock, :meth:`IdleTimers.reconcile` sets
the study's timer to the time of that stamp by the wall clock now
(:func:`db.instances.restamp_study`): due ``study_idle_seconds`` after its last instance whatever the
step. It does so only while the timer is still this process's stamp (none later, from another host or
process, and no instance recorded after this process's last); otherwise the shared rules stand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from db import instances
from db.transactions import SessionFactory, utcnow

logger = logging.getLogger(__name__)

#: How far the wall clock may move against the monotonic clock before it counts as a step (NTP's
#: slewing moves it by well under a second in the minutes a study waits).
STEP_TOLERANCE_SECONDS = 1.0

#: Studies remembered at most (the least recently stamped are forgotten first).
MAX_STUDIES = 4096


@dataclass(frozen=True)
class _Stamp:
    mono: float  # monotonic time of this process's last stamp of the study
    wall: datetime  # what the wall clock read at ``mono`` (as of the last reconcile)
    ceiling: datetime  # the latest wall time this process stamped the study with, on any clock
    last_instance: str  # SOP Instance UID of the last instance this process recorded in the study


class IdleTimers:
    """This process's stamps of the studies it received (see the module's docstring).

    Parameters
    ----------
    idle_seconds:
        ``[node] study_idle_seconds``; a study is forgotten ``CLOCK_STEP_SECONDS`` after that.
    wall, mono:
        The clocks (the tests' to step); None: :func:`db.transactions.utcnow`, :func:`time.monotonic`.
    """

    def __init__(
        self,
        idle_seconds: float,
        wall: Callable[[], datetime] | None = None,
        mono: Callable[[], float] | None = None,
    ) -> None:
        self.keep_seconds = idle_seconds + instances.CLOCK_STEP_SECONDS
        self.wall: Callable[[], datetime] = wall or (lambda: utcnow())
        self.mono: Callable[[], float] = mono or (lambda: time.monotonic())
        self._stamps: OrderedDict[str, _Stamp] = OrderedDict()
        self._lock = threading.Lock()
        self._reconciling = threading.Lock()

    def recorded(self, study_uid: str, sop_instance_uid: str) -> None:
        """An instance of ``study_uid`` was just recorded (its transaction committed) by this process."""
        self._stamp(study_uid, sop_instance_uid)

    def touched(self, study_uids: set[str]) -> None:
        """The timers of ``study_uids`` were just restarted (:func:`db.instances.touch_studies`)."""
        for uid in study_uids:
            self._stamp(uid, None)

    def _stamp(self, study_uid: str, sop_instance_uid: str | None) -> None:
        mono, wall = self.mono(), self.wall()
        with self._lock:
            before = self._stamps.get(study_uid)
            if sop_instance_uid is None:
                if before is None:  # a touch alone: no instance of this process to tell its own by
                    return
                sop_instance_uid = before.last_instance
            ceiling = wall if before is None else max(before.ceiling, wall)
            self._stamps[study_uid] = _Stamp(mono, wall, ceiling, sop_instance_uid)
            self._stamps.move_to_end(study_uid)
            while len(self._stamps) > MAX_STUDIES:
                self._stamps.popitem(last=False)

    def reconcile(self, sf: SessionFactory) -> int:
        """Set the timer of each study whose stamps the wall clock has stepped away from since to
        its last stamp's time by the wall clock now; returns how many were set. A read and a write per
        such study, nothing while the clock keeps time.

        Raises
        ------
        DatabaseUnavailableError, DatabaseOperationError
            The update failed; the next call tries again.
        """
        if not self._reconciling.acquire(blocking=False):
            return 0  # another worker is at it
        try:
            return self._reconcile(sf)
        finally:
            self._reconciling.release()

    def _reconcile(self, sf: SessionFactory) -> int:
        mono, wall = self.mono(), self.wall()
        tolerance = timedelta(seconds=STEP_TOLERANCE_SECONDS)
        stepped: list[tuple[str, _Stamp, datetime]] = []
        with self._lock:
            for uid, stamp in list(self._stamps.items()):
                if mono - stamp.mono > self.keep_seconds:
                    del self._stamps[uid]
                    continue
                now = wall - timedelta(seconds=mono - stamp.mono)  # the stamp's time by today's clock
                if abs(now - stamp.wall) > tolerance or stamp.ceiling > stamp.wall + tolerance:
                    stepped.append((uid, stamp, now))
        restamped: list[float] = []  # the step each timer was set across, in seconds
        for uid, stamp, now in stepped:
            ours = instances.restamp_study(
                sf, uid, now, ours_until=stamp.ceiling, last_instance=stamp.last_instance
            )
            if ours:
                restamped.append((now - max(stamp.wall, stamp.ceiling)).total_seconds())
            with self._lock:
                if self._stamps.get(uid) is not stamp:
                    continue  # stamped again meanwhile: the next call looks again
                if ours:
                    self._stamps[uid] = _Stamp(stamp.mono, now, now, stamp.last_instance)
                else:  # another host's or process's stamp, or no longer waiting: the shared rules
                    del self._stamps[uid]
        if restamped:
            logger.warning(
                "the wall clock was stepped (%+.0f s): the idle timers of %d studies received here now "
                "count from their last instance by the clock now",
                restamped[0],
                len(restamped),
            )
        return len(restamped)
