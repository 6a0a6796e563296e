"""``[node] receivers``: more processes accept C-STOREs on the node's port (node/receivers.py), over
real sockets (DCMTK storescu) and a real database; the node's ``/metrics`` counts them all."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db.instances import instance_counts
from node.config import ConfigError, load_settings
from node.metrics import NodeMetrics
from node.receivers import _Counts
from node.service import NodeService
from tests.helpers.dcmtk import storescu
from tests.helpers.node import node_settings
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """Four series of one synthetic study."""
    study = write_study(
        make_synthetic_case(11, (24, 24, 8)),
        tmp_path_factory.mktemp("study"),
        modalities=["FLAIR", "T1", "T1GD", "T2"],
    )
    return [study.files[m] for m in ("FLAIR", "T1", "T1GD", "T2")]


def _counted(node: NodeService, outcome: str) -> float:
    value = node.metrics.registry.get_sample_value("segnode_instances_received_total", {"outcome": outcome})
    return value or 0.0


def test_receivers_share_the_port_and_keep_every_instance(
    tmp_path: Path, db_url: str, series: list[list[Path]]
) -> None:
    settings = node_settings(tmp_path, free_port(), db_url=db_url, idle=60.0)
    settings.node.receivers = 3
    node = NodeService(settings)
    node.start()
    try:
        assert node.receivers is not None and len(node.receivers.pids) == 2
        files = [f for s in series for f in s]
        # Twelve associations, three at a time: the kernel spreads them over the three processes.
        for _ in range(3):
            threads = [threading.Thread(target=storescu, args=(node.scp.port, s)) for s in series]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert instance_counts(node.sf)["kept"] == len(files)
        assert sum(1 for _ in node.scp.spool_dir.rglob("*.dcm")) == len(files)
        # Every C-STORE (repeats count as duplicates) reaches the node's counters, from whichever
        # process answered it; the receivers answered some of them.
        counts = {"kept": len(files), "duplicate": 2 * len(files)}
        wait_until(
            lambda: all(_counted(node, o) == n for o, n in counts.items()), 10, "every C-STORE counted"
        )
        assert {o: _counted(node, o) for o in counts} == counts
        assert sum(node.receivers.received.values()) > 0
        ok, details = node.health()
        assert ok and details["receivers"]["alive"] == 2
        pids = node.receivers.pids
    finally:
        node.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # stopped and reaped


def test_a_receiver_that_dies_is_started_again(tmp_path: Path, series: list[list[Path]]) -> None:
    settings = node_settings(tmp_path, free_port(), idle=60.0)
    settings.node.receivers = 2
    node = NodeService(settings)
    node.start()
    try:
        assert node.receivers is not None
        (victim,) = node.receivers.pids
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: node.receivers is not None and node.receivers.pids != [victim] and node.receivers.alive(),
            60,
            "a new receiving process",
        )
        files = [f for s in series for f in s]
        for s in series:
            storescu(node.scp.port, s)
        assert instance_counts(node.sf)["kept"] == len(files)
    finally:
        node.stop()


@pytest.mark.parametrize("value", ["0", "65"])
def test_receivers_out_of_range_is_a_config_error(tmp_path: Path, value: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f"[node]\nreceivers = {value}\n")
    with pytest.raises(ConfigError, match=r"node\.receivers"):
        load_settings(config)


def test_one_receiver_is_the_node_alone(tmp_path: Path) -> None:
    node = NodeService(node_settings(tmp_path, free_port()))
    node.start()
    try:
        assert node.receivers is None and not node.scp.shared_port and node.scp.listen_fd is None
        ok, details = node.health()
        assert ok and "receivers" not in details
    finally:
        node.stop()


def test_a_receivers_counts_reach_the_node_for_every_outcome() -> None:
    """A receiver reported a fixed list of outcomes that lacked ``replaced`` (a corrected instance
    sent again): those counts never reached the node's /metrics."""
    metrics = NodeMetrics()
    counts = _Counts(metrics)
    assert counts.take() == {}
    for outcome, n in (("kept", 3), ("replaced", 2), ("duplicate", 1)):
        metrics.instances.labels(outcome).inc(n)
    assert counts.take() == {"kept": 3.0, "replaced": 2.0, "duplicate": 1.0}
    metrics.instances.labels("replaced").inc()
    assert counts.take() == {"replaced": 1.0}
    assert counts.take() == {}
