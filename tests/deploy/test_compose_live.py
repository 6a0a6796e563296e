"""The compose stack's walk-through with real peers and no Docker: deploy/compose's own Orthanc config
and node.toml, with only what Docker would provide swapped (host names -> 127.0.0.1, free ports, temp
storage), SQLite standing in for the PostgreSQL service.

Steps as in deploy/README.md: the study goes into Orthanc over REST (with the stack's credentials),
Orthanc sends it to modality "segnode", the node (accepting only the ORTHANC calling AE) segments it and
sends SEG and SR back to Orthanc, where they are found in the same study.
"""

from __future__ import annotations

import json
import re
import tomllib
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from node.config import load_settings
from node.service import NodeService
from tests.helpers.node import install_model, make_threshold_model
from tests.helpers.orthanc import Orthanc
from tests.helpers.peers import REPO
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

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


@pytest.fixture()
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Orthanc, NodeService]]:
    """Orthanc and the node, each with the compose stack's configuration."""
    node_port, metrics_port = free_port(), free_port()
    # The image turns ORTHANC__REGISTERED_USERS into RegisteredUsers; do the same here.
    users = json.loads(defaults(compose_service("orthanc")["environment"]["ORTHANC__REGISTERED_USERS"]))
    orthanc = Orthanc(
        tmp_path / "orthanc",
        node_port,
        base_config=json.loads((COMPOSE / "orthanc.json").read_text(encoding="utf-8")),
        users=users,
    )
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
    stack: tuple[Orthanc, NodeService], tmp_path: Path
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
