"""C-STORE SCU: deliver job outputs to the destinations, retried from the database with backoff.

Each due send row is leased (a conditional update) before its C-STORE, and the lease is renewed while
its delivery runs, so two sender threads or processes (replicas on one database) never both send it,
however long the delivery takes; it is marked ``done`` only after the destination's Success status. A
destination that is down gets its rows rescheduled with exponential backoff and blocks no other: each
destination is delivered in a thread of its own (``segnode-send-NAME``), and a destination whose
delivery is still running is not claimed again until it ends, so one that accepts TCP and never answers
holds only its own sends, for up to the association timeout.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT

from db import send_queue
from db.send_queue import SendInfo
from db.transactions import SessionFactory
from node import dimse, reactor
from node.config import TLSSettings
from node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

#: Seconds a send row stays leased to the sender that took it: its delivery renews the lease every quarter
#: of this while it runs (up to 100 sends, each up to the DIMSE timeout, can outlast any fixed lease), so
#: the lease ends this long after the delivery or its process stopped.
LEASE_SECONDS = 120.0

#: How an object's error text begins when the destination accepted no presentation context for it.
NOT_ACCEPTED = "not accepted by the destination"

#: A destination as its send rows name it: (name, AE title, host, port).
DestinationKey = tuple[str, str, str, int]


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


#: OpenSSL's verify codes for a certificate that does not name the peer: X509_V_ERR_HOSTNAME_MISMATCH,
#: X509_V_ERR_IP_ADDRESS_MISMATCH.
NAME_MISMATCH_CODES = frozenset({62, 64})


def client_tls_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The SCU's SSL context from ``[tls]`` (None when TLS is off): verify peers with ``ca``, present
    ``cert``/``key`` for mutual TLS.

    The destination's certificate must also name it (host name checking): the name each association
    gives as ``server_hostname``, the destination's ``tls_server_name`` or else its ``host``. Without
    that check any certificate the CA ever issued (another device's; with ``ca`` empty, any public
    certificate for any name) received the SEG and SR of every study.
    """
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
    ctx.check_hostname = True  # create_default_context's default, stated: a mismatch refuses the peer
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def tls_verify_failure(
    ctx: ssl.SSLContext, host: str, port: int, server_name: str, timeout: float
) -> ssl.SSLCertVerificationError | None:
    """Why the certificate of ``host:port`` fails verification for ``server_name`` with ``ctx``, or None
    (it passes, or the handshake fails otherwise).

    pynetdicom logs a failed handshake and reports only an association that did not start; a second
    handshake (no DICOM data is sent) tells which certificate check failed.
    """
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        return exc
    except (OSError, ValueError):
        return None


def _tls_failure_text(
    exc: ssl.SSLCertVerificationError, host: str, port: int, server_name: str, destination: str
) -> str:
    """A send error for a destination certificate that failed verification, saying what to change."""
    why = exc.verify_message or str(exc)
    whose = f"destination {destination!r}" if destination else "the destination"
    if exc.verify_code in NAME_MISMATCH_CODES:
        return (
            f"TLS: the certificate of {whose} at {host}:{port} is not issued for {server_name!r} ({why}); "
            f"set tls_server_name of {whose} to a name its certificate carries (a DNS name of its "
            "subjectAltName), or host to that name"
        )
    return f"TLS: the certificate of {whose} at {host}:{port} failed verification ({why}); check [tls] ca"


def store_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "SEGNODE",
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
    server_name: str = "",
    destination: str = "",
) -> list[tuple[Path, int | None, str]]:
    """Send files over one association; returns (path, status or None, error text) per file, in the
    order of ``paths``.

    Each file has its own outcome: one that cannot be read, one whose SOP Class the destination did
    not accept, and those left when the association ends mid-way (a DIMSE timeout aborts it) get no
    status and say why; the others' statuses stand. The error text is empty for Success and names
    the status otherwise (a Warning status means stored: :func:`node.dimse.stored`).
    ``tls``: a client SSL context to speak DICOM over TLS (PS3.15 B.1); the destination's certificate
    must name ``server_name`` (default: ``host``). ``destination``: its name, for error messages.

    Raises
    ------
    ConnectionError
        The association could not be established (refused, rejected, timed out, a certificate that
        failed verification: the message says which check and what to set).
    """
    outcome: dict[int, tuple[int | None, str]] = {}
    datasets: list[tuple[int, Dataset]] = []
    for n, path in enumerate(paths):
        try:
            datasets.append((n, _readable(path)))
        except (OSError, InvalidDicomError) as exc:
            outcome[n] = (None, f"cannot read the file: {exc}")
    if datasets:
        outcome.update(
            _store_datasets(
                datasets, host, port, called_ae, calling_ae, timeout, tls, server_name or host, destination
            )
        )
    return [(Path(path), *outcome[n]) for n, path in enumerate(paths)]


