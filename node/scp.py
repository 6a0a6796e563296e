"""The DICOM SCP: C-ECHO and C-STORE of every storage SOP class, with a durable receive.

MR Image Storage, Enhanced MR Image Storage (and its Legacy Converted form) instances are spooled
and recorded (they make studies and jobs); every other storage object (SR, presentation states, our
own SEG and SR coming back from a PACS, and the vendors' private objects of
:data:`PRIVATE_STORAGE_SOP_CLASSES`) is acknowledged and counted but neither stored nor processed, so
no routing loop can start. Success goes back only after the file is fsynced and its
row committed; otherwise a failure status (PS3.4 B.2.3) tells the PACS to keep its copy.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    Verification,
    register_uid,
)
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from converters.dicom_series import readable_transfer_syntaxes
from db import instances
from db.exceptions import DatabaseOperationError, DatabaseUnavailableError
from db.transactions import SessionFactory
from node import dimse, pdu_guard
from node.committer import GroupCommitter
from node.config import NodeSettings, TLSSettings
from node.exceptions import InvalidInstanceError, NodeError, SpoolError
from node.idle_timers import IdleTimers
from node.instance_header import InstanceHeader, read_header
from node.metrics import NodeMetrics
from node.part10 import file_header
from node.reactor import make_monotonic, make_prompt, make_waiting
from node.sender import set_nodelay
from node.spool import free_mb, spool_path, write_atomic
from node.store_response import make_quick_store_response
from node.uids import validated_uid

logger = logging.getLogger(__name__)

#: Largest P-DATA PDU the node accepts (announced in A-ASSOCIATE-AC, PS3.8 D.1). pynetdicom's default
#: 16 KiB splits a 240 x 240 slice into 8 PDUs, each decoded in Python; at 256 KiB a bare pynetdicom SCP
#: took 11 % more instances/s from DCMTK storescu here. Costs at most that much memory per association.
MAX_PDU_BYTES = 262144

#: SOP classes the node keeps and processes: MR images, single-frame and multi-frame.
KEPT_SOP_CLASSES: frozenset[str] = frozenset(
    {str(MRImageStorage), str(EnhancedMRImageStorage), str(LegacyConvertedEnhancedMRImageStorage)}
)


#: Vendors' private storage SOP classes (keyword, UID) that scanners put in the MR studies a PACS
#: routes on: the node acknowledges and counts them as it does every other object it does not keep.
#: pynetdicom knows only the standard's, and refused them at negotiation, so a PACS routing a whole
#: Siemens or Philips study logged failed sends and, configured so, retried the study.
PRIVATE_STORAGE_SOP_CLASSES: tuple[tuple[str, str], ...] = (
    ("SiemensCSANonImageStorage", "1.3.12.2.1107.5.9.1"),
    ("SiemensCTMRVolumeStorage", "1.3.12.2.1107.5.99.3.10"),
    ("SiemensAXFrameSetsStorage", "1.3.12.2.1107.5.99.3.11"),
    ("PhilipsPrivateMRSpectrumStorage", "1.3.46.670589.11.0.0.12.1"),
    ("PhilipsPrivateMRSeriesDataStorage", "1.3.46.670589.11.0.0.12.2"),
    ("PhilipsPrivateMRColorImageStorage", "1.3.46.670589.11.0.0.12.3"),
    ("PhilipsPrivateMRExamcardStorage", "1.3.46.670589.11.0.0.12.4"),
    ("GEPrivate3DModelStorage", "1.2.840.113619.4.26"),
    ("ToshibaPrivateDataStorage", "1.2.392.200036.9116.7.8.1.1.1"),
)
for _keyword, _uid in PRIVATE_STORAGE_SOP_CLASSES:
    register_uid(_uid, _keyword, StorageServiceClass)


#: Studies whose latest series the SCP remembers (to tell early analysis when a PACS moves on).
LAST_SERIES_STUDIES = 256


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with each TLS handshake in its association's own thread, and no more
    connections at once than the association limit allows (:meth:`process_request`)."""

    #: Connections beyond ``maximum_associations`` still served (pynetdicom rejects the association
    #: with A-ASSOCIATE-RJ, "local limit exceeded", so that a PACS is told why); further ones are closed
    #: as soon as they are accepted.
    ACCEPT_SLACK = 1
    #: Seconds between two log lines about connections closed at accept.
    REFUSAL_LOG_SECONDS = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._opening = 0  # connections accepted that have no association yet (TLS handshake)
        self._associations: set[Any] = set()  # the associations of the others, until their thread ends
        self._count_lock = threading.Lock()
        self._has_association = threading.local()  # in a request thread: its association, once made
        self._refused = 0  # closed at accept since the last log line about it
        self._refused_logged_at = -1e9
        super().__init__(*args, **kwargs)
        self.bind(evt.EVT_CONN_OPEN, self._on_association_made)

    def _on_association_made(self, event: Any) -> None:
        """Count the connection by its association from now on (before the association's thread starts,
        in the thread that accepted it)."""
        with self._count_lock:
            self._opening -= 1
            self._associations.add(event.assoc)
        self._has_association.made = event.assoc

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; its TLS handshake waits for its own thread (:meth:`process_request_thread`).

        pynetdicom's handshake ran here, in the one thread that accepts, on a socket without a
        timeout: a client that connected and sent nothing (a port scanner, a load balancer's probe)
        held every later association back for as long as it stayed connected.
        """
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def connections(self) -> int:
        """Connections this server holds: those accepted whose association is not made yet, and the
        associations made whose thread has not ended (each connection is counted once)."""
        with self._count_lock:
            ended = {a for a in self._associations if a.ident is not None and not a.is_alive()}
            self._associations -= ended
            return self._opening + len(self._associations)

    def process_request(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        """Serve the connection in a thread of its own, or close it at once when the node already holds
        ``maximum_associations`` (plus :data:`ACCEPT_SLACK`) connections.

        Each connection cost an association thread and a DUL thread, however many there were and
        whether or not they ever sent a request: a peer that opened hundreds held hundreds of threads.
        """
        if self.connections() >= self.ae.maximum_associations + self.ACCEPT_SLACK:
            self._note_refusal(client_address)
            self.shutdown_request(request)
            return
        with self._count_lock:
            self._opening += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._count_lock:
                self._opening -= 1
            raise

    def _note_refusal(self, client_address: tuple[str, int] | str) -> None:
        """Log connections closed at accept: the first, then at most one line per
        :data:`REFUSAL_LOG_SECONDS` with how many were closed."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= self.REFUSAL_LOG_SECONDS:
            logger.warning(
                "connection from %s closed at accept: %d connections are open, node.max_associations (%d) "
                "and %d beyond it that is answered with A-ASSOCIATE-RJ; %d closed so since the last line",
                client_address, self.ae.maximum_associations + self.ACCEPT_SLACK,
                self.ae.maximum_associations, self.ACCEPT_SLACK, self._refused,
            )  # fmt: skip
            self._refused, self._refused_logged_at = 0, now

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        """Do the TLS handshake (within ``acse_timeout`` and ``network_timeout`` of the accept, the
        whole handshake), then serve the association as pynetdicom does; a client that fails or stalls
        the handshake is logged and closed."""
        self._has_association.made = None
        try:
            pdu_guard.note_accepted(time.monotonic())  # the A-ASSOCIATE-RQ is due acse_timeout after this
            if self.ssl_context is not None and isinstance(request, socket.socket):
                limits = [float(t) for t in (self.ae.network_timeout, self.ae.acse_timeout) if t is not None]
                # CPython's handshake keeps one deadline for the whole handshake, not one per read.
                request.settimeout(min(limits) if limits else None)
                try:
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    logger.warning("TLS handshake with %s failed: %s", client_address, exc)
                    self.shutdown_request(request)
                    return
                request.settimeout(None)
            super().process_request_thread(request, client_address)
        finally:
            made = self._has_association.made
            with self._count_lock:
                if made is None:  # the handshake failed, or pynetdicom's handler did
                    self._opening -= 1
                elif made.ident is None:  # made, but its thread never started
                    self._associations.discard(made)


class SharedPortServer(NodeServer):
    """pynetdicom's threaded server on a listening socket that several node processes accept on
    (``[node] receivers``): the node binds it, receivers inherit its descriptor (``listen_fd``).

    The socket does not block: every process waiting on it wakes for a new association and the first
    to call ``accept`` takes it (the others get ``BlockingIOError``, which socketserver ignores), so a
    process busy with other associations leaves new ones to the idle ones.
    """

    #: The descriptor of an already listening socket to accept on instead of binding a new one.
    listen_fd: int | None = None

    def server_bind(self) -> None:
        """Bind as pynetdicom does, or adopt the inherited listening socket; then stop blocking."""
        if self.listen_fd is None:
            super().server_bind()
        else:
            if self.socket is not None:
                self.socket.close()
            self.socket = socket.socket(fileno=os.dup(self.listen_fd))
            self.server_address = self.socket.getsockname()
        assert self.socket is not None
        self.socket.setblocking(False)

    def server_activate(self) -> None:
        """Listen, unless the socket was inherited listening."""
        if self.listen_fd is None:
            super().server_activate()


class PresentationContexts(list[PresentationContext]):
    """A server's supported presentation contexts that pynetdicom copies cheaply for each association.

    pynetdicom deep-copies the server's contexts into every new association (``RequestHandler.
    _create_association``): for the node's ~180 contexts of ~45 transfer syntaxes each that took ~100 ms
    of interpreter time per association, mostly re-creating UID strings. A context's attributes are
    immutable values (UIDs, ints, None) apart from its list of transfer syntaxes, so a copy of each
    context with its own copy of that list is as independent as the deep copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [copy_context(context) for context in self]


def copy_context(context: PresentationContext) -> PresentationContext:
    """A copy of ``context`` as independent as its deep copy (see :class:`PresentationContexts`)."""
    twin = copy.copy(context)
    twin._transfer_syntax = list(context._transfer_syntax)
    return twin


def copy_supported_contexts(source: AE, target: AE) -> None:
    """Give ``target`` its own copies of ``source``'s supported presentation contexts, replacing its own.

    Adding a context through pynetdicom validates each of its transfer syntax UIDs with pydicom's regular
    expressions: for the node's 180 contexts of ~45 syntaxes each, ~0.25 s of interpreter time per AE.
    An AE built and validated once (:func:`node_contexts`) is copied instead, with
    :func:`copy_context`, into pynetdicom 3.0.4's table of supported contexts (the version is pinned;
    tests/node/test_receive_path.py checks the copy against contexts added one by one).
    """
    target._supported_contexts = {uid: copy_context(cx) for uid, cx in source._supported_contexts.items()}


@functools.cache
def node_contexts() -> AE:
    """An AE holding the node's supported presentation contexts, built once per process: verification;
    every storage SOP class of pynetdicom, images the node processes in the transfer syntaxes it can
    decode and other objects in all; the vendors' private storage SOP classes in all."""
    ae = AE()
    ae.add_supported_context(Verification)
    readable = list(readable_transfer_syntaxes(tuple(ALL_TRANSFER_SYNTAXES)))
    for context in AllStoragePresentationContexts:
        sop_class = str(context.abstract_syntax)
        # Images the node processes only in what it can decode; objects it never reads in any.
        syntaxes = readable if sop_class in KEPT_SOP_CLASSES else ALL_TRANSFER_SYNTAXES
        ae.add_supported_context(sop_class, syntaxes)
    for _, uid in PRIVATE_STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


