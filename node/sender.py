"""C-STORE SCU: deliver job outputs to the destinations, retried from the database with backoff.

Each due send row is leased (a conditional update) before its C-STORE, so two sender threads or
processes never both send it; it is marked ``done`` only after the destination's Success status. A
destination that is down gets its rows rescheduled with exponential backoff and blocks no other.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE

from node import dimse, store
from node.config import TLSSettings
from node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

#: Seconds a send row stays leased to the sender that took it.
LEASE_SECONDS = 120.0


def set_nodelay(assoc: Any) -> None:
    """Turn Nagle's algorithm off on an association's socket.

    A C-STORE is written as a command PDU then a data set PDU before the response is read; with
    Nagle on, the second write waits for the peer's delayed ACK (~40 ms per instance on Linux).
    """
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if isinstance(raw, socket.socket):
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # pragma: no cover - socket already closed
            logger.debug("TCP_NODELAY not set: %s", exc)


def client_tls_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The SCU's SSL context from ``[tls]`` (None when TLS is off): verify peers with ``ca``, present
    ``cert``/``key`` for mutual TLS."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
    ctx.check_hostname = False  # DICOM peers are named by AE title and address, not host name
    ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def store_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "SEGNODE",
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> list[tuple[Path, int | None, str]]:
    """Send files over one association; returns (path, status or None, error text) per file.

    ``tls``: a client SSL context to speak DICOM over TLS (PS3.15 B.1).

    Raises
    ------
    ConnectionError
        The association could not be established (refused, rejected, timed out).
    """
    datasets = [(Path(p), pydicom.dcmread(p)) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}
    ):
        ae.add_requested_context(sop_class, [syntax])
    tls_args = (tls, host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise ConnectionError(f"association to {called_ae}@{host}:{port} failed ({why})")
    set_nodelay(assoc)
    results: list[tuple[Path, int | None, str]] = []
    try:
        for path, ds in datasets:
            rsp = assoc.send_c_store(ds)
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            error = (
                ""
                if status == dimse.SUCCESS
                else f"status {dimse.describe(status) if status is not None else 'none'}"
            )
            results.append((path, status, error))
    finally:
        assoc.release()
    return results


class Sender:
    """Delivers due sends; call :meth:`run_once` periodically."""

    def __init__(
        self,
        sf: store.SessionFactory,
        metrics: NodeMetrics,
        calling_ae: str,
        base_seconds: float = 5.0,
        max_seconds: float = 600.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sf = sf
        self.metrics = metrics
        self.calling_ae = calling_ae
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.tls = tls

    def run_once(self) -> int:
        """Attempt every due send once; returns how many were acknowledged."""
        due = store.due_sends(self.sf)
        groups: dict[tuple[str, str, str, int], list[store.SendInfo]] = defaultdict(list)
        for send in due:
            if store.claim_send(self.sf, send, LEASE_SECONDS):
                groups[(send.destination, send.ae_title, send.host, send.port)].append(send)
        delivered = 0
        for (name, ae_title, host, port), sends in groups.items():
            delivered += self._deliver(name, ae_title, host, port, sends)
        return delivered

    def _deliver(self, name: str, ae_title: str, host: str, port: int, sends: list[store.SendInfo]) -> int:
        try:
            paths = [Path(s.path) for s in sends]
            results = store_files(paths, host, port, ae_title, self.calling_ae, tls=self.tls)
        except (ConnectionError, OSError, ValueError) as exc:
            for send in sends:
                self._failed(send, str(exc))
            return 0
        delivered = 0
        for send, (_, status, error) in zip(sends, results, strict=True):
            if status == dimse.SUCCESS:
                store.mark_sent(self.sf, send.id)
                self.metrics.sends.labels(name).inc()
                delivered += 1
                logger.info("job %d: %s delivered to %s", send.job_id, Path(send.path).name, name)
            else:
                self._failed(send, error)
        return delivered

    def _failed(self, send: store.SendInfo, error: str) -> None:
        when = store.mark_send_failed(
            self.sf, send.id, error, base_seconds=self.base_seconds, max_seconds=self.max_seconds
        )
        self.metrics.send_failures.labels(send.destination).inc()
        logger.warning(
            "job %d: sending %s to %s failed (%s); next attempt at %s",
            send.job_id,
            Path(send.path).name,
            send.destination,
            error,
            when.isoformat(timespec="seconds"),
        )
