"""A fresh install, as an administrator meets it: `segnode serve` on an empty SEGNODE_HOME.

With no `segnode models import`, the node promotes the shipped model (models/default) itself, says so
in one log line, records it in the model table's audit trail, and a study sent with DCMTK storescu gets
its SEG and SR back. With `[node] bootstrap_default_model = false` it does not, and the study waits.
A metrics port that is taken is one line naming the port and the key, exit code 2, nothing started.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from converters.dicom_writer import write_study
from converters.nifti import load_case
from db.registry import Registry
from db.session import make_engine, make_session_factory
from node.bootstrap import SHIPPED_MODEL_DIR
from node.demo import DEFAULT_CASE
from tests.helpers.dcmtk import DcmtkStoreSCP, storescu
from tests.helpers.peers import REPO
from tests.helpers.ports import free_port
from tests.helpers.served import ServedNode, node_toml
from tests.helpers.waiting import wait_until


@pytest.fixture(scope="module")
def flair_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The shipped demo case's FLAIR as a DICOM series (155 files)."""
    out = tmp_path_factory.mktemp("study")
    info = write_study(load_case(DEFAULT_CASE), out, modalities=["FLAIR"], seed=3)
    return list(info.series["FLAIR"].files)


def _registry(home: Path) -> Registry:
    return Registry(make_session_factory(make_engine(f"sqlite:///{home / 'segnode.db'}")))


@pytest.mark.slow
def test_fresh_home_serves_the_shipped_model_and_returns_a_seg(
    tmp_path: Path, flair_study: list[Path]
) -> None:
    home, port = tmp_path / "var", free_port()
    pacs = DcmtkStoreSCP(tmp_path / "pacs")
    config = node_toml(tmp_path, port, "", [pacs.destination()], bootstrap=True)
    node = ServedNode(config, home, tmp_path / "node.log", port).start()
    try:
        sent = storescu(port, flair_study)
        assert sent.returncode == 0, sent.stderr
        wait_until(
            lambda: pacs.of_modality("SEG") and pacs.of_modality("SR"), 120, "SEG and SR from the node"
        )
    finally:
        node.stop()
        pacs.stop()
    log = (tmp_path / "node.log").read_text()
    shipped = [line for line in log.splitlines() if "imported and promoted the shipped model" in line]
    lines = [line for line in shipped if "task whole_tumor" in line]
    assert len(lines) == 1, log[-3000:]
    assert any("task brain_extraction" in line for line in shipped), shipped  # the extractor comes too
    assert str(SHIPPED_MODEL_DIR) in lines[0] and "whole_tumor" in lines[0]
    registry = _registry(home)
    active = registry.active("whole_tumor")
    assert active is not None and active.kind == "ir" and active.precision == "int8"
    promotions = [e for e in registry.history("whole_tumor") if e.action == "promote"]
    assert [(e.to_model_id, e.by) for e in promotions] == [(active.id, "segnode serve")]
    assert "shipped model" in promotions[0].reason


def test_bootstrap_off_leaves_the_model_table_empty(tmp_path: Path) -> None:
    home, port = tmp_path / "var", free_port()
    config = node_toml(tmp_path, port, "", bootstrap=False)
    node = ServedNode(config, home, tmp_path / "node.log", port).start()
    node.stop()
    assert _registry(home).list_models() == []
    assert "no active model for task 'whole_tumor'" in (tmp_path / "node.log").read_text()


def test_an_admins_choice_is_never_undone(tmp_path: Path) -> None:
    """A second start with the task already served promotes nothing (the audit trail has one promote)."""
    home, port = tmp_path / "var", free_port()
    config = node_toml(tmp_path, port, "", bootstrap=True)
    for _ in range(2):
        ServedNode(config, home, tmp_path / "node.log", port).start().stop()
    history = _registry(home).history("whole_tumor")
    assert [e.action for e in history].count("promote") == 1


def test_metrics_port_in_use_is_one_line_and_nothing_starts(tmp_path: Path) -> None:
    home, port = tmp_path / "var", free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        config = node_toml(tmp_path, port, "")
        metrics = f'[metrics]\nhost = "127.0.0.1"\nport = {taken}'
        config.write_text(config.read_text().replace("[metrics]\nport = 0", metrics))
        env = {**os.environ, "SEGNODE_HOME": str(home), "PYTHONPATH": str(REPO)}
        env.pop("SEGNODE_DATABASE_URL", None)
        proc = subprocess.run(
            [sys.executable, "-m", "node", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=120, env=env, cwd=REPO, check=False,
        )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"metrics.port: cannot listen on 127.0.0.1:{taken}" in lines[0]
    assert "[metrics] port" in lines[0] and "Traceback" not in proc.stderr


def test_service_start_refused_on_a_taken_metrics_port_leaves_nothing_running(tmp_path: Path) -> None:
    from node.exceptions import NodeError
    from node.service import NodeService
    from tests.helpers.node import node_settings

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = node_settings(tmp_path, free_port())
        settings.metrics.host, settings.metrics.port = "127.0.0.1", busy.getsockname()[1]
        service = NodeService(settings)
        with pytest.raises(NodeError, match=r"^metrics\.port: cannot listen on 127\.0\.0\.1:\d+: "):
            service.start()
    assert service.scp.server is None and service.http is None and service._threads == []
    with socket.socket() as probe:  # the DICOM port was never opened
        assert probe.connect_ex(("127.0.0.1", settings.node.port)) != 0
    service.stop()
