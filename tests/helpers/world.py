"""Helpers for the real-world tests (tests/world/test_*.py): DCMTK peers, `segnode serve` subprocesses,
a PostgreSQL cluster that can be stopped and started, a test CA made with the openssl CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from node.config import Destination
from tests.helpers.peers import REPO, require_program
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

#: DCMTK tools take ~40 ms per C-STORE unless Nagle is off (their TCP_NODELAY variable).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def run_tool(cmd: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a peer program; its output in the result (never raises on a non-zero exit)."""
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV, check=False
    )


def storescu(
    port: int,
    files: Sequence[Path],
    calling: str = "PACS",
    called: str = "SEGNODE",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """DCMTK ``storescu`` sending ``files`` over one association to 127.0.0.1:``port``."""
    program = require_program("storescu")
    return run_tool(
        [program, *extra, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        timeout=300,
    )


class DcmtkStoreSCP:
    """DCMTK ``storescp`` on loopback writing what it receives into ``out``: the destination PACS."""

    def __init__(self, out: Path, ae_title: str = "DCMTKSCP", extra: Sequence[str] = ()) -> None:
        program = require_program("storescp")
        self.out, self.ae_title, self.port = out, ae_title, free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out.parent / f"storescp-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [program, *extra, "-aet", ae_title, "-od", str(out), "+xa", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        echoscu = require_program("echoscu")
        wait_until(
            lambda: (
                self._alive()
                and run_tool([echoscu, *extra, "-aec", ae_title, "127.0.0.1", str(self.port)], 10).returncode
                == 0
            ),
            30,
            f"storescp on port {self.port}",
            interval=0.1,
        )

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"storescp exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
            )
        return True

    def destination(self, name: str = "dcmtk") -> Destination:
        """The node's [[destinations]] entry for this SCP."""
        return Destination(name, self.ae_title, "127.0.0.1", self.port)

    def files(self) -> list[Path]:
        """Files received so far (storescp names them MODALITY.SOPInstanceUID)."""
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def datasets(self) -> list[Dataset]:
        """The received files, read."""
        return [pydicom.dcmread(p) for p in self.files()]

    def of_modality(self, modality: str) -> list[Path]:
        """Received files whose Modality is ``modality``."""
        return [p for p in self.files() if pydicom.dcmread(p, stop_before_pixels=True).Modality == modality]

    def stop(self) -> None:
        """Terminate storescp."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def node_toml(
    tmp: Path,
    port: int,
    db_url: str,
    destinations: Sequence[Destination] = (),
    *,
    idle: float = 0.3,
    extra_node: str = "",
    tls: str = "",
) -> Path:
    """Write a node.toml for a ``segnode serve`` subprocess on loopback; returns its path."""
    lines = [
        "[node]",
        f"port = {port}",
        'host = "127.0.0.1"',
        f'spool_dir = "{tmp / "spool"}"',
        f"study_idle_seconds = {idle}",
        "poll_seconds = 0.05",
        "min_free_disk_mb = 1",
        "send_retry_base_seconds = 0.2",
        "send_retry_max_seconds = 1.0",
        extra_node,
        "[database]",
        f'url = "{db_url}"',
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


class ServedNode:
    """``segnode -v serve`` in a subprocess, its log in ``log``."""

    def __init__(self, config: Path, home: Path, log: Path, port: int, *, debug: bool = False) -> None:
        self.config, self.home, self.log, self.port = config, home, log, port
        self.level = "--debug" if debug else "-v"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> ServedNode:
        """Start and wait until it answers C-ECHO."""
        env = {**os.environ, "SEGNODE_HOME": str(self.home), "PYTHONPATH": str(REPO)}
        env.pop("SEGNODE_DATABASE_URL", None)
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

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def echo_ok(port: int, called: str = "SEGNODE") -> bool:
    """True when a C-ECHO to 127.0.0.1:``port`` succeeds."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status and status.Status == 0)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed test CA (certificate, key) made with the openssl CLI in ``directory``."""
    openssl = require_program("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}-ca.crt", directory / f"{name}-ca.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name} test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return cert, key


def issue_cert(ca: tuple[Path, Path], directory: Path, name: str) -> tuple[Path, Path]:
    """A leaf certificate (for server and client use) for CN ``name`` signed by ``ca``."""
    openssl = require_program("openssl")
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    subprocess.run(
        [
            openssl,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    subprocess.run(
        [
            openssl,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca[0]),
            "-CAkey",
            str(ca[1]),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(cert),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return cert, key
