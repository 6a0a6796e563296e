"""The compose stack's walk-through with real peers and no Docker: deploy/compose's own Orthanc config
and node.toml, with only what Docker would provide swapped (host names -> 127.0.0.1, free ports, temp
storage), SQLite standing in for the PostgreSQL service.

Steps as in deploy/README.md: the study goes into Orthanc over REST (with the stack's credentials),
Orthanc sends it to modality "segnode", the node (accepting only the ORTHANC calling AE) segments it and
sends SEG and SR back to Orthanc, where they are found in the same study.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from node.config import load_settings
from node.service import NodeService
from tests.helpers.node import install_model, make_threshold_model, wait_until
from tests.helpers.peers import REPO, free_port, require_program

COMPOSE = REPO / "deploy" / "compose"


def compose_service(name: str) -> dict[str, Any]:
    """A service of docker-compose.yml."""
    data = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text(encoding="utf-8"))
    service = data["services"][name]
    assert isinstance(service, dict)
    return service


def defaults(value: str) -> str:
    """Every ``${NAME:-default}`` in ``value`` replaced by its default (the stack with no .env)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


class ComposeOrthanc:
    """Debian's Orthanc run with deploy/compose/orthanc.json and the stack's credentials."""

    def __init__(self, tmp: Path, node_port: int) -> None:
        program = require_program("Orthanc", "/usr/sbin")
        config = json.loads((COMPOSE / "orthanc.json").read_text(encoding="utf-8"))
        env = compose_service("orthanc")["environment"]
        # The image turns ORTHANC__REGISTERED_USERS into RegisteredUsers; do the same here.
        users = json.loads(defaults(env["ORTHANC__REGISTERED_USERS"]))
        self.user, self.password = next(iter(users.items()))
        self.http, self.dicom = free_port(), free_port()
        node_aet, _host, _port = config["DicomModalities"]["segnode"]
        config.update(
            StorageDirectory=str(tmp / "orthanc-db"),
            IndexDirectory=str(tmp / "orthanc-db"),
            HttpPort=self.http,
            DicomPort=self.dicom,
            RemoteAccessAllowed=False,
            RegisteredUsers=users,
            DicomModalities={"segnode": [node_aet, "127.0.0.1", node_port]},
        )
        path = tmp / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(tmp / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([program, str(path)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._up, 60, "Orthanc REST API", interval=0.2)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}")
        try:
            return bool(self.request("GET", "/system"))
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None, auth: bool = True) -> Any:
        """A REST call with the stack's credentials."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method=method)
        if auth:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=120) as rsp:
            return json.loads(rsp.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture()
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ComposeOrthanc, NodeService]]:
    """Orthanc and the node, each with the compose stack's configuration."""
    node_port, metrics_port = free_port(), free_port()
    orthanc = ComposeOrthanc(tmp_path, node_port)
    # The compose node.toml, with the Docker network's names and ports replaced by loopback ones.
    raw = tomllib.loads((COMPOSE / "node.toml").read_text(encoding="utf-8"))
    [dest] = raw["destinations"]
    assert dest["host"] == "orthanc"
    lines = (COMPOSE / "node.toml").read_text(encoding="utf-8")
    lines = lines.replace('host = "orthanc"', 'host = "127.0.0.1"').replace(
        f"port = {dest['port']}", f"port = {orthanc.dicom}"
    )
    config = tmp_path / "node.toml"
    config.write_text(lines)
    home = tmp_path / "var"
    monkeypatch.setenv("SEGNODE_HOME", str(home))
    settings = load_settings(
        config,
        env={
            "SEGNODE_NODE_HOST": "127.0.0.1",
            "SEGNODE_NODE_PORT": str(node_port),
            "SEGNODE_METRICS_HOST": "127.0.0.1",
            "SEGNODE_METRICS_PORT": str(metrics_port),
            "SEGNODE_NODE_STUDY_IDLE_SECONDS": "1",
            "SEGNODE_NODE_POLL_SECONDS": "0.2",
            "SEGNODE_DATABASE_URL": f"sqlite:///{home / 'segnode.db'}",
        },
    )
    assert settings.node.allowed_calling_aes == ["ORTHANC"]
    node = NodeService(settings)
    spacing = make_synthetic_case(5, (64, 64, 24)).spacing
    install_model(node.registry, make_threshold_model(tmp_path / "model", crop=(64, 64), spacing=spacing))
    node.start()
    try:
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def test_compose_walkthrough_study_in_seg_back(
    stack: tuple[ComposeOrthanc, NodeService], tmp_path: Path
) -> None:
    orthanc, _node = stack
    # The stack's Orthanc refuses REST calls without its credentials.
    with pytest.raises(urllib.error.HTTPError, match="401"):
        orthanc.request("GET", "/studies", auth=False)
    study = write_study(make_synthetic_case(5, (64, 64, 24)), tmp_path / "study", modalities=["FLAIR"])
    for files in study.files.values():
        for path in files:
            orthanc.request("POST", "/instances", path.read_bytes())
    assert orthanc.request("POST", "/modalities/segnode/echo", b"{}") == {}
    [study_id] = orthanc.request("GET", "/studies")
    orthanc.request("POST", "/modalities/segnode/store", study_id.encode())

    def modalities() -> set[str]:
        series = orthanc.request("GET", f"/studies/{study_id}/series")
        return {s["MainDicomTags"].get("Modality") for s in series}

    wait_until(lambda: {"SEG", "SR"} <= modalities(), 90, "SEG and SR back in the compose stack's Orthanc")
    assert orthanc.request("GET", "/studies") == [study_id], "SEG and SR joined the sent study"
