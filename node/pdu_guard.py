"""The SCP's PDU reader: what a peer can make the node buffer, and for how long, is bounded.

pynetdicom's DUL reads a PDU as its 6-byte header announces (``DULServiceProvider._read_pdu_data``):
a peer that announced a ~4 GiB PDU, with no AE title and before any check, had the node buffer every
byte it sent. :func:`install` replaces that reader on each association the SCP accepts with one that
reads the header, closes the connection when the announced length exceeds what this node takes (the
maximum PDU it announced, plus header slack, for P-DATA-TF; :data:`MAX_CONTROL_PDU_BYTES` for an
A-ASSOCIATE-RQ and the other control PDUs), and otherwise reads and decodes the PDU as pynetdicom does.

It also bounds the time a PDU may take. The socket's timeout (``network_timeout``) bounds each
``recv``, and pynetdicom's read loop starts it again with every byte: ten connections that sent one
byte every 20 s held every association slot for as long as they went on, and a PACS was refused. Now
a whole PDU must arrive within ``network_timeout`` of its first byte, and the A-ASSOCIATE-RQ within
``acse_timeout`` of the connection being accepted (the ARTIM timer of PS3.8 9.1.5, which pynetdicom
runs only between PDUs); otherwise the connection is closed, with one log line.

The body follows pynetdicom 3.0.4's ``_read_pdu_data`` (MIT licence) for PDUs within the limits
(``node.reactor.PYNETDICOM_VERSION`` names the release; tests/node/test_receive_path.py fails when the
installed one differs).
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading
import time
from typing import Any, cast

logger = logging.getLogger(__name__)

#: PDU types of PS3.8 9.3: A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT.
PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
P_DATA_TF = 0x04
#: Largest A-ASSOCIATE-RQ (or other control PDU) the SCP reads. A PACS proposing the 128 presentation
#: contexts PS3.8 allows, each with a handful of transfer syntaxes, sends ~20 KiB.
MAX_CONTROL_PDU_BYTES = 65536
#: Bytes a P-DATA-TF may exceed the maximum length the node announced by (PDV item headers of peers
#: that count that length differently).
P_DATA_SLACK_BYTES = 1024
#: The largest P-DATA-TF read when the node announced no maximum (0: unlimited in PS3.8).
MAX_P_DATA_BYTES = 16 * 1024 * 1024
#: Bytes asked of the socket per read (pynetdicom: 4096).
RECV_CHUNK = 65536


_accepted = threading.local()


def note_accepted(when: float) -> None:
    """Record when the connection this thread serves was accepted (``time.monotonic()``), for the
    association :func:`install` is called for next in this thread."""
    _accepted.at = when


def install(dul: Any) -> None:
    """Give the acceptor association's DUL provider ``dul`` the bounded reader (call before its thread
    starts, e.g. from ``EVT_CONN_OPEN``, in the thread that accepted it: see :func:`note_accepted`)."""
    accepted = getattr(_accepted, "at", None)
    _accepted.at = None
    dul._read_pdu_data = PDUReader(dul, accepted if accepted is not None else time.monotonic()).read


class PDUReader:
    """Reads one PDU from an acceptor association's socket, within the node's limits.

    Parameters
    ----------
    dul:
        The association's DUL provider.
    accepted:
        When the connection was accepted (``time.monotonic()``): the A-ASSOCIATE-RQ is due
        ``acse_timeout`` later.
    """

    def __init__(self, dul: Any, accepted: float) -> None:
        self.dul = dul
        self.accepted = accepted
        #: Whether the peer's A-ASSOCIATE-RQ has been read (until then the association's thread waits).
        self.requested = False

    def deadline(self) -> tuple[float | None, str]:
        """When the PDU starting now must have arrived (None: no limit), and which timeout that is."""
        assoc = self.dul.assoc
        network = None if assoc.network_timeout is None else float(assoc.network_timeout)
        acse = None if assoc.acse_timeout is None else float(assoc.acse_timeout)
        due: tuple[float | None, str] = (None, "")
        if network is not None:
            due = (time.monotonic() + network, f"network_timeout ({network:g} s) of its first byte")
        if not self.requested and acse is not None:
            artim = self.accepted + acse
            if due[0] is None or artim < due[0]:
                due = (artim, f"acse_timeout ({acse:g} s) of the connection being accepted")
        return due

    def limit(self, pdu_type: int) -> int:
        """The largest PDU length (bytes after the header) read for ``pdu_type``."""
        if pdu_type != P_DATA_TF:
            return MAX_CONTROL_PDU_BYTES
        announced = int(getattr(self.dul.assoc.acceptor, "maximum_length", 0) or 0)
        return announced + P_DATA_SLACK_BYTES if announced else MAX_P_DATA_BYTES

    def read(self) -> None:
        """``DULServiceProvider._read_pdu_data``: read one PDU, queue its event (Evt3/4/6/10/12/13/16),
        or Evt17 (connection closed) / Evt19 (unrecognised PDU)."""
        dul = self.dul
        sock = getattr(dul.socket, "socket", None)
        if sock is None:
            dul.event_queue.put("Evt17")
            return
        deadline, which = self.deadline()
        try:
            header = _recv_exactly(sock, 6, deadline)
        except TimeoutError:
            self._refuse(f"no whole PDU header within {which}")
            return
        except OSError as exc:
            logger.debug("connection from %s closed before a PDU header: %s", self._peer(), exc)
            self._closed()
            return
        if len(header) < 6:
            self._closed()
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in PDU_NAMES:
            logger.error("association from %s: unknown PDU type 0x%02X", self._peer(), pdu_type)
            dul.event_queue.put("Evt19")
            return
        if length > (limit := self.limit(pdu_type)):
            self._refuse(
                f"{PDU_NAMES[pdu_type]} of {length} bytes announced, more than the {limit} this node reads"
            )
            return
        pdu = bytearray(6 + length)
        pdu[:6] = header
        try:
            received = _recv_into(sock, memoryview(pdu)[6:], deadline)
        except TimeoutError:
            what = PDU_NAMES[pdu_type]
            self._refuse(f"the {what} PDU ({length} bytes) did not arrive within {which}")
            return
        except OSError as exc:
            logger.warning(
                "association from %s: connection lost within a %s PDU (%s)", self._peer(),
                PDU_NAMES[pdu_type], exc,
            )  # fmt: skip
            self._closed()
            return
        if received < length:
            logger.error(
                "association from %s: the %s PDU is shorter than announced (%d of %d bytes)",
                self._peer(), PDU_NAMES[pdu_type], received, length,
            )  # fmt: skip
            self._closed()
            return
        try:
            decoded, event = dul._decode_pdu(pdu)
        except Exception as exc:
            logger.error("association from %s: the %s PDU cannot be decoded: %s", self._peer(),
                         PDU_NAMES[pdu_type], exc)  # fmt: skip
            dul.event_queue.put("Evt19")
            return
        self.requested = self.requested or pdu_type == 0x01
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)

    def _peer(self) -> str:
        requestor = getattr(self.dul.assoc, "requestor", None)
        return f"{getattr(requestor, 'address', '?')}:{getattr(requestor, 'port', '?')}"

    def _refuse(self, why: str) -> None:
        """Close the connection at once, with one log line saying why."""
        logger.warning("association from %s aborted: %s; connection closed", self._peer(), why)
        self._closed(close=True)

    def _closed(self, close: bool = False) -> None:
        """The connection is over (``close``: close it here): Evt17, and, while no A-ASSOCIATE-RQ was
        read, wake the association's thread, which waits for one for up to ``acse_timeout``."""
        dul = self.dul
        if close and dul.socket is not None:
            dul.socket.close()  # shuts the socket down and queues Evt17
        else:
            dul.event_queue.put("Evt17")
        if not self.requested:
            cast("queue.Queue[Any]", dul.to_user_queue).put(None)  # "no request": the thread ends


def _recv_exactly(sock: socket.socket | ssl.SSLSocket, size: int, deadline: float | None) -> bytearray:
    """``size`` bytes from ``sock``, or fewer when the peer closed the connection.

    Raises
    ------
    TimeoutError
        They had not all arrived by ``deadline`` (``time.monotonic()``).
    """
    buffer = bytearray(size)
    return buffer[: _recv_into(sock, memoryview(buffer), deadline)]


def _recv_into(sock: socket.socket | ssl.SSLSocket, view: memoryview, deadline: float | None) -> int:
    """Fill ``view`` from ``sock`` by ``deadline`` (``time.monotonic()``; None: the socket's own timeout
    per read); returns the bytes read, fewer when the peer closed the connection.

    Raises
    ------
    TimeoutError
        ``view`` was not full by ``deadline``.
    """
    done = 0
    timeout = sock.gettimeout()
    try:
        while done < len(view):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("deadline passed")
                sock.settimeout(left if timeout is None else min(left, timeout))
            n = sock.recv_into(view[done : done + RECV_CHUNK])
            if not n:
                break
            done += n
    finally:
        if deadline is not None:
            sock.settimeout(timeout)  # what sends on the socket wait for
    return done
