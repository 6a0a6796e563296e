"""Receiving processes: ``[node] receivers`` processes accept C-STOREs on the node's one port.

One Python process serves every association with one interpreter lock, so four associations on two
cores are no faster than one. With ``receivers = N`` the node's own process keeps its SCP and starts
N - 1 more processes that listen on the same port (``SO_REUSEPORT``: the kernel hands each new
association to one of them). Each is the same :class:`~node.scp.StorageSCP` (AE allowlist, TLS,
free-disk floor, durable spool and group commit) without models, workers or HTTP; the database is the
only thing they share with the node:

* instance rows and the study idle timers go to the one database (SQLite writers queue on a file lock,
  :func:`db.transactions.writing`);
* each receiver restarts the idle timer of the studies its open associations are delivering, as the
  node does for its own (:func:`db.instances.touch_studies`), so no study becomes due mid-transfer;
* each receiver's instance counts reach the node's ``/metrics`` through a pipe of its own.

Receivers stop on SIGTERM, and each talks to the node over its own pipe only: a receiver killed with
SIGKILL leaves no shared lock or semaphore held that the node or the other receivers would wait on.

``max_associations`` holds per process (the kernel, not the node, picks the process of an
association). A receiver that dies is started again by the node.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

from node.config import Settings
from node.exceptions import NodeError
from node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

#: The node's log line format (``segnode`` CLI), used by receivers too.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Seconds a new receiver may take to import its libraries and listen.
START_TIMEOUT_S = 60.0
#: Seconds between a receiver's deliveries of its counts (and checks for a stop or a dead parent).
REPORT_SECONDS = 0.25

_SPAWN = multiprocessing.get_context("spawn")


#: Outcomes of ``segnode_instances_received`` (node/scp.py).
OUTCOMES = ("kept", "duplicate", "ignored", "rejected")


class _Counts:
    """A receiver's instance counts since it last reported them (read from its own registry)."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics
        self.reported: dict[str, float] = dict.fromkeys(OUTCOMES, 0.0)

    def take(self) -> dict[str, float]:
        """The counts by outcome added since the last call (empty when none)."""
        delta = {}
        for outcome in OUTCOMES:
            value = self.metrics.registry.get_sample_value(
                "segnode_instances_received_total", {"outcome": outcome}
            ) or 0.0
            if value > self.reported[outcome]:
                delta[outcome] = value - self.reported[outcome]
                self.reported[outcome] = value
        return delta


def receive(settings: Settings, port: int, log_level: int, channel: Connection) -> None:
    """A receiver process's main: serve C-STOREs on ``port`` until SIGTERM or the node's exit.

    ``channel`` carries ``"ready"`` once the SCP listens, then the instance counts by outcome.
    """
    from db import instances
    from db.session import make_engine, make_session_factory
    from node.log_scrub import install as scrub_library_logs
    from node.memory import limit_arenas
    from node.scp import StorageSCP

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops us
    limit_arenas()
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    scrub_library_logs()
    parent = os.getppid()
    node = settings.node
    node.port = port
    engine = make_engine(settings.database.resolved_url())
    sf = make_session_factory(engine)
    metrics = NodeMetrics()
    counter = _Counts(metrics)
    scp = StorageSCP(node, sf, metrics, settings.tls, shared_port=True)
    scp.start()
    channel.send("ready")
    touched_at = -1e9
    try:
        while not stopping.wait(REPORT_SECONDS) and os.getppid() == parent:
            delta = counter.take()
            if delta:
                channel.send(delta)
            receiving = scp.studies_in_flight()
            if receiving and time.monotonic() - touched_at >= node.study_idle_seconds / 2:
                try:
                    instances.touch_studies(sf, receiving)
                    touched_at = time.monotonic()
                except Exception as exc:  # the database is down: the C-STOREs say so themselves
                    logger.warning("receiver %d: idle timers not restarted: %s", os.getpid(), exc)
    finally:
        scp.stop()
        delta = counter.take()
        if delta:
            channel.send(delta)
        channel.close()
        engine.dispose()


@dataclass
class _Receiver:
    process: SpawnProcess
    channel: Connection  # the node's end: counts come in
    closed: bool = False