def _readable(path: str | Path) -> Dataset:
    """The output file at ``path``, with the UIDs its C-STORE needs.

    pydicom reads a file cut short (a damaged disk, a copy interrupted outside the node) without
    complaint as far as it goes; without its SOP Class, SOP Instance or Transfer Syntax UID it is
    unreadable here rather than an AttributeError that would fail every other output of the batch.
    """
    ds = pydicom.dcmread(path)
    meta = getattr(ds, "file_meta", None)
    missing = [
        keyword for keyword, holder in (
            ("SOPClassUID", ds), ("SOPInstanceUID", ds), ("TransferSyntaxUID", meta)
        ) if holder is None or not str(getattr(holder, keyword, "") or "")
    ]  # fmt: skip
    if missing:
        raise InvalidDicomError(f"no {', '.join(missing)}")
    return ds


def requested_contexts(objects: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose for objects of these (SOP Class, transfer syntax) pairs.

    An object stored in an uncompressed little endian syntax is offered in it and in Explicit and
    Implicit VR Little Endian (one context per SOP Class): pynetdicom re-encodes it in whichever the
    destination accepts. Offering only the file's own syntax lost the SEG and SR (Explicit VR files) at a
    destination that accepts only Implicit VR Little Endian, the DICOM default (``storescp +xi``). A
    compressed object can only go in its own syntax (a context of its own).
    """
    convertible: dict[str, list[str]] = defaultdict(list)
    contexts: list[tuple[str, list[str]]] = []
    for sop_class, syntax in sorted(set(objects)):
        uid = UID(syntax)
        if uid.is_little_endian and not uid.is_compressed:
            convertible[sop_class].append(syntax)
        else:
            contexts.append((sop_class, [syntax]))
    for sop_class, syntaxes in convertible.items():
        offered = [*syntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts.append((sop_class, list(dict.fromkeys(str(s) for s in offered))))
    return sorted(contexts)


def _store_datasets(
    datasets: list[tuple[int, Dataset]],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout: float,
    tls: ssl.SSLContext | None,
    server_name: str,
    destination: str,
) -> dict[int, tuple[int | None, str]]:
    ae = AE(ae_title=calling_ae)
    # connection_timeout too: without it a host that never completes the TCP handshake (a firewall that
    # drops) holds the delivery for the operating system's SYN retries, about two minutes.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, syntaxes in requested_contexts(
        (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets
    ):
        ae.add_requested_context(sop_class, syntaxes)
    tls_args = (tls, server_name) if tls is not None else None
    watch = _Watch()
    assoc = reactor.associate(ae, host, port, called_ae, tls_args=tls_args, evt_handlers=watch.handlers())
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        # The association was accepted without one presentation context (a PACS without SEG Storage
        # offered only the SEG): every object is refused, not the connection.
        refused = ", ".join(sorted({str(c.abstract_syntax) for c in assoc.rejected_contexts}))
        why = f"{NOT_ACCEPTED}: no presentation context accepted for {refused}"
        return {n: (None, why) for n, _ in datasets}
    if not assoc.is_established:
        # Say so plainly when a certificate check refused the destination.
        failure = None if tls is None or assoc.is_rejected else tls_verify_failure(
            tls, host, port, server_name, min(timeout, 10.0)
        )
        if failure is not None:
            raise ConnectionError(_tls_failure_text(failure, host, port, server_name, destination))
        why = _association_failure(assoc, watch, host, port, calling_ae, tls is not None, timeout)
        raise ConnectionError(f"association to {called_ae}@{host}:{port} {why}")
    set_nodelay(assoc)
    outcome: dict[int, tuple[int | None, str]] = {}
    ended = ""
    try:
        for n, ds in datasets:
            if ended or not assoc.is_established:
                ended = ended or "the association ended"
                outcome[n] = (None, f"not sent: {ended}")
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except ValueError as exc:  # pynetdicom: no accepted presentation context for its SOP Class
                outcome[n] = (None, f"{NOT_ACCEPTED}: {exc}")
                continue
            except RuntimeError as exc:  # the association ended under the call
                ended = f"the association ended ({exc})"
                outcome[n] = (None, ended)
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            if status is None:
                assoc.dul.join(min(timeout, 2.0))  # the DUL ends at an abort; its A-P-ABORT comes last
            if status is None and (abort := watch.abort(assoc)) is not None:
                ended = f"association {_abort_text(abort)} during C-STORE"
                outcome[n] = (None, ended)
                continue
            if status is None and not assoc.is_established:
                ended = "no response within the DIMSE timeout; the association was aborted"
                outcome[n] = (None, ended)
                continue
            error = "" if status == dimse.SUCCESS else (
                f"status {dimse.describe(status)}" if status is not None else "no status in the response"
            )
            outcome[n] = (status, error)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


class _Watch:
    """What an association met: whether its connection opened (TCP, and TLS when on), and the aborts
    from the peer's side (an A-ABORT, or an A-P-ABORT: the connection closed or an invalid PDU)."""

    def __init__(self) -> None:
        self.connected = False
        self.aborts: list[A_ABORT | A_P_ABORT] = []

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """The event handlers to bind to the association."""
        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_ACSE_RECV, self._received)]

    def _opened(self, event: Any) -> None:
        self.connected = True

    def _received(self, event: Any) -> None:
        if isinstance(event.primitive, (A_ABORT, A_P_ABORT)):
            self.aborts.append(event.primitive)

    def abort(self, assoc: Any) -> A_ABORT | A_P_ABORT | None:
        """The abort from the peer's side: one the ACSE took (the handler saw it) or still queued for it."""
        if self.aborts:
            return self.aborts[0]
        queued = assoc.dul.peek_next_pdu()
        return queued if isinstance(queued, (A_ABORT, A_P_ABORT)) else None


