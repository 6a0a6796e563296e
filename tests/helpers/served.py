"""``segnode serve`` in a subprocess, as an operator runs it: its node.toml, start, SIGTERM, SIGKILL, restart.

(tests/helpers/node.py's ``running_node`` is the node in-process, for tests that look inside it.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from node.config import Destination
from tests.helpers.node import TEST_POLL_SECONDS
from tests.helpers.peers import REPO
from tests.helpers.waiting import wait_until


def node_toml(
    tmp: Path,
    port: int,
    db_url: str,
    destinations: Sequence[Destination] = (),
    *,
    idle: float = 0.3,
    retry_base: float = 0.2,
    retry_max: float = 1.0,
    extra_node: str = "",
    tls: str = "",
    bootstrap: bool = False,
) -> Path:
    """Write a node.toml for a ``segnode serve`` subprocess on loopback; returns its path.

    ``idle`` is the study idle time, ``retry_base`` and ``retry_max`` the send backoff (seconds);
    ``extra_node`` more lines for [node], ``tls`` a [tls] section. ``bootstrap`` False (the tests'
    default) keeps the shipped model out: each test installs its own. An empty ``db_url`` leaves
    ``[database] url`` unset: SQLite under ``$SEGNODE_HOME``.
    """
    lines = [
        "[node]",
        f"port = {port}",
        'host = "127.0.0.1"',
        f'spool_dir = "{tmp / "spool"}"',
        f"study_idle_seconds = {idle}",
        f"poll_seconds = {TEST_POLL_SECONDS}",
        "min_free_disk_mb = 1",
        f"send_retry_base_seconds = {retry_base}",
        f"send_retry_max_seconds = {retry_max}",
        f"bootstrap_default_model = {str(bootstrap).lower()}",
        extra_node,
        "[database]",
        f'url = "{db_url}"' if db_url else "",
        "[metrics]",
        "port = 0",
        tls,
    ]
    for d in destinations:
        lines += [
            "[[destinations]]",
            f'name = "{d.name}"',
            f'ae_title = "{d.ae_title}"',
            f'host = "{d.host}"',
            f"port = {d.port}",
        ]
    path = tmp / f"node-{port}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _serve_env(home: Path) -> dict[str, str]:
    """The environment of a ``segnode serve`` subprocess: our code, its own SEGNODE_HOME, and no
    SEGNODE_CONFIG or SEGNODE_DATABASE_URL from the caller (the config file given decides)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SEGNODE_CONFIG", "SEGNODE_DATABASE_URL")}
    env.update(SEGNODE_HOME=str(home), PYTHONPATH=str(REPO))
    return env


def run_serve(
    config: Path, home: Path, *options: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``segnode [options] serve --config config`` run to its end (one that must refuse to start);
    its exit code and output (stderr lines unwrapped: COLUMNS=300)."""
    return subprocess.run(
        [sys.executable, "-m", "node", *options, "serve", "--config", str(config)],
        cwd=REPO,
        env={**_serve_env(home), "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ServedNode:
    """``segnode -v serve`` in a subprocess, its log in ``log``."""

    def __init__(
        self,
        config: Path,
        home: Path,
        log: Path,
        port: int,
        *,
        debug: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config, self.home, self.log, self.port = config, home, log, port
        self.level = "--debug" if debug else "-v"
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> ServedNode:
        """Start and wait until it answers C-ECHO."""
        env = {**_serve_env(self.home), **self.extra_env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", self.level, "serve", "--config", str(self.config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        wait_until(
            lambda: self._alive() and echo_ok(self.port),
            timeout,
            f"segnode serve on {self.port}",
            interval=0.2,
        )
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"segnode serve exited {self.proc.returncode}: {self.log.read_text()[-3000:]}"
            )
        return True

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM (or ``signum``), then SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def echo_ok(port: int, called: str = "SEGNODE") -> bool:
    """True when a C-ECHO to 127.0.0.1:``port`` succeeds."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node import reactor

    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = reactor.associate(ae, "127.0.0.1", port, called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status and status.Status == 0)
