"""Association loops that serve a DIMSE message as soon as it is decoded, and that wait for
the peer's bytes instead of polling for them.

pynetdicom 3.0's acceptor loop (``Association._run_reactor``) sleeps 1 ms at the top of every turn
and then looks at the message queue without waiting, so each C-STORE waits on average half a
millisecond (more with the sleep's overshoot) before its handler runs. :func:`make_prompt` replaces
the loop of one association with the same loop in which the sleep is a wait on the message queue (at
most the same 1 ms), so an idle association costs what it did and a waiting message is served at once.
The loop also closes pynetdicom's race between it and ``send_*()`` on the associations the node
requests; :func:`associate` opens them.

:func:`make_waiting` does the like for the association's DUL thread, which reads the peer's PDUs: in
pynetdicom its loop looks at the socket without waiting and sleeps between looks (0.2 ms in the node
before), so a PDU waits for the end of a sleep and an idle association wakes ~5000 times a second.
Once the association is established the DUL thread now waits on the socket itself (``select``, at
most ``DUL_IDLE_WAIT_S``) when nothing is queued for it to send. What the association sends on its
own, C-STORE responses (node/store_response.py), goes straight to the socket, so nothing waits for
the end of that wait; what is still queued for the DUL (other DIMSE responses, release, abort) waits
at most 1 ms. Measured on the demo study (620 instances, 2026-12-03): the node's voluntary context
switches 17,400 -> 13,000 with one association and 80,000 -> 65,000 with four; ingest +8 % (one
association) and +8 to +13 % (four), benchmarks/ingest.py row ``node:wait``.

:func:`make_monotonic` puts both ends' DUL timers (the ARTIM timer and the idle timer that
``network_timeout`` sets) on the monotonic clock. pynetdicom's :class:`~pynetdicom.timer.Timer` reads
the wall clock, so a step of the host's clock (NTP setting a clock that drifted, a VM resumed) by more
than ``network_timeout`` made every open association's idle timer expire at once: the node aborted
healthy associations in the middle of a study ("association network timeout reached" between two
C-STOREs of one study: tests/node/test_receive_path.py), and a step back would have let a silent peer
hold its slot that much longer.

The body follows pynetdicom 3.0.4's ``_run_reactor`` (MIT licence) line for line apart from that wait;
``PYNETDICOM_VERSION`` names the release it was written against and tests/node/test_receive_path.py
fails when the installed one differs, so an upgrade re-reads it.
"""

from __future__ import annotations

import logging
import queue
import select
import ssl
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.timer import Timer

logger = logging.getLogger(__name__)

#: The pynetdicom release whose ``Association._run_reactor`` :func:`_prompt_reactor` follows.
PYNETDICOM_VERSION = "3.0.4"

#: Seconds the loop waits for a message before it checks release, abort and timeouts (pynetdicom: 1 ms).
IDLE_WAIT_S = 0.001
#: Seconds an established association's DUL thread waits for the peer's bytes before it looks at its
#: queue, timers and stop flag again.
DUL_IDLE_WAIT_S = 0.001
#: Seconds the DUL thread sleeps between looks at the socket in the other states (negotiation, release),
#: as pynetdicom's loop does (its default is 1 ms; 0.2 ms took a bare pynetdicom SCP from ~210 to ~290
#: instances/s here, and was the node's delay in every state before :func:`make_waiting`).
DUL_POLL_S = 0.0002


def _wait_for_message(messages: queue.Queue[Any], timeout: float) -> None:
    """Return when ``messages`` holds an item, or after ``timeout`` seconds."""
    with messages.not_empty:
        if not len(messages.queue):  # qsize() would take the mutex the condition already holds
            messages.not_empty.wait(timeout)