#: PS3.8 9.3.8: the reasons of an A-P-ABORT (0: not specified, which is also a closed connection).
PROVIDER_ABORT_REASONS = {
    0x01: "unrecognized PDU",
    0x02: "unexpected PDU",
    0x04: "unrecognized PDU parameter",
    0x05: "unexpected PDU parameter",
    0x06: "invalid PDU parameter value",
}


def _abort_text(abort: A_ABORT | A_P_ABORT) -> str:
    """An abort from the peer's side, in words."""
    if isinstance(abort, A_ABORT):
        return "aborted by the peer"
    reason = PROVIDER_ABORT_REASONS.get(abort.provider_reason or 0)
    if reason is None:
        return "ended by the peer (it closed the connection, or its DICOM layer aborted)"
    return f"aborted by the DICOM layer (A-P-ABORT: {reason})"


def _association_failure(
    assoc: Any, watch: _Watch, host: str, port: int, calling_ae: str, tls: bool, timeout: float
) -> str:
    """Why an association was not established, in words that tell a misconfigured AE title (a rejection
    and its reason) from a destination that is down (the socket error) or that did not answer."""
    answer = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected and answer is not None:
        text = (
            f"rejected: {answer.reason_str} ({answer.result_str.lower()}, by the {answer.source_str.lower()})"
        )
        by_user = answer.result_source == dimse.SOURCE_SERVICE_USER
        if by_user and answer.diagnostic == dimse.DIAG_CALLED_AE_NOT_RECOGNIZED:
            text += "; check the destination's ae_title"
        elif by_user and answer.diagnostic == dimse.DIAG_CALLING_AE_NOT_RECOGNIZED:
            text += f"; the destination does not know our AE title {calling_ae!r}"
        return text
    if not watch.connected:
        try:
            # pynetdicom logs the socket error only; a second connection gets it (nothing is sent).
            socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
        except OSError as exc:
            return f"failed: cannot connect to {host}:{port}: {exc}"
        if tls:
            return f"failed: the TLS handshake with {host}:{port} failed (the node's log has the error)"
        return f"failed: cannot connect to {host}:{port} (a second try connected)"
    if (abort := watch.abort(assoc)) is not None:
        return f"failed: {_abort_text(abort)} before it was accepted"
    return f"failed: no answer to the association request within {timeout:g} s"


