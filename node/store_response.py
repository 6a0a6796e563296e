"""C-STORE responses packed directly instead of through pydicom.

For each response pynetdicom 3.0 builds the command set as a pydicom ``Dataset`` from a deep copy of a
template, validates every value as it sets it, and encodes the set twice (once to measure its group
length, once to send it). On the node's receive path that was about a sixth of the interpreter time
(py-spy, one association, 2026-12-03), and every C-STORE waits on it before its peer may send the next
one. :func:`make_quick_store_response` gives one association a ``send_msg`` that packs a plain C-STORE
response (the seven elements of PS3.7 9.3.1.2: no Offending Element, no Error Comment) with
``struct``; every other message goes through pynetdicom's own ``send_msg``.

The packed response goes straight to the association's socket from the association's own thread,
as one P-DATA-TF PDU, when the association is established and nothing is queued for its DUL thread
(which would otherwise send it on its next turn: node/reactor.py :func:`~node.reactor.make_waiting`).
A lock shared with the DUL thread's sends keeps two PDUs from interleaving on the socket. Over TLS
the packed response is queued for the DUL thread (an SSL connection is read and written by one thread).

The quick path does not trigger ``EVT_DIMSE_SENT`` or ``EVT_PDU_SENT``: the only handler the node has
on them is pynetdicom's standard logging handler, which logs nothing for a C-STORE response.

Written against pynetdicom ``PYNETDICOM_VERSION`` (MIT licence); tests/node/test_receive_path.py
checks the bytes against pynetdicom's encoding and fails when the installed release differs.
"""

from __future__ import annotations

import ssl
import struct
import threading
import types
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

#: The pynetdicom release whose C-STORE-RSP encoding :func:`encode_c_store_rsp` reproduces.
PYNETDICOM_VERSION = "3.0.4"

#: Implicit VR Little Endian element header: group, element, 4-byte length (PS3.5 7.1.2).
_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
#: Command Field of a C-STORE-RSP; Command Data Set Type "no data set" (PS3.7 E.1).
_C_STORE_RSP, _NO_DATA_SET = 0x8001, 0x0101
#: Message control header of a PDV holding the last (here the only) fragment of a command (PS3.8 E.2).
_LAST_COMMAND_FRAGMENT = b"\x03"
#: P-DATA-TF PDU header (type 0x04, reserved, length) and its PDV item header (length, context ID):
#: PS3.8 9.3.5.
_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IB")


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return _HEADER.pack(0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return _HEADER.pack(0x0000, element, 2) + _US.pack(value)


def encode_c_store_rsp(sop_class_uid: str, message_id: int, status: int, sop_instance_uid: str) -> bytes:
    """The command set of a C-STORE response with no Offending Element or Error Comment, Implicit VR
    Little Endian, group length first: the bytes pynetdicom sends for the same response."""
    body = b"".join(
        (
            _ui(0x0002, sop_class_uid),
            _us(0x0100, _C_STORE_RSP),
            _us(0x0120, message_id),
            _us(0x0800, _NO_DATA_SET),
            _us(0x0900, status),
            _ui(0x1000, sop_instance_uid),
        )
    )
    return _HEADER.pack(0x0000, 0x0000, 4) + struct.pack("<I", len(body)) + body


def encode_p_data_tf(context_id: int, pdv: bytes) -> bytes:
    """A P-DATA-TF PDU with one presentation data value (``pdv``: message control header + fragment)."""
    item = _PDV_HEADER.pack(len(pdv) + 1, context_id) + pdv
    return _PDU_HEADER.pack(0x04, 0x00, len(item)) + item


def _is_plain_store_response(primitive: Any) -> bool:
    return (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.AffectedSOPClassUID is not None
        and primitive.AffectedSOPInstanceUID is not None
        and isinstance(primitive.Status, int)
        and primitive.OffendingElement is None
        and primitive.ErrorComment is None
    )


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``, with plain C-STORE responses packed directly."""
    if not _is_plain_store_response(primitive):
        DIMSEServiceProvider.send_msg(self, primitive, context_id)
        return
    command = encode_c_store_rsp(
        str(primitive.AffectedSOPClassUID),
        int(primitive.MessageIDBeingRespondedTo),
        int(primitive.Status),
        str(primitive.AffectedSOPInstanceUID),
    )
    limit = self.maximum_pdu_size
    if limit and len(command) + 6 > limit:  # a peer that takes only tiny PDUs: pynetdicom fragments it
        DIMSEServiceProvider.send_msg(self, primitive, context_id)
        return
    pdv = _LAST_COMMAND_FRAGMENT + command
    dul = self.dul
    lock = getattr(dul, "_segnode_send_lock", None)
    sock = dul.socket
    if (
        lock is not None
        and sock is not None
        and dul.state_machine.current_state == "Sta6"
        and not dul.to_provider_queue.qsize()
    ):
        with lock:
            sock.send(encode_p_data_tf(context_id, pdv))  # a failure queues Evt17 (transport closed)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, pdv))
    dul.send_pdu(pdata)


def _locked_sends(dul: Any) -> None:
    """Make the DUL thread's PDU sends take a lock that the direct sends of :func:`_send_msg` take too."""
    lock = threading.Lock()
    send = dul._send

    def locked(pdu: Any) -> None:
        with lock:
            send(pdu)

    dul._send = locked
    dul._segnode_send_lock = lock


def make_quick_store_response(assoc: Any) -> None:
    """Give the association ``assoc`` the quick C-STORE response (call before its thread starts, e.g.
    from ``EVT_CONN_OPEN``).

    Over TLS the packed response is queued for the DUL thread instead of written from the
    association's thread: one SSL connection must not be written by one thread while another reads
    it (OpenSSL's rule), and the DUL thread is reading it."""
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(raw, ssl.SSLSocket):
        _locked_sends(assoc.dul)
    assoc.dimse.send_msg = types.MethodType(_send_msg, assoc.dimse)