class ReceiverPool:
    """The node's extra receiving processes (``[node] receivers`` - 1).

    Parameters
    ----------
    settings:
        The node's configuration, handed to each receiver.
    port:
        The port the node's own SCP is bound to (with ``SO_REUSEPORT``).
    metrics:
        The node's metrics; receivers' instance counts are added to ``instances``.
    """

    def __init__(self, settings: Settings, port: int, metrics: NodeMetrics) -> None:
        self.settings = settings
        self.port = port
        self.metrics = metrics
        self.size = max(0, settings.node.receivers - 1)
        self._receivers: list[_Receiver] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: C-STOREs answered by each receiver (process id), as reported so far.
        self.received: Counter[int] = Counter()

    def start(self) -> None:
        """Start the receivers and wait until each listens.

        Raises
        ------
        NodeError
            A receiver did not listen within ``START_TIMEOUT_S`` (the others are stopped).
        """
        try:
            for _ in range(self.size):
                self._receivers.append(self._spawn())
        except BaseException:
            self.stop()
            raise
        for target, name in ((self._forward_counts, "segnode-receiver-counts"),
                             (self._watch, "segnode-receiver-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self._receivers:
            logger.info("%d more receiving process(es) on port %d: %s", self.size, self.port, self.pids)

    def _spawn(self) -> _Receiver:
        reader, writer = _SPAWN.Pipe(duplex=False)
        process = _SPAWN.Process(
            target=receive,
            args=(self.settings, self.port, logging.getLogger().getEffectiveLevel(), writer),
            name="segnode-receiver",
            daemon=True,
        )
        process.start()
        writer.close()  # the receiver holds the only writing end: its exit is EOF here
        try:
            if not reader.poll(START_TIMEOUT_S) or reader.recv() != "ready":
                raise EOFError
        except (EOFError, OSError):
            process.kill()
            process.join()
            reader.close()
            raise NodeError(
                f"node.receivers: a receiving process did not listen on port {self.port} "
                f"(exit code {process.exitcode}); see its log lines above"
            ) from None
        return _Receiver(process, reader)

    def _forward_counts(self) -> None:
        while not self._stopping.is_set() or any(not r.closed for r in self._receivers):
            open_ = {r.channel: r for r in list(self._receivers) if not r.closed}
            if not open_:
                time.sleep(0.1)
                continue
            for ready in multiprocessing.connection.wait(list(open_), timeout=0.5):
                receiver = open_[ready]  # type: ignore[index]
                try:
                    delta: dict[str, float] = receiver.channel.recv()
                except (EOFError, OSError):
                    receiver.closed = True
                    continue
                for outcome, amount in delta.items():
                    self.metrics.instances.labels(outcome).inc(amount)
                self.received[receiver.process.pid or 0] += int(sum(delta.values()))

    def _watch(self) -> None:
        """Start a receiver again when one exits while the node runs."""
        while not self._stopping.wait(1.0):
            for i, receiver in enumerate(list(self._receivers)):
                if receiver.process.is_alive() or self._stopping.is_set():
                    continue
                logger.error("receiving process %d exited (code %s); starting another",
                             receiver.process.pid, receiver.process.exitcode)
                try:
                    self._receivers[i] = self._spawn()
                except NodeError as exc:
                    logger.error("%s", exc)

    def alive(self) -> bool:
        """True when every receiver runs."""
        return all(r.process.is_alive() for r in self._receivers)

    @property
    def pids(self) -> list[int]:
        """Process ids of the receivers."""
        return [r.process.pid for r in self._receivers if r.process.pid is not None]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the receivers (SIGTERM: each closes its associations) and take their last counts."""
        self._stopping.set()
        for receiver in self._receivers:
            receiver.process.terminate()
        for receiver in self._receivers:
            receiver.process.join(timeout)
            if receiver.process.is_alive():
                receiver.process.kill()
                receiver.process.join()
        for thread in self._threads:
            thread.join(timeout)
        for receiver in self._receivers:
            receiver.channel.close()
        self._receivers = []

    def describe(self) -> dict[str, Any]:
        """For ``/healthz``: how many receivers run out of how many, and what each answered."""
        return {
            "extra": self.size,
            "alive": sum(r.process.is_alive() for r in self._receivers),
            "instances": {str(pid): n for pid, n in self.received.items()},
        }
