"""DCMTK as the peer of a test: ``storescu`` sending to the node, ``storescp`` as the destination PACS."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from node.config import Destination
from tests.helpers.peers import require_program
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


#: Marker storescp's ``--exec-on-reception`` command leaves beside each file it has written in full.
_DONE_PREFIX = ".done."


class DcmtkStoreSCP:
    """DCMTK ``storescp`` on loopback writing what it receives into ``out``: the destination PACS."""

    def __init__(self, out: Path, ae_title: str = "DCMTKSCP", extra: Sequence[str] = ()) -> None:
        program = require_program("storescp")
        self.out, self.ae_title, self.port = out, ae_title, free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out.parent / f"storescp-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            # storescp writes each file under its final name as it arrives; the command it runs once a
            # file is complete leaves a marker, so that a poll never reads a file half written.
            [program, *extra, "-aet", ae_title, "-od", str(out), "+xa",
             "-xcr", f'touch "#p/{_DONE_PREFIX}#f"', str(self.port)],
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
        """Files received in full so far (storescp names them MODALITY.SOPInstanceUID)."""
        return sorted(
            p for p in self.out.iterdir()
            if p.is_file() and not p.name.startswith(".") and (p.parent / f"{_DONE_PREFIX}{p.name}").exists()
        )

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