@dataclass
class ReceiveResult:
    """What happened to one C-STORE request (for tests and metrics)."""

    status: int
    outcome: str  # kept | replaced | duplicate | ignored | rejected


def _guarded(handler: Callable[[Any], int]) -> Callable[[Any], int]:
    """The one place that turns handler exceptions into DIMSE failure statuses."""

    def wrapper(event: Any) -> int:
        try:
            return handler(event)
        except InvalidInstanceError as exc:
            logger.warning("C-STORE refused (%s): %s", dimse.describe(dimse.CANNOT_UNDERSTAND), exc)
            return dimse.CANNOT_UNDERSTAND
        except (SpoolError, DatabaseUnavailableError, DatabaseOperationError, OSError) as exc:
            logger.error("C-STORE failed (%s): %s", dimse.describe(dimse.OUT_OF_RESOURCES), exc)
            return dimse.OUT_OF_RESOURCES
        except Exception:
            logger.exception("C-STORE handler error (%s)", dimse.describe(dimse.PROCESSING_FAILURE))
            return dimse.PROCESSING_FAILURE

    return wrapper


def instance_header(event: Any, sop_uid: str) -> InstanceHeader:
    """What the node checks of a C-STORE's data set: read from its bytes (:func:`read_header`), or,
    for data sets that reader leaves alone, from pynetdicom's pydicom decoding as before.

    Raises
    ------
    InvalidInstanceError
        pydicom cannot decode the data set.
    """
    encoded = event.request.DataSet
    if encoded is not None:  # a C-STORE without a data set is refused by pydicom's path below
        with encoded.getbuffer() as received:
            header = read_header(received, str(event.context.transfer_syntax))
        if header is not None:
            return header
    try:
        return InstanceHeader.from_dataset(event.dataset, str(event.context.transfer_syntax))
    except Exception as exc:
        raise InvalidInstanceError(f"instance {sop_uid}: data set cannot be decoded: {exc}") from exc


