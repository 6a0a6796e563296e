"""Loopback ports for tests: a free one to listen on, or one held by a socket that never answers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def silent_listener(backlog: int = 16) -> socket.socket:
    """A socket listening on a free 127.0.0.1 port that nobody accepts on; the caller closes it.

    Its port is taken (a server that binds it fails), and a client's TCP handshake completes
    (the kernel queues up to ``backlog`` connections) but nothing ever answers: a peer that hangs.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s


def closed_within(s: socket.socket, seconds: float | None = None) -> bool:
    """True when the server closes ``s`` within ``seconds`` (``None``: the socket's own timeout), the
    client sending nothing meanwhile."""
    if seconds is not None:
        s.settimeout(seconds)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
