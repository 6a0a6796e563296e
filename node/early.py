"""Early analysis: start on a study's series while the PACS is still sending the rest of the study.

A PACS sends a study series by series, and the node learns that the study is complete only when
nothing has arrived for ``study_idle_seconds``. Without early analysis every step of the job (reading
the series, brain extraction, registration, inference) waits for that moment. With it, a series is
taken up as soon as it looks complete (``db.instances.settled_series``: the PACS moved on to another
series, or none of its instances came for ``early_quiet_seconds``): the node routes the settled part
of the study as a job would, and runs the most capable model those series allow, in one background
thread, while the other series arrive.

Nothing leaves the node from here and nothing is written: the results wait in memory for the
study's job, which takes them (:meth:`EarlyAnalysis.take`) and uses a piece only where its own
routing chose the very same files (node/pipeline.py ``_Study``). A study whose later series change
the choice (another FLAIR, all four series for the sub-region model) recomputes what changed, so the
job's result is the one it would have computed alone. What was reused is in the job's result
(``early_analysis``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from db import instances
from db.exceptions import DatabaseUnavailableError
from node.log_scrub import scrub_text
from node.pipeline import EarlyWork, JobContext, analyse_early

logger = logging.getLogger(__name__)

#: Studies whose early work waits for their job at once; the oldest is dropped beyond this (a study
#: whose job never came, or a PACS pushing studies faster than the worker runs them). Each holds its
#: series' volumes, data sets and masks (~100 MB for a 1 mm FLAIR) until its job takes it.
MAX_STUDIES = 2
#: Longest a job waits for an early run still in progress on its study before computing alone.
TAKE_TIMEOUT_S = 300.0


class EarlyAnalysis:
    """Early analysis of the studies being received; one instance per node process.

    Parameters
    ----------
    ctx:
        The workers' job context: models, brain extractor, selection and registration settings.
    quiet_seconds:
        A series none of whose instances came for this long is settled even if no other series
        followed it (the last series of a study).
    before_run:
        Called before each run (the node lowers the engines' worker threads' priority there).
    """

    def __init__(
        self, ctx: JobContext, quiet_seconds: float, before_run: Callable[[], object] | None = None
    ) -> None:
        self.ctx = ctx
        self.quiet_seconds = quiet_seconds
        self.before_run = before_run
        self._cond = threading.Condition()
        self._work: dict[str, EarlyWork] = {}
        #: The series (UID, file count) each study's latest run saw: a study is run again only when
        #: a new series has settled or a settled one grew.
        self._seen: dict[str, frozenset[tuple[str, int]]] = {}
        self._running: str | None = None
        #: Studies whose job took the work, with when: not taken up again while the job runs.
        self._taken: dict[str, float] = {}
        #: Studies whose job stopped waiting for their run: its work is dropped when the run ends.
        self._abandoned: set[str] = set()

    def run_once(self) -> bool:
        """Look for settled series and run the first study that has new ones; True when one ran."""
        try:
            settled = instances.settled_series(self.ctx.sf, self.quiet_seconds)
        except DatabaseUnavailableError as exc:
            logger.debug("early analysis: database unavailable (%s)", exc)
            return False
        with self._cond:  # studies no longer being received are forgotten (their work, if any, stays)
            for study_uid in [s for s in self._seen if s not in settled]:
                del self._seen[study_uid]
        for study_uid, counts in settled.items():
            seen = frozenset(counts.items())
            with self._cond:
                if self._seen.get(study_uid) == seen or self._recently_taken(study_uid):
                    continue
                self._seen[study_uid] = seen
                self._running = study_uid
                work = self._work.pop(study_uid, None) or EarlyWork()
                self._work[study_uid] = work  # the newest last: eviction drops the oldest
            try:
                self._run(study_uid, list(counts), work)
            finally:
                with self._cond:
                    self._running = None
                    if study_uid in self._abandoned:  # its job went on alone: nobody will take this
                        self._abandoned.discard(study_uid)
                        self._work.pop(study_uid, None)
                        self._seen.pop(study_uid, None)
                    self._evict()
                    self._cond.notify_all()
            return True
        return False

    def take(self, study_uid: str) -> EarlyWork | None:
        """The early work on ``study_uid`` for its job (waiting for a run in progress), or None.

        The work is handed over once: a later run of the study starts afresh.
        """
        deadline = time.monotonic() + TAKE_TIMEOUT_S
        with self._cond:
            self._taken[study_uid] = time.monotonic()
            while self._running == study_uid and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            if self._running == study_uid:  # still at it: the job computes alone (the run's work is dropped)
                logger.warning("early analysis of study %s still running: the job goes on alone", study_uid)
                self._abandoned.add(study_uid)
                return None
            self._seen.pop(study_uid, None)
            return self._work.pop(study_uid, None)

    def waiting(self) -> list[str]:
        """Studies whose early work waits for their job (none of them being worked on right now)."""
        with self._cond:
            return [uid for uid in self._work if uid != self._running]

    def _recently_taken(self, study_uid: str) -> bool:
        taken = self._taken.get(study_uid)
        return taken is not None and time.monotonic() - taken < max(60.0, self.quiet_seconds)

    def _evict(self) -> None:
        while len(self._work) > MAX_STUDIES:
            oldest = next(iter(self._work))
            # Its series stay seen: the study is not run again unless they change.
            logger.info("early analysis: dropped the work on study %s (its job has not come)", oldest)
            del self._work[oldest]
        now = time.monotonic()
        for study_uid in [s for s, t in self._taken.items() if now - t > 3600.0]:
            del self._taken[study_uid]

    def _run(self, study_uid: str, series_uids: Collection[str], work: EarlyWork) -> None:
        """Analyse the settled series of ``study_uid`` into ``work``."""
        start = time.perf_counter()
        if self.before_run is not None:
            self.before_run()
        try:
            analyse_early(self.ctx, instances.series_paths(self.ctx.sf, study_uid, series_uids), work)
        except Exception as exc:  # the job will meet the same problem and report it
            why = scrub_text(str(exc))  # a library's message may quote a value of the study
            logger.info("early analysis of study %s stopped: %s: %s", study_uid, type(exc).__name__, why)
        logger.info(
            "early analysis of study %s: %d settled series in %.2f s",
            study_uid,
            len(series_uids),
            time.perf_counter() - start,
        )
