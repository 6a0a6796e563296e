"""Receiving processes: ``[node] receivers`` processes accept C-STOREs on the node's one port.

One Python process serves every association with one interpreter lock, so four associations on two
cores are no faster than one. With ``receivers = N`` the node's own process keeps its SCP and starts
N - 1 more processes that accept on its listening socket, which they inherit: whichever process is
free first takes a new association (:class:`~node.scp.SharedPortServer`). Each is the same
:class:`~node.scp.StorageSCP` (AE allowlist, TLS, free-disk floor, durable spool and group commit)
without models, workers or HTTP; the database is the only state they share with the node:

* instance rows and the study idle timers go to the one database (SQLite writers queue on a file lock,
  :func:`db.transactions.writing`);
* each receiver restarts the idle timer of the studies its open associations are delivering, as the
  node does for its own (:func:`db.instances.touch_studies`), so no study becomes due mid-transfer;
* each receiver's instance counts reach the node's ``/metrics`` as JSON lines on its stdout.

A receiver is ``python -m node.receivers FD LOG_LEVEL`` (FD: the listening socket) with the node's
settings pickled on its stdin (no multiprocessing: the node's own main module never runs again). It
stops on SIGTERM or when the node is gone, and talks to the node over its own pipe only: a receiver
killed with SIGKILL leaves no shared lock held that the node or the other receivers would wait on.

``max_associations`` holds per process. A receiver that dies is started again by the node.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import IO, Any

from node import LOG_FORMAT
from node.config import Settings
from node.exceptions import NodeError
from node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

#: Seconds a new receiver may take to import its libraries and listen.
START_TIMEOUT_S = 60.0
#: Seconds between a receiver's deliveries of its counts (and checks for a stop or a dead parent).
REPORT_SECONDS = 0.25
#: The counter whose samples a receiver reports to the node (node/metrics.py, by outcome).
INSTANCES_COUNTER = "segnode_instances_received"


class _Counts:
    """A receiver's instance counts since it last reported them (read from its own registry)."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics
        self.reported: dict[str, float] = {}

    def take(self) -> dict[str, float]:
        """The counts by outcome added since the last call (empty when none), for every outcome the
        receiver has counted (node/scp.py: kept, replaced, duplicate, ignored, rejected)."""
        delta = {}
        for metric in self.metrics.registry.collect():
            if metric.name != INSTANCES_COUNTER:
                continue
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                outcome = sample.labels["outcome"]
                if sample.value > self.reported.get(outcome, 0.0):
                    delta[outcome] = sample.value - self.reported.get(outcome, 0.0)
                    self.reported[outcome] = sample.value
        return delta


def receive(settings: Settings, listen_fd: int, log_level: int, out: IO[str]) -> None:
    """A receiver's main: serve C-STOREs on the inherited socket ``listen_fd`` until SIGTERM or the
    node's exit.

    ``out`` gets ``ready`` once the SCP listens, then one JSON object of instance counts by outcome
    per report.
    """
    from db.session import make_engine, make_session_factory
    from node.log_scrub import install as scrub_library_logs
    from node.memory import tune_malloc
    from node.scp import StorageSCP

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the node stops us
    tune_malloc()
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    scrub_library_logs()
    parent = os.getppid()
    engine = make_engine(settings.database.resolved_url())
    sf = make_session_factory(engine)
    metrics = NodeMetrics()
    counter = _Counts(metrics)
    scp = StorageSCP(settings.node, sf, metrics, settings.tls, listen_fd=listen_fd)

    def report() -> None:
        delta = counter.take()
        if delta:
            out.write(json.dumps(delta) + "\n")
            out.flush()

    scp.start()
    out.write("ready\n")
    out.flush()
    try:
        while not stopping.wait(REPORT_SECONDS) and os.getppid() == parent:
            report()
            try:
                scp.refresh_idle_timers()
            except Exception as exc:  # the database is down: the C-STOREs say so themselves
                logger.warning("receiver %d: idle timers not restarted: %s", os.getpid(), exc)
    finally:
        scp.stop()
        report()
        engine.dispose()


def _main() -> None:
    """``python -m node.receivers FD LOG_LEVEL``, the settings pickled on stdin (ReceiverPool)."""
    settings = pickle.load(sys.stdin.buffer)
    receive(settings, int(sys.argv[1]), int(sys.argv[2]), sys.stdout)


class ReceiverPool:
    """The node's extra receiving processes (``[node] receivers`` - 1).

    Parameters
    ----------
    settings:
        The node's configuration, handed to each receiver.
    listen_fd:
        The node's listening socket (its SCP started with ``shared_port``), inherited by each receiver.
    metrics:
        The node's metrics; receivers' instance counts are added to ``instances``.
    """

    def __init__(self, settings: Settings, listen_fd: int, metrics: NodeMetrics) -> None:
        self.settings = settings
        self.listen_fd = listen_fd
        self.metrics = metrics
        self.size = max(0, settings.node.receivers - 1)
        self._processes: list[subprocess.Popen[bytes]] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
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
                self._processes.append(self._spawn())
        except BaseException:
            self.stop()
            raise
        self._thread(self._watch, "segnode-receiver-watch")
        if self._processes:
            logger.info("%d more receiving process(es): %s", self.size, self.pids)

    def _thread(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _spawn(self) -> subprocess.Popen[bytes]:
        """One receiver, listening when this returns; its counts forwarded by a thread of its own."""
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        level = logging.getLogger().getEffectiveLevel()
        process = subprocess.Popen(
            [sys.executable, "-m", "node.receivers", str(self.listen_fd), str(level)],
            pass_fds=[self.listen_fd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(pickle.dumps(self.settings))
        process.stdin.close()
        listening, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        if not listening or process.stdout.readline().strip() != b"ready":
            process.kill()
            process.wait()
            raise NodeError(
                "node.receivers: a receiving process did not start "
                f"(exit code {process.returncode}); see its log lines above"
            )
        self._thread(self._forward_counts, f"segnode-receiver-{process.pid}", process)
        return process

    def _forward_counts(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:  # until the receiver exits
            delta: dict[str, float] = json.loads(line)
            with self._lock:
                for outcome, amount in delta.items():
                    self.metrics.instances.labels(outcome).inc(amount)
                self.received[process.pid] += int(sum(delta.values()))

    def _watch(self) -> None:
        """Start a receiver again when one exits while the node runs."""
        while not self._stopping.wait(1.0):
            for i, process in enumerate(list(self._processes)):
                if process.poll() is None or self._stopping.is_set():
                    continue
                logger.error("receiving process %d exited (code %s); starting another", process.pid,
                             process.returncode)
                try:
                    self._processes[i] = self._spawn()
                except NodeError as exc:
                    logger.error("%s", exc)

    def alive(self) -> bool:
        """True when every receiver runs."""
        return all(p.poll() is None for p in self._processes)

    @property
    def pids(self) -> list[int]:
        """Process ids of the receivers."""
        return [p.pid for p in self._processes]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the receivers (SIGTERM: each closes its associations) and take their last counts."""
        self._stopping.set()
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in self._threads:
            thread.join(timeout)
        for process in self._processes:
            if process.stdout is not None:
                process.stdout.close()
        self._processes = []

    def describe(self) -> dict[str, Any]:
        """For ``/healthz``: how many receivers run out of how many, and what each answered."""
        return {
            "extra": self.size,
            "alive": sum(p.poll() is None for p in self._processes),
            "instances": {str(pid): n for pid, n in self.received.items()},
        }


if __name__ == "__main__":
    _main()