def ignored_uids(event: Any) -> tuple[str | None, str | None]:
    """(Study, Series Instance UID) of a C-STORE of a class the node does not process, read from the
    data set's bytes by :func:`read_header` (a walk over its top-level element headers, no decoding),
    so that the instance's row is tied to its study; (None, None) where that reader cannot tell (a
    deflated or big-endian data set, a missing or malformed UID). Never decoded with pydicom: an
    object the node only acknowledges must not cost it, nor fail it, more than that."""
    encoded = event.request.DataSet
    if encoded is None:
        return None, None
    with encoded.getbuffer() as received:
        header = read_header(received, str(event.context.transfer_syntax))
    if header is None:
        return None, None
    return str(header.study_instance_uid), str(header.series_instance_uid)


def as_file(event: Any, sop_class: str, sop_uid: str) -> bytes:
    """The C-STORE's data set as a DICOM file: the data set's bytes as they arrived behind the
    preamble and File Meta Information (:func:`node.part10.file_header`, the bytes pynetdicom's
    ``encoded_dataset()`` makes, packed directly)."""
    with event.request.DataSet.getbuffer() as received:
        return file_header(sop_class, sop_uid, str(event.context.transfer_syntax)) + received


class StorageSCP:
    """The node's association acceptor.

    Parameters
    ----------
    settings:
        ``[node]``: AE title, address, allowed calling AEs, association limit, spool, free-disk floor.
    session_factory:
        Database sessions for the instance rows.
    metrics:
        Counters to update.
    tls:
        ``[tls]``: when enabled the SCP speaks DICOM over TLS.
    shared_port:
        Listen on a socket that other node processes (``[node] receivers``) accept on too
        (:class:`SharedPortServer`).
    listen_fd:
        Accept on this inherited listening socket instead of binding one (a receiver process).
    """

    def __init__(
        self,
        settings: NodeSettings,
        session_factory: SessionFactory,
        metrics: NodeMetrics | None = None,
        tls: TLSSettings | None = None,
        shared_port: bool = False,
        listen_fd: int | None = None,
    ) -> None:
        self.settings = settings
        self.shared_port = shared_port or listen_fd is not None
        self.listen_fd = listen_fd
        self.committer = GroupCommitter(session_factory)
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.tls = tls
        self.spool_dir = settings.spool_path()
        self.server: ThreadedAssociationServer | None = None
        self._io = ThreadPoolExecutor(
            max_workers=max(2, settings.max_associations), thread_name_prefix="spool"
        )
        self._free = 0.0
        self._free_lock = threading.Lock()
        self._in_flight: dict[int, set[str]] = {}
        self._in_flight_lock = threading.Lock()
        self._free_checked_at = -1e9
        self._touched_at = -1e9
        #: The monotonic side of the idle timers of the studies this process received: kept right
        #: across steps of the wall clock (node/idle_timers.py).
        self.idle_timers = IdleTimers(settings.study_idle_seconds)
        #: Called when an association that delivered instances ends (the node's workers wake to time
        #: the study's job); None: they find the study at their next poll.
        self.on_studies_received: Callable[[], None] | None = None
        #: Called when an instance's series is not the one its study's previous instance belonged to
        #: (early analysis wakes: the PACS may have moved on); None: it finds out at its next poll.
        self.on_series_changed: Callable[[], None] | None = None
        #: Called with the series UID and spool path of each new kept instance once it is durable
        #: (early analysis reads it ahead, node/read_ahead.py); None: nobody reads ahead.
        self.on_stored: Callable[[str, str], None] | None = None
        self._last_series: OrderedDict[str, str] = OrderedDict()
        self.ae = self._make_ae()

    @property
    def sf(self) -> SessionFactory:
        """Database sessions for the instance rows (the group committer's)."""
        return self.committer.sf

    @sf.setter
    def sf(self, value: SessionFactory) -> None:
        self.committer.sf = value

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.settings.allowed_calling_aes)
        copy_supported_contexts(node_contexts(), ae)
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls or not self.tls.enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.cert, self.tls.key)
        if self.tls.ca:
            ctx.load_verify_locations(self.tls.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    @property
    def port(self) -> int:
        """The bound TCP port (useful when started on port 0)."""
        if self.server is None:
            return self.settings.port
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Listen in background threads.

        Raises
        ------
        NodeError
            The spool folder cannot be created or written (``node.spool_dir``), or the port cannot be
            bound.
        """
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NodeError(
                f"node.spool_dir: cannot create the spool folder {self.spool_dir}: {exc.strerror or exc}"
            ) from None
        self._probe_spool()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, _guarded(self._on_store)),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_association_end),
            (evt.EVT_ABORTED, self._on_association_end),
            (evt.EVT_CONN_CLOSE, self._on_association_end),
        ]
        try:
            self.server = self._serve(handlers)
        except OSError as exc:
            raise NodeError(
                f"node.port: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}"
            ) from None
        logger.info("SCP %s listening on %s:%d", self.settings.ae_title, self.settings.host, self.port)

    def _probe_spool(self) -> None:
        """Write and remove a file in the spool, as a C-STORE will: a folder the node cannot write (a
        read-only volume, another owner) is refused at start rather than answering every C-STORE 0xA700
        while /healthz says ok. The write itself is tried (not ``os.access``): root passes ``os.access``
        on a read-only file system."""
        probe = self.spool_dir / f".write-probe.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(probe, "wb") as fh:
                fh.write(b"segnode spool write probe")
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
            raise NodeError(
                f"node.spool_dir: cannot write in the spool folder {self.spool_dir}: {exc.strerror or exc}"
            ) from None

    def _serve(self, handlers: list[Any]) -> ThreadedAssociationServer:
        """Bind and serve in a background thread, as pynetdicom's ``start_server(block=False)`` does,
        on a :class:`SharedPortServer` when other processes accept on the socket too."""
        server_class: type[ThreadedAssociationServer] = NodeServer
        if self.shared_port:
            server_class = type("SharedPortServer", (SharedPortServer,), {"listen_fd": self.listen_fd})
        server = self.ae.make_server(
            (self.settings.host, self.settings.port),
            evt_handlers=handlers,
            ssl_context=self._ssl_context(),
            server_class=server_class,
        )
        server.contexts = PresentationContexts(server.contexts)
        thread = threading.Thread(
            target=make_target(server.serve_forever), name=f"AcceptorServer-{self.settings.ae_title}",
            daemon=True,
        )
        thread.start()
        self.ae._servers.append(server)  # so that ae.shutdown() closes it, as for start_server's
        return server

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()
        self._io.shutdown(wait=True)

    # -- handlers --------------------------------------------------------------------------------------

    def _on_connection(self, event: Any) -> None:
        """Give the accepted socket a read timeout (``network_timeout``), the association a loop that
        serves each message as soon as it is decoded and a DUL thread that waits for the peer's bytes,
        its timers on the monotonic clock (:mod:`node.reactor`), and reads no PDU larger than the node
        takes (:mod:`node.pdu_guard`), and C-STORE responses packed and sent directly
        (:mod:`node.store_response`).

        Accepted sockets are blocking; a peer that sends a PDU header announcing more bytes than it
        ever sends (junk, a port scanner) would otherwise hold an association slot for good.
        """
        dul = getattr(event.assoc, "dul", None)
        raw = getattr(getattr(dul, "socket", None), "socket", None)
        if raw is not None and self.ae.network_timeout is not None:
            raw.settimeout(float(self.ae.network_timeout))
        if dul is not None and hasattr(dul, "_run_loop_delay"):
            make_waiting(dul)
            make_monotonic(dul)
            pdu_guard.install(dul)
        make_prompt(event.assoc)
        make_quick_store_response(event.assoc)

    def _on_established(self, event: Any) -> None:
        """Turn Nagle off; log MR image classes refused because none of their proposed transfer
        syntaxes can be decoded here (the PACS sees only a missing presentation context)."""
        assoc = event.assoc
        set_nodelay(assoc)
        refused = [c for c in assoc.rejected_contexts if str(c.abstract_syntax) in KEPT_SOP_CLASSES]
        if not refused:
            return
        readable = readable_transfer_syntaxes(tuple(ALL_TRANSFER_SYNTAXES))
        for context in refused:
            logger.warning(
                "association from %s (calling AE %r): %s refused, proposed only in transfer syntaxes "
                "this node cannot decode (%s); the PACS must send it uncompressed or in one of: %s",
                assoc.requestor.address,
                str(assoc.requestor.ae_title).strip(),
                UID(str(context.abstract_syntax)).name,
                ", ".join(UID(str(s)).name for s in context.transfer_syntax) or "none",
                ", ".join(UID(s).name for s in readable if UID(s).is_compressed),
            )

    def _on_echo(self, event: Any) -> int:
        return dimse.SUCCESS

    def _on_rejected(self, event: Any) -> None:
        """Log each rejected association with the reason (PS3.8 9.3.4)."""
        assoc = event.assoc
        rq = assoc.requestor
        rj = assoc.acceptor.primitive
        reasons = {
            (0x01, 0x03): "calling AE title not allowed (node.allowed_calling_aes)",
            (0x01, 0x07): f"called AE title is not {self.settings.ae_title!r}",
            (0x03, 0x02): f"more than node.max_associations ({self.settings.max_associations}) associations",
            (0x03, 0x01): "free disk below node.min_free_disk_mb",
        }
        key = (int(getattr(rj, "result_source", 0) or 0), int(getattr(rj, "diagnostic", 0) or 0))
        logger.warning(
            "association from %s:%s (calling AE %r, called AE %r) rejected: %s",
            rq.address,
            rq.port,
            str(rq.ae_title).strip(),
            str(rq.primitive.called_ae_title).strip() if rq.primitive else "",
            reasons.get(key, f"source {key[0]}, diagnostic {key[1]}"),
        )

    def _room_for(self, size: int) -> bool:
        """Whether ``size`` more bytes in the spool leave its free disk at or above the floor; if so they
        are counted off the free space, which is measured at most once a second, so that the instances
        of that second cannot together go below the floor either."""
        needed = size / (1024 * 1024)
        with self._free_lock:
            now = time.monotonic()
            if now - self._free_checked_at > 1.0:
                self._free = free_mb(self.spool_dir)
                self._free_checked_at = now
            if self._free - needed < self.settings.min_free_disk_mb:
                return False
            self._free -= needed
            return True

    def _on_requested(self, event: Any) -> None:
        """Refuse new associations (transient, congestion) while free disk is below the floor."""
        available = free_mb(self.spool_dir)
        if available < self.settings.min_free_disk_mb:
            assoc = event.assoc
            logger.error(
                "association from %s refused: %.0f MiB free in %s, below min_free_disk_mb %d",
                assoc.requestor.address,
                available,
                self.spool_dir,
                self.settings.min_free_disk_mb,
            )
            assoc.acse.send_reject(
                dimse.REJECTED_TRANSIENT,
                dimse.SOURCE_SERVICE_PROVIDER_PRESENTATION,
                dimse.DIAG_TEMPORARY_CONGESTION,
            )
            assoc.is_rejected = True
            assoc.kill()

    def _on_store(self, event: Any) -> int:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        sop_uid = validated_uid(
            event.request.AffectedSOPInstanceUID, "AffectedSOPInstanceUID", "C-STORE request"
        )
        if sop_class not in KEPT_SOP_CLASSES:
            return self._ignore(sop_class, sop_uid, calling_ae, ignored_uids(event))
        header = instance_header(event, sop_uid)
        # In flight before its row exists: the row is committed while the spool file is still being
        # written, and a study that looked idle then (a slow fsync, a short study_idle_seconds) got a
        # job that read a spool file not yet renamed into place (FileNotFoundError under load).
        study_uid = str(header.study_instance_uid or "")
        with self._in_flight_lock:
            self._in_flight.setdefault(id(event.assoc), set()).add(study_uid)
        result = self.receive(header, as_file(event, sop_class, sop_uid), sop_class, sop_uid, calling_ae)
        self._note_series(study_uid, str(header.series_instance_uid or ""))
        return result.status

    def _note_series(self, study_uid: str, series_uid: str) -> None:
        """Wake early analysis when a study's instances move on to another series (any association)."""
        if self.on_series_changed is None:  # early analysis off, or a receiving process: nothing to wake
            return
        with self._in_flight_lock:
            changed = self._last_series.get(study_uid) != series_uid
            self._last_series[study_uid] = series_uid
            self._last_series.move_to_end(study_uid)
            if len(self._last_series) > LAST_SERIES_STUDIES:
                self._last_series.popitem(last=False)
        if changed:
            self.on_series_changed()

    def _on_association_end(self, event: Any) -> None:
        with self._in_flight_lock:
            delivered = self._in_flight.pop(id(event.assoc), None)
        if delivered and self.on_studies_received is not None:
            self.on_studies_received()

    def studies_in_flight(self) -> set[str]:
        """Study Instance UIDs that an association still open has sent instances of."""
        with self._in_flight_lock:
            return set().union(*self._in_flight.values()) if self._in_flight else set()

    def refresh_idle_timers(self) -> None:
        """Restart the idle timer of the studies in flight, at most every ``study_idle_seconds / 2``,
        and keep those of the studies this process received right across a step of the wall clock.

        A study whose association is still open is not complete, however slow its instances come
        (eight PACS associations at once on two cores: gaps of seconds). The timer is in the database,
        so other node processes sharing it (and the node, for its receivers' studies) hold off too.
        A study this process received becomes due ``study_idle_seconds`` after its last instance by
        the monotonic clock, whatever steps the wall clock took meanwhile (:class:`IdleTimers`; the
        node's workers call this before they look for due studies).

        Raises
        ------
        DatabaseUnavailableError, DatabaseOperationError
            The update failed; the next call tries again.
        """
        receiving = self.studies_in_flight()
        if receiving and time.monotonic() - self._touched_at >= self.settings.study_idle_seconds / 2:
            instances.touch_studies(self.sf, receiving)
            self._touched_at = time.monotonic()
            self.idle_timers.touched(receiving)
        self.idle_timers.reconcile(self.sf)

    def _record(self, **row: Any) -> bool:
        """Record one C-STORE; returns once the transaction holding its row has committed (group commit
        with the other associations' rows, :mod:`node.committer`)."""
        return self.committer.record(instances.ReceivedInstance(**row))

    def _moved(
        self, sop_uid: str, sop_class: str, study: str, series: str, path: Path, calling_ae: str
    ) -> bool:
        """A repeat of a kept instance in another study or series (a PACS that merged or corrected a
        study): its row moves there (:func:`db.instances.move_instance`) and its former file leaves
        the spool. True when it moved; False for a plain repeat."""
        row = instances.ReceivedInstance(
            sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_instance_uid=study,
            series_instance_uid=series, kept=True, path=str(path), calling_ae=calling_ae,
        )  # fmt: skip
        previous = instances.move_instance(self.sf, row)
        if previous is None:
            return False
        logger.info("instance %s received again in study %s series %s: moved there", sop_uid, study, series)
        former = Path(previous)
        if previous and former != path and former.resolve().is_relative_to(self.spool_dir.resolve()):
            former.unlink(missing_ok=True)
        return True

    def _replaced(
        self, sop_uid: str, sop_class: str, study: str, series: str, path: Path, encoded: bytes,
        calling_ae: str, written: bool,
    ) -> str:
        """A repeat of a kept instance in its own study and series: ``replaced`` when it brought other
        bytes than its spool file holds (a corrected image or header) or its file was missing (written
        now, ``written``); the file then holds the new bytes, written as durably as a new instance's, and
        the study is pending again (:func:`db.instances.instance_replaced`) so that a new run reads
        them. An identical repeat is a ``duplicate``: one read of the file and one of its row, nothing
        changes. ``leaving`` when its row is no longer kept: spool retention is removing its study
        (or has just forgotten the row), and the caller refuses it so that the PACS sends it again."""
        # A file removed meanwhile (spool retention) holds nothing: written again below.
        if not written and self._holds(path, encoded):
            return "duplicate" if instances.instance_kept(self.sf, sop_uid) else "leaving"
        row = instances.ReceivedInstance(
            sop_instance_uid=sop_uid, sop_class_uid=sop_class, study_instance_uid=study,
            series_instance_uid=series, kept=True, path=str(path), calling_ae=calling_ae,
        )  # fmt: skip
        # Pending before the file changes: a crash in between leaves the study to run again (on the old
        # file, or on the new one after the PACS's resend), never the new file with no run to read it.
        if not instances.instance_replaced(self.sf, row):
            # A file written for it (``written``) stays: the resend, a new instance, writes its own
            # bytes over it (receive), and removing it could take the file of a new instance that
            # another association has just stored.
            return "leaving"
        if not written:
            write_atomic(path, encoded)
        logger.warning(
            "instance %s received again in its study and series %s; its spool file is replaced and "
            "the study will be analysed again",
            sop_uid, "with other content" if not written else "after its spool file was lost",
        )  # fmt: skip
        return "replaced"

    @staticmethod
    def _holds(path: Path, encoded: bytes) -> bool:
        """Whether the file at ``path`` holds exactly ``encoded``."""
        try:
            return path.read_bytes() == encoded
        except FileNotFoundError:
            return False

    def _ignore(
        self, sop_class: str, sop_uid: str, calling_ae: str, uids: tuple[str | None, str | None]
    ) -> int:
        """Record an instance of a class the node does not process (``uids``: its study and series, when
        its data set says them), acknowledged; no file, no study row, no job."""
        study, series = uids
        new = self._record(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_instance_uid=study,
            series_instance_uid=series,
            kept=False,
            path=None,
            calling_ae=calling_ae,
        )
        self.metrics.instances.labels("ignored" if new else "duplicate").inc()
        logger.info(
            "instance of SOP class %s (%s) of study %s acknowledged, not processed",
            sop_class, UID(sop_class).name, study or "unknown",
        )  # fmt: skip
        return dimse.SUCCESS

    def receive(
        self, header: InstanceHeader, encoded: bytes, sop_class: str, sop_uid: str, calling_ae: str
    ) -> ReceiveResult:
        """Spool and record one kept instance (``header``: what its data set says, ``encoded``: the
        file to spool); returns the status to answer with.

        Raises
        ------
        InvalidInstanceError
            UIDs missing or malformed, SOP Instance UID of the data set differs from the request's,
            or no pixel data.
        SpoolError
            The file could not be written.
        """
        where = f"instance {sop_uid}"
        ds_sop = validated_uid(header.sop_instance_uid, "SOPInstanceUID", where)
        if ds_sop != sop_uid:
            raise InvalidInstanceError(
                f"{where}: SOPInstanceUID {ds_sop!r} differs from the C-STORE request's"
            )
        study = validated_uid(header.study_instance_uid, "StudyInstanceUID", where)
        series = validated_uid(header.series_instance_uid, "SeriesInstanceUID", where)
        if not header.has_pixel_data:
            self.metrics.instances.labels("rejected").inc()
            logger.warning(
                "%s: no PixelData; refused with %s", where, dimse.describe(dimse.CANNOT_UNDERSTAND)
            )
            return ReceiveResult(dimse.CANNOT_UNDERSTAND, "rejected")
        short = header.short_pixel_data
        if short:
            self.metrics.instances.labels("rejected").inc()
            logger.warning("%s: %s; refused with %s", where, short, dimse.describe(dimse.CANNOT_UNDERSTAND))
            return ReceiveResult(dimse.CANNOT_UNDERSTAND, "rejected")
        if not self._room_for(len(encoded)):
            self.metrics.instances.labels("rejected").inc()
            logger.error(
                "%s: free disk less its %.1f MiB below min_free_disk_mb; refused", where, len(encoded) / 2**20
            )
            return ReceiveResult(dimse.OUT_OF_RESOURCES, "rejected")
        path = spool_path(self.spool_dir, study, series, sop_uid)
        # The file is written (and fsynced) while the row is inserted; success goes back only when
        # both are done. A failed write takes back the row it raced with.
        writing = self._io.submit(write_atomic, path, encoded) if not path.exists() else None
        try:
            new = self._record(
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                study_instance_uid=study,
                series_instance_uid=series,
                kept=True,
                path=str(path),
                calling_ae=calling_ae,
            )
        finally:
            error = writing.exception() if writing is not None else None
        if new and writing is None and error is None and not self._holds(path, encoded):
            # A new row over a file already there: one that spool retention removed or forgot the row
            # of meanwhile, or one a refused repeat left (_replaced). It must hold what is acknowledged.
            try:
                write_atomic(path, encoded)
            except Exception as exc:  # as a failed write above: its row is taken back
                error = exc
        if error is not None:
            if new:
                instances.forget_instance(self.sf, sop_uid)
            raise error
        outcome = "kept"
        if not new:
            new = self._moved(sop_uid, sop_class, study, series, path, calling_ae)
        if not new:
            outcome = self._replaced(
                sop_uid, sop_class, study, series, path, encoded, calling_ae, written=writing is not None
            )
        if outcome == "leaving":
            self.metrics.instances.labels("rejected").inc()
            logger.warning(
                "instance %s received again while spool retention removes its study; refused with %s so "
                "that the PACS sends it again once the study is removed, as a new instance",
                sop_uid, dimse.describe(dimse.OUT_OF_RESOURCES),
            )  # fmt: skip
            return ReceiveResult(dimse.OUT_OF_RESOURCES, "rejected")
        if outcome != "duplicate":  # the study's timer now counts from this instance
            self.idle_timers.recorded(study, sop_uid)
        self.metrics.instances.labels(outcome).inc()
        if new and self.on_stored is not None:
            self.on_stored(series, str(path))
        return ReceiveResult(dimse.SUCCESS, outcome)