class Sender:
    """Delivers due sends; call :meth:`run_once` periodically, from one thread.

    Parameters
    ----------
    sf:
        The session factory of the node's database.
    metrics:
        Where the per-destination send and failure counters go.
    calling_ae:
        Our AE title on the associations.
    base_seconds, max_seconds:
        Backoff after a failed attempt: ``base_seconds`` doubled per attempt, at most ``max_seconds``.
    tls:
        A client SSL context (DICOM over TLS, PS3.15 B.1), or None.
    server_names:
        Destination name -> the name its TLS certificate must carry when it is not the destination's
        host (``[[destinations]] tls_server_name``).
    timeout:
        ACSE, DIMSE and network timeout of each association, in seconds: how long a destination that
        accepts TCP but never answers holds its own delivery.
    max_parallel:
        Deliveries (one per destination) running at once; further destinations wait for a later call.
    max_refusals:
        Attempts after which a send the destination refuses for good (:func:`_refused`) ends
        ``refused``; 0: never. Connection failures and timeouts never end a send.
    addresses:
        Destination name -> its (AE title, host, port) in the node's config now. A send goes to these
        rather than to the address it was queued with: an administrator who corrects a destination's
        port or AE title in node.toml and restarts the node gets the sends already queued delivered
        there. A send whose destination is no longer configured keeps its own address.
    """

    def __init__(
        self,
        sf: SessionFactory,
        metrics: NodeMetrics,
        calling_ae: str,
        base_seconds: float = 5.0,
        max_seconds: float = 600.0,
        tls: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        max_parallel: int = 8,
        max_refusals: int = 10,
        server_names: Mapping[str, str] | None = None,
        addresses: Mapping[str, tuple[str, str, int]] | None = None,
    ) -> None:
        self.sf = sf
        self.metrics = metrics
        self.calling_ae = calling_ae
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.tls = tls
        self.server_names = dict(server_names or {})
        self.addresses = dict(addresses or {})
        self.timeout = timeout
        self.max_parallel = max(1, max_parallel)
        self.max_refusals = max_refusals
        self._lock = threading.Lock()
        self._in_flight: dict[DestinationKey, threading.Thread] = {}
        self._errors: deque[Exception] = deque()  # of background deliveries, not yet reported
        self._closed = False

    def run_once(self, wait: bool = True) -> int:
        """Claim the due sends of every destination not being delivered now and deliver them, one
        thread per destination.

        Parameters
        ----------
        wait:
            True: return when these deliveries have ended, with how many sends were acknowledged (the
            first exception of a delivery is raised once all have ended). False: return at once with
            how many sends were claimed; the deliveries go on in the background.

        Raises
        ------
        Exception
            Also the exception of a background delivery that ended before this call (a database error,
            say), one per call and before anything new is claimed, so that the caller's error handling
            sees it.
        """
        if self._closed:
            return 0
        if (earlier := self._take_background_error()) is not None:
            raise earlier  # of a delivery that ended before this call; new claims wait for the next
        groups = self._claim()
        futures = [self._start(key, sends, background=not wait) for key, sends in groups.items()]
        if not wait:
            return sum(len(sends) for sends in groups.values())
        wait_futures(futures)
        for future in futures:
            if (exc := future.exception()) is not None:
                raise exc
        return sum(future.result() for future in futures)

    def in_flight(self) -> list[str]:
        """Names of the destinations whose delivery is running now."""
        with self._lock:
            return sorted(key[0] for key in self._in_flight)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Start no more deliveries and wait up to ``timeout`` seconds for the running ones.

        A delivery still running after that keeps its sends leased while it runs; once it or the process
        ends, sends it did not mark are sent again when the lease ends (by this process if it carries
        on, else by another sender or the next start).
        """
        self._closed = True
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._in_flight.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if still := self.in_flight():
            logger.warning("sender stopped with deliveries still running to: %s", ", ".join(still))
        with self._lock:
            errors, self._errors = list(self._errors), deque()
        for exc in errors:
            logger.error("send delivery error", exc_info=exc)

    def _claim(self) -> dict[DestinationKey, list[SendInfo]]:
        """Lease the due sends, grouped by destination, skipping destinations being delivered now."""
        with self._lock:
            busy = set(self._in_flight)
        groups: dict[DestinationKey, list[SendInfo]] = defaultdict(list)
        send_queue.restart_sends_after_a_clock_step(self.sf, max(self.max_seconds, LEASE_SECONDS))
        for send in send_queue.due_sends(self.sf, exclude_destinations={key[0] for key in busy}):
            key = self._address(send)
            if key in busy or (key not in groups and len(busy) + len(groups) >= self.max_parallel):
                continue
            if send_queue.claim_send(self.sf, send, LEASE_SECONDS):
                groups[key].append(send)
        return groups

    def _address(self, send: SendInfo) -> DestinationKey:
        """Where ``send`` goes: its destination's address in the config now, else the one it was
        queued with (see ``addresses``)."""
        queued = (send.ae_title, send.host, send.port)
        current = self.addresses.get(send.destination, queued)
        if current != queued:
            logger.info(
                "send %d: destination %s is configured at %s@%s:%d now, not %s@%s:%d as when queued; "
                "sent to the configured address", send.id, send.destination, *current, *queued,
            )  # fmt: skip
        return (send.destination, *current)

    def _start(self, key: DestinationKey, sends: list[SendInfo], background: bool) -> Future[int]:
        future: Future[int] = Future()
        thread = threading.Thread(
            target=self._run,
            args=(key, sends, future, background),
            name=f"segnode-send-{key[0]}",
            daemon=True,  # a destination that never answers must not hold up the process's exit
        )
        with self._lock:
            self._in_flight[key] = thread
        thread.start()
        return future

    def _run(
        self, key: DestinationKey, sends: list[SendInfo], future: Future[int], background: bool
    ) -> None:
        """A delivery thread: the destination is free again before its result is published."""
        try:
            delivered = self._deliver(*key, sends)
        except Exception as exc:
            # Reported in full by the caller (the next run_once raises it); this line names the
            # destination. Sends not yet marked stay leased and are retried when the lease ends.
            first_line = (str(exc).strip().splitlines() or [""])[0]
            logger.warning("delivery to %s stopped: %s: %s", key[0], type(exc).__name__, first_line)
            with self._lock:
                del self._in_flight[key]
                if background:
                    self._errors.append(exc)
            future.set_exception(exc)
        else:
            with self._lock:
                del self._in_flight[key]
            future.set_result(delivered)

    def _take_background_error(self) -> Exception | None:
        with self._lock:
            return self._errors.popleft() if self._errors else None

    def _deliver(self, name: str, ae_title: str, host: str, port: int, sends: list[SendInfo]) -> int:
        try:
            paths = [Path(s.path) for s in sends]
            with self._leases_renewed(sends):
                results = store_files(
                    paths, host, port, ae_title, self.calling_ae, timeout=self.timeout, tls=self.tls,
                    server_name=self.server_names.get(name, ""), destination=name,
                )  # fmt: skip
        except Exception as exc:  # no association (or none usable): every send waits its backoff
            reason = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            for send in sends:
                self._failed(send, reason)
            return 0
        delivered = 0
        for send, (_, status, error) in zip(sends, results, strict=True):
            if dimse.stored(status):
                # A Warning status (stored, with elements coerced or dropped) stays on the row.
                send_queue.mark_sent(self.sf, send.id, warning=f"stored with {error}" if error else "")
                self.metrics.sends.labels(name).inc()
                delivered += 1
                if status == dimse.SUCCESS:
                    logger.info("job %d: %s delivered to %s", send.job_id, Path(send.path).name, name)
                else:  # stored, with what the destination changed or dropped
                    logger.warning(
                        "job %d: %s delivered to %s with %s",
                        send.job_id, Path(send.path).name, name, error,
                    )
            else:
                self._failed(send, error, refused=_refused(status, error))
        return delivered

    @contextmanager
    def _leases_renewed(self, sends: list[SendInfo]) -> Iterator[None]:
        """Renew the lease of ``sends`` every quarter of :data:`LEASE_SECONDS` until the block ends.

        Without it a delivery that outlasted the lease (the rows are marked only once the association
        has ended) had its sends claimed and sent again by another sender on the same database.
        """
        lease = LEASE_SECONDS
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(lease / 4):
                try:
                    send_queue.renew_leases(self.sf, sends, lease)
                except Exception as exc:  # the next try may succeed; the lease lasts 3 more of these
                    logger.warning("renewing the lease of %d sends failed: %s", len(sends), exc)

        thread = threading.Thread(target=renew, name=f"segnode-lease-{sends[0].destination}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _failed(self, send: SendInfo, error: str, refused: bool = False) -> None:
        give_up = refused and self.max_refusals > 0 and send.attempts + 1 >= self.max_refusals
        when = send_queue.mark_send_failed(
            self.sf, send.id, error, base_seconds=self.base_seconds, max_seconds=self.max_seconds,
            give_up=give_up,
        )
        self.metrics.send_failures.labels(send.destination).inc()
        if when is None:
            logger.error(
                "job %d: %s refused by %s %d times (%s): not sent again (segnode jobs show %d)",
                send.job_id, Path(send.path).name, send.destination, send.attempts + 1, error, send.job_id,
            )
            return
        logger.warning(
            "job %d: sending %s to %s failed (%s); next attempt at %s",
            send.job_id,
            Path(send.path).name,
            send.destination,
            error,
            when.isoformat(timespec="seconds"),
        )


def _refused(status: int | None, error: str) -> bool:
    """Whether the destination refused the object for good: a failure status about the object
    (:func:`node.dimse.refused_for_good`) or no presentation context for its SOP class."""
    return dimse.refused_for_good(status) or error.startswith(NOT_ACCEPTED)
