"""Prometheus metrics of one node process, in their own registry (so tests can run several nodes)."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger(__name__)

_STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)

#: Seconds a client of /metrics and /healthz has to send its whole request (line and headers).
REQUEST_SECONDS = 5.0
#: Connections /metrics and /healthz serve at once (a Prometheus, a kubelet's probes and a person);
#: further ones are closed as soon as they are accepted.
MAX_CONNECTIONS = 16
#: Seconds between two log lines about connections closed at accept.
REFUSAL_LOG_SECONDS = 60.0


class NodeMetrics:
    """The node's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances = Counter(
            "segnode_instances_received", "SOP instances received, by outcome", ["outcome"], registry=r
        )
        self.studies = Gauge(
            "segnode_studies_received", "Studies with MR instances in the database", registry=r
        )
        self.jobs = Gauge("segnode_jobs", "Jobs in the database, by state", ["state"], registry=r)
        self.queue_depth = Gauge("segnode_queue_depth", "Jobs waiting to run", registry=r)
        self.pending_sends = Gauge("segnode_pending_sends", "Sends not yet acknowledged", registry=r)
        self.refused_sends = Gauge(
            "segnode_refused_sends",
            "Sends a destination refused for good, not tried again, not superseded by a retry of "
            "their job nor dismissed (segnode jobs dismiss): results not delivered (segnode jobs list)",
            registry=r,
        )
        self.jobs_in_review = Gauge(
            "segnode_jobs_in_review",
            "Jobs held in review by a QC check that no later run of their study supersedes: results not "
            "sent, until released (segnode jobs retry ID --send-anyway) or retried (segnode jobs list "
            "--status review)",
            registry=r,
        )
        self.stage_seconds = Histogram(
            "segnode_stage_seconds",
            "Duration of each job stage",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "segnode_inference_seconds", "Model inference time per job", buckets=_STAGE_BUCKETS, registry=r
        )
        self.sends = Counter(
            "segnode_sends", "Objects acknowledged by a destination", ["destination"], registry=r
        )
        self.send_failures = Counter(
            "segnode_send_failures", "Failed C-STORE attempts", ["destination"], registry=r
        )
        self.jobs_finished = Counter(
            "segnode_jobs_finished", "Jobs finished, by state", ["state"], registry=r
        )
        self.spool_removed = Counter(
            "segnode_spool_removed_instances",
            "Received instances removed from the spool, by the state of their study's latest job: "
            "done (result delivered, [node] spool_keep_hours ago), failed or skipped "
            "([node] failed_keep_hours ago)",
            ["state"],
            registry=r,
        )
        self.qc_failures = Counter(
            "segnode_qc_failures",
            "Results held for review, by failed QC rule (node/qc.py; one job may fail several)",
            ["rule"],
            registry=r,
        )
        self.qc_cautions = Counter(
            "segnode_qc_cautions",
            "Results written with a QC caution in their SR (node/qc.py; sent, not held), by caution",
            ["caution"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes that must all arrive before ``deadline`` (``time.monotonic()``): each read waits
    only for what is left of it, so a client that trickles its request is not waited for again with
    every byte (a per-read timeout is)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once; further ones are closed at accept."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int
    ) -> None:
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refused = 0
        self._refused_logged_at = -1e9
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._note_refusal(client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _note_refusal(self, client_address: Any) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSAL_LOG_SECONDS:
            logger.warning(
                "metrics endpoint: connection from %s closed at accept: %d connections are being served "
                "already; %d closed so since the last line",
                client_address, self.max_connections, self._refused,
            )  # fmt: skip
            self._refused, self._refused_logged_at = 0, now


class MetricsServer:
    """HTTP ``/metrics`` (Prometheus text) and ``/healthz`` (JSON) on a background thread.

    A client has ``request_seconds`` for its whole request, and at most ``max_connections`` are served at
    once, further ones closed at accept: without either, each client that opened a connection and never
    finished its request line held a thread and a descriptor for good, and enough of them used up the
    process's descriptors (the DICOM port's too).

    Parameters
    ----------
    metrics:
        The metrics to expose.
    refresh:
        Called before each ``/metrics`` answer to update gauges read from the database.
    health:
        Returns ``(ok, details)`` for ``/healthz``; status 200 when ok, else 503.
    request_seconds, max_connections:
        Default :data:`REQUEST_SECONDS`, :data:`MAX_CONNECTIONS`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: NodeMetrics,
        refresh: Callable[[], None],
        health: Callable[[], tuple[bool, dict[str, Any]]],
        request_seconds: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        outer = self
        seconds = REQUEST_SECONDS if request_seconds is None else request_seconds

        class Handler(BaseHTTPRequestHandler):
            timeout = seconds  # for writing the answer; reading has the request's deadline

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # the socket's own reader, replaced by one with the request's deadline
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + seconds))

            def do_GET(self) -> None:
                self.connection.settimeout(seconds)
                try:
                    if self.path.split("?")[0] == "/metrics":
                        refresh()
                        outer._answer(self, 200, metrics.render(), CONTENT_TYPE_LATEST)
                    elif self.path.split("?")[0] == "/healthz":
                        ok, details = health()
                        body = json.dumps({"status": "ok" if ok else "unhealthy", **details}).encode()
                        outer._answer(self, 200 if ok else 503, body, "application/json")
                    else:
                        outer._answer(self, 404, b"not found\n", "text/plain")
                except Exception:  # the one place HTTP handler errors are caught
                    logger.exception("metrics endpoint %s failed", self.path)
                    outer._answer(self, 500, b"internal error\n", "text/plain")

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("http: " + format, *args)

        self.httpd = _BoundedHTTPServer(
            (host, port), Handler, MAX_CONNECTIONS if max_connections is None else max_connections
        )
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="segnode-metrics", daemon=True)

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (if started) and close the socket."""
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which never ran otherwise
            self.httpd.shutdown()
        self.httpd.server_close()
