"""Prometheus metrics of one node process, in their own registry (so tests can run several nodes)."""

from __future__ import annotations

import json
import logging
import threading
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

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))


class MetricsServer:
    """HTTP ``/metrics`` (Prometheus text) and ``/healthz`` (JSON) on a background thread.

    Parameters
    ----------
    metrics:
        The metrics to expose.
    refresh:
        Called before each ``/metrics`` answer to update gauges read from the database.
    health:
        Returns ``(ok, details)`` for ``/healthz``; status 200 when ok, else 503.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: NodeMetrics,
        refresh: Callable[[], None],
        health: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
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

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
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
