"""Group commit: C-STOREs that arrive together share one database transaction.

Each association's handler hands its row to :meth:`GroupCommitter.record` and gets the answer only once
a transaction holding that row has committed. The first handler to find no commit running commits
every row queued by then (its own included); handlers that queued meanwhile wait for that commit to
end and the next of them commits all that queued behind it. With one association every commit holds
one row and no thread is added to the path; with several, a commit holds as many rows as there were
handlers waiting (PostgreSQL's and InnoDB's group commit work the same way).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from db import instances
from db.instances import ReceivedInstance
from db.transactions import SessionFactory

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    row: ReceivedInstance
    new: bool = False
    error: BaseException | None = None
    done: bool = field(default=False)


class GroupCommitter:
    """Records received instances, several associations' rows to a transaction.

    Parameters
    ----------
    session_factory:
        Database sessions for the instance rows.
    """

    def __init__(self, session_factory: SessionFactory) -> None:
        self.sf = session_factory
        self._queued: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        #: Rows per commit so far (for tests and the benchmark's notes), capped in length.
        self.batch_sizes: list[int] = []

    def record(self, row: ReceivedInstance) -> bool:
        """Record ``row``; returns once its transaction has committed.

        Returns
        -------
        bool
            False when the SOP Instance UID was already recorded (:func:`db.instances.record_instances`).

        Raises
        ------
        DatabaseUnavailableError, DatabaseOperationError
            The transaction that held the row failed; none of its rows is recorded.
        """
        pending = _Pending(row)
        with self._queue_lock:
            self._queued.append(pending)
        with self._commit_lock:
            if not pending.done:
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._commit(batch)
        if pending.error is not None:
            raise pending.error
        return pending.new

    def _commit(self, batch: list[_Pending]) -> None:
        """One transaction for ``batch``; each member gets its result or the transaction's error."""
        try:
            new = instances.record_instances(self.sf, [p.row for p in batch])
        except Exception as exc:  # delivered to every handler of the batch, which maps it to a status
            for p in batch:
                p.error, p.done = exc, True
            return
        for p, is_new in zip(batch, new, strict=True):
            p.new, p.done = is_new, True
        if len(self.batch_sizes) < 100_000:
            self.batch_sizes.append(len(batch))
