"""Read-ahead: parse spool files while their series is still arriving, for early analysis to take.

Early analysis (node/early.py) starts on a series once it has settled, and its first step reads every
file of the series (``pydicom.dcmread``). Read then, a 155-slice FLAIR takes 0.3-0.4 s while the rest
of the study arrives, all of it on the path to the SEG. Between the files of a series arriving, the
early-analysis thread is idle: it parses each file as soon as the receiver has spooled it, and the
read of the settled series takes the parsed data sets instead of reading the files again. Only series
that a model may read are read ahead: the first file of each series is parsed and shown to ``wanted``
with the first files of the study's series judged before it (the node asks its series selector whether
any active model's modalities match it, with the study's exam-wide ProtocolName as the job sees it);
the rest of a series that is not wanted is skipped unread.

Nothing changes what a job computes: an entry is used only for the very file it was read from (same
path, inode, size and modification time; a spool file is written once, by rename), each entry is
handed out once, and a file that was not read ahead (or was evicted) is read as before. The cache is
bounded in bytes (the oldest entries go first) and in time: what nobody took within ``max_age_s`` (a
series no model chose) is dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

import pydicom
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

#: What the data sets read ahead may hold at once, in file bytes (a 1 mm FLAIR of 155 slices: ~18 MB).
DEFAULT_BUDGET_BYTES = 96 * 1024 * 1024
#: Paths waiting to be read ahead at most; beyond this the oldest are not read ahead (read later as usual).
MAX_QUEUED = 20_000
#: Series whose verdict (wanted or not) is remembered; the oldest are forgotten beyond this.
MAX_SERIES = 1_000

#: A file's identity: inode, size and modification time.
Signature = tuple[int, int, int]


def _signature(path: str) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ReadAhead:
    """Spool files parsed ahead of the read that needs them; one per node process.

    Parameters
    ----------
    budget_bytes:
        Most file bytes the parsed data sets may stand for at once.
    max_age_s:
        Data sets not taken this long after they were read are dropped (:meth:`expire`).
    wanted:
        Whether a series is worth reading ahead, from its first file's data set and those of the same
        study's series judged before it (no pixel data); None: every series.
    wake:
        Called when a path is queued (the early-analysis loop wakes to read it).
    """

    def __init__(
        self,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        max_age_s: float = 120.0,
        wanted: Callable[[Dataset, Sequence[Dataset]], bool] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.max_age_s = max_age_s
        self._wanted = wanted
        self._wake = wake
        self._queue: deque[tuple[str, str]] = deque(maxlen=MAX_QUEUED)
        #: series UID -> whether its files are read ahead (decided on its first file).
        self._verdicts: OrderedDict[str, bool] = OrderedDict()
        #: series UID -> (StudyInstanceUID, its first file's header without pixel data), as judged.
        self._firsts: OrderedDict[str, tuple[str, Dataset]] = OrderedDict()
        self._lock = threading.Lock()
        #: path -> (signature, data set, when it was read); oldest first.
        self._cache: OrderedDict[str, tuple[Signature, Dataset, float]] = OrderedDict()
        self._bytes = 0
        #: Files taken from the cache and files read from disk instead (tests and benchmarks read them).
        self.hits = 0
        self.misses = 0

    def note(self, series_uid: str, path: str) -> None:
        """Queue spool file ``path`` of series ``series_uid``, just written (the receiver calls this
        once the C-STORE is durable)."""
        self._queue.append((series_uid, path))
        if self._wake is not None:
            self._wake()

    def pending(self) -> int:
        """Paths queued and not read yet."""
        return len(self._queue)

    def work(self, until: Callable[[], bool]) -> int:
        """Parse queued files until the queue is empty or ``until()`` is true; returns how many."""
        done = 0
        while self._queue and not until():
            series_uid, path = self._queue.popleft()
            if self._verdicts.get(series_uid) is False:
                continue
            signature = _signature(path)
            if signature is None:  # gone already (a study cleaned up): nothing to keep
                continue
            try:
                ds = pydicom.dcmread(path)
            except Exception as exc:  # the read that needs it will meet the same problem and report it
                logger.debug("read-ahead of %s skipped: %s", path, type(exc).__name__)
                continue
            if series_uid not in self._verdicts and not self._judge(series_uid, ds):
                continue
            self._put(path, signature, ds)
            done += 1
        return done

    def _judge(self, series_uid: str, ds: Dataset) -> bool:
        """Decide from its first file, and those of its study's series judged before it, whether series
        ``series_uid`` is read ahead."""
        study = str(ds.get("StudyInstanceUID", "") or "")
        others = [header for uid, (of, header) in self._firsts.items() if of == study and uid != series_uid]
        try:
            verdict = self._wanted is None or bool(self._wanted(ds, others))
        except Exception as exc:  # an odd header: read nothing ahead, the run reads it as usual
            logger.debug("read-ahead: series %s not judged (%s)", series_uid, type(exc).__name__)
            verdict = False
        self._verdicts[series_uid] = verdict
        self._firsts[series_uid] = (study, Dataset({e.tag: e for e in ds if e.tag.group < 0x7FE0}))
        if len(self._verdicts) > MAX_SERIES:
            self._verdicts.popitem(last=False)
        if len(self._firsts) > MAX_SERIES:
            self._firsts.popitem(last=False)
        return verdict

    def read(self, path: str) -> Dataset:
        """The data set of spool file ``path``: the one read ahead, when it is of this very file,
        otherwise ``pydicom.dcmread(path)``."""
        with self._lock:
            entry = self._cache.pop(path, None)
            if entry is not None:
                self._bytes -= entry[0][1]
        if entry is not None and entry[0] == _signature(path):
            self.hits += 1
            return entry[1]
        self.misses += 1
        return pydicom.dcmread(path)

    def expire(self) -> int:
        """Drop the data sets read more than ``max_age_s`` ago; returns how many."""
        cutoff = time.monotonic() - self.max_age_s
        dropped = 0
        with self._lock:
            while self._cache:
                path, (signature, _, read_at) = next(iter(self._cache.items()))
                if read_at >= cutoff:
                    break
                del self._cache[path]
                self._bytes -= signature[1]
                dropped += 1
        return dropped

    def cached(self) -> int:
        """Data sets held."""
        with self._lock:
            return len(self._cache)

    def _put(self, path: str, signature: Signature, ds: Dataset) -> None:
        with self._lock:
            old = self._cache.pop(path, None)
            if old is not None:
                self._bytes -= old[0][1]
            self._cache[path] = (signature, ds, time.monotonic())
            self._bytes += signature[1]
            while self._bytes > self.budget_bytes and self._cache:
                _, (sig, _, _) = self._cache.popitem(last=False)
                self._bytes -= sig[1]
