"""An acceptor association loop that serves a DIMSE message as soon as it is decoded.

pynetdicom 3.0's acceptor loop (``Association._run_reactor``) sleeps 1 ms at the top of every turn
and then looks at the message queue without waiting, so each C-STORE waits on average half a
millisecond (more with the sleep's overshoot) before its handler runs. :func:`make_prompt` replaces
the loop of one association with the same loop in which the sleep is a wait on the message queue (at
most the same 1 ms), so an idle association costs what it did and a waiting message is served at once.

The body follows pynetdicom 3.0.4's ``_run_reactor`` (MIT licence) line for line apart from that wait;
``PYNETDICOM_VERSION`` names the release it was written against and tests/node/test_receive_path.py
fails when the installed one differs, so an upgrade re-reads it.
"""

from __future__ import annotations

import logging
import queue
import types
from typing import Any, cast

from pynetdicom import evt

logger = logging.getLogger(__name__)

#: The pynetdicom release whose ``Association._run_reactor`` :func:`_prompt_reactor` follows.
PYNETDICOM_VERSION = "3.0.4"

#: Seconds the loop waits for a message before it checks release, abort and timeouts (pynetdicom: 1 ms).
IDLE_WAIT_S = 0.001


def _wait_for_message(messages: queue.Queue[Any], timeout: float) -> None:
    """Return when ``messages`` holds an item, or after ``timeout`` seconds."""
    with messages.not_empty:
        if not len(messages.queue):  # qsize() would take the mutex the condition already holds
            messages.not_empty.wait(timeout)


def _prompt_reactor(self: Any) -> None:
    """``Association._run_reactor`` with the 1 ms sleep replaced by a wait on the message queue."""
    self._is_paused = False
    while not self._kill:
        _wait_for_message(self.dimse.msg_queue, IDLE_WAIT_S)

        # A send_*() on this association pauses the loop so that it does not take the reply.
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

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


def make_prompt(assoc: Any) -> None:
    """Give the acceptor association ``assoc`` the prompt loop (call before its thread starts, e.g.
    from ``EVT_CONN_OPEN``)."""
    assoc._run_reactor = types.MethodType(_prompt_reactor, assoc)
