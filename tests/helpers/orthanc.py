"""Orthanc as the PACS of a test: Debian's Orthanc on loopback, its storage in a temp dir.

The viewer test does not use this: it drives deploy/viewer/stack.py's own Orthanc (with DICOMweb),
which is what ``make viewer`` runs.
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.peers import require_program
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

#: The configuration Orthanc starts from unless the test gives its own.
MINIMAL_CONFIG: dict[str, Any] = {
    "Name": "segnode-test",
    "DicomAet": "ORTHANC",
    "AuthenticationEnabled": False,
    "Plugins": [],
}


class Orthanc:
    """Orthanc on free loopback ports, with the node registered as DICOM modality ``segnode``.

    Parameters
    ----------
    workdir:
        Directory for the configuration, storage, index and log.
    node_port:
        Port of the node's SCP on 127.0.0.1.
    base_config:
        An Orthanc configuration to start from (e.g. deploy/compose/orthanc.json); its ``segnode``
        modality's AE title is kept. Default: a minimal one, AE ORTHANC, no authentication.
    users:
        ``RegisteredUsers`` (user -> password); REST calls then authenticate as the first one.
    """

    def __init__(
        self,
        workdir: Path,
        node_port: int,
        *,
        base_config: dict[str, Any] | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        program = require_program("Orthanc", "/usr/sbin")
        config: dict[str, Any] = dict(MINIMAL_CONFIG if base_config is None else base_config)
        node_aet = config.get("DicomModalities", {}).get("segnode", ["SEGNODE"])[0]
        self.http, self.dicom = free_port(), free_port()
        config.update(
            StorageDirectory=str(workdir / "storage"),
            IndexDirectory=str(workdir / "index"),
            HttpPort=self.http,
            DicomPort=self.dicom,
            RemoteAccessAllowed=False,
            DicomModalities={"segnode": [node_aet, "127.0.0.1", node_port]},
        )
        self.credentials: tuple[str, str] | None = None
        if users:
            config["RegisteredUsers"] = users
            self.credentials = next(iter(users.items()))
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log_path = workdir / "orthanc.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([program, str(path)], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._up, 60, "Orthanc REST API", interval=0.2)
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"Orthanc exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
            )
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None, auth: bool = True) -> Any:
        """A REST call (with the credentials, if any, unless ``auth`` is false); the JSON answer."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method=method)
        if auth and self.credentials is not None:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return json.loads(rsp.read())

    def get(self, path: str) -> Any:
        """GET a JSON document from the REST API."""
        return self.request("GET", path)

    def post(self, path: str, body: bytes) -> Any:
        """POST ``body`` to the REST API; the JSON answer."""
        return self.request("POST", path, body)

    def series_by_modality(self, study: str) -> dict[str, list[dict[str, Any]]]:
        """The series of Orthanc study ``study`` (Orthanc id) grouped by Modality."""
        out: dict[str, list[dict[str, Any]]] = {}
        for series in self.get(f"/studies/{study}/series"):
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
        return out

    def stop(self) -> None:
        """Terminate Orthanc."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