def _prompt_reactor(self: Any) -> None:
    """``Association._run_reactor`` with the 1 ms sleep replaced by a wait on the message queue, and
    without its race with ``send_*()`` (see :func:`associate`)."""
    self._is_paused = False
    while not self._kill:
        _wait_for_message(self.dimse.msg_queue, IDLE_WAIT_S)

        # A send_*() on this association pauses the loop so that it does not take the reply.
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            # A send_*() began between the wait and the line above: it read the stale "paused" and may
            # already be waiting for its reply, which this turn must not take (pynetdicom's race).
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, cast(int, context_id))

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            logger.debug("association released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            logger.error("association network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


class MonotonicTimer(Timer):
    """pynetdicom's :class:`~pynetdicom.timer.Timer` (the DICOM Upper Layer's ARTIM and idle timers)
    on the monotonic clock: the same states and answers, unmoved by steps of the wall clock."""

    def start(self) -> None:
        """Reset and start the timer."""
        self._start_time = time.monotonic()
        self._end_time = None

    def stop(self) -> None:
        """Stop the timer."""
        self._end_time = time.monotonic()

    @property
    def remaining(self) -> float:
        """Seconds until the timer expires (negative once it has; 1 when it never does)."""
        if self.timeout is None:
            return 1
        if self._start_time is None:
            return self.timeout
        end = time.monotonic() if self._end_time is None else self._end_time
        return self.timeout - (end - self._start_time)


def _monotonic(timer: Timer) -> MonotonicTimer:
    """A :class:`MonotonicTimer` with ``timer``'s timeout and state (started, stopped, when)."""
    copy = MonotonicTimer(timer.timeout)
    if timer._start_time is not None:
        wall, now = time.time(), time.monotonic()
        copy._start_time = now - (wall - timer._start_time)
        copy._end_time = None if timer._end_time is None else now - (wall - timer._end_time)
    return copy


def make_monotonic(dul: Any) -> None:
    """Put the DUL provider ``dul``'s ARTIM and idle timers on the monotonic clock (call before its
    thread starts, or from that thread, e.g. from ``EVT_CONN_OPEN``)."""
    dul._idle_timer = _monotonic(dul._idle_timer)
    dul.artim_timer = _monotonic(dul.artim_timer)


def make_prompt(assoc: Any) -> None:
    """Give the association ``assoc`` the prompt loop (call before its thread starts, e.g. from
    ``EVT_CONN_OPEN``)."""
    assoc._run_reactor = types.MethodType(_prompt_reactor, assoc)


def _on_connection_open(event: evt.Event) -> None:
    make_prompt(event.assoc)
    if getattr(event.assoc, "dul", None) is not None:
        make_monotonic(event.assoc.dul)


def associate(
    ae: AE,
    host: str,
    port: int,
    ae_title: str,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
    evt_handlers: Sequence[tuple[Any, Callable[..., Any]]] = (),
) -> Association:
    """``ae.associate`` whose association runs the prompt loop, so that no reply is lost; ``evt_handlers``
    are bound to the association as well.

    pynetdicom's requestor runs the acceptor's loop too, and ``send_c_store`` pauses it by clearing
    an event and then waiting until the loop says it is paused. The loop says so before it waits on
    the event and unsays it only after the wait, so a send that starts between the wait's return and
    that line reads a stale "paused", sends its request, and a fast peer's reply can reach the loop's
    next look at the message queue. The loop takes it for an unexpected request ("Received unexpected
    C-STORE service message"), the send waits out its DIMSE timeout and the association is aborted.
    The node answers C-STOREs within a millisecond, so its own tests met this (a CI run failed by it)
    and so could its sends to a fast PACS. The prompt loop checks the event again after that line and
    leaves the queue alone when a send has begun.
    """
    return ae.associate(
        host,
        port,
        ae_title=ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, _on_connection_open), *evt_handlers],
    )


def _waiting_transport_event(self: Any) -> bool:
    """``DULServiceProvider._is_transport_event`` that, on an established association with nothing
    queued to send, waits up to ``DUL_IDLE_WAIT_S`` for the peer's bytes instead of only looking."""
    established = self.state_machine.current_state == "Sta6"
    if not established or self.to_provider_queue.qsize() or self.event_queue.qsize():
        if DULServiceProvider._is_transport_event(self):
            return True
        if not established:
            time.sleep(DUL_POLL_S)  # pynetdicom's own pace outside data transfer
        return False
    raw = getattr(self.socket, "socket", None)
    if raw is None:
        return DULServiceProvider._is_transport_event(self)
    try:
        pending = isinstance(raw, ssl.SSLSocket) and raw.pending() > 0  # decrypted bytes select cannot see
        ready = pending or bool(select.select([raw], [], [], DUL_IDLE_WAIT_S)[0])
    except (OSError, ValueError):  # closed under us: pynetdicom's own look reports the closed transport
        return DULServiceProvider._is_transport_event(self)
    if not ready:
        return False
    self._read_pdu_data()
    return True


def make_waiting(dul: Any) -> None:
    """Give the acceptor association's DUL provider ``dul`` the waiting read (call before its thread
    starts, e.g. from ``EVT_CONN_OPEN``): its loop no longer sleeps between turns, the read waits."""
    dul._is_transport_event = types.MethodType(_waiting_transport_event, dul)
    dul._run_loop_delay = 0
