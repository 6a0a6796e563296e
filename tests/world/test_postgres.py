"""The node on a real PostgreSQL server: two `segnode serve` processes sharing it (every study
processed exactly once, even a study whose series arrive at different nodes), and the database going
away for a while (clear errors, then recovery without a restart).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import job_queue, send_queue
from db.registry import open_registry
from db.session import make_engine, make_session_factory
from node.config import Destination
from node.service import NodeService
from tests.helpers.dcmtk import DcmtkStoreSCP, storescu
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.ports import free_port
from tests.helpers.postgres import PostgresCluster
from tests.helpers.served import ServedNode, node_toml
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.postgres

SHAPE = (48, 48, 16)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    pg = PostgresCluster()
    yield pg
    pg.remove()


def test_two_serve_processes_share_postgresql_each_study_once(
    tmp_path: Path, cluster: PostgresCluster
) -> None:
    url = cluster.new_database()
    case = make_synthetic_case(12, SHAPE)
    install_model(
        open_registry(url), make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing)
    )
    dest = DcmtkStoreSCP(tmp_path / "received")
    ports = [free_port(), free_port()]
    nodes = [
        ServedNode(
            node_toml(tmp_path, port, url, [dest.destination()], idle=1.0, extra_node="workers = 2"),
            tmp_path / f"var{n}",
            tmp_path / f"serve{n}.log",
            port,
        )
        for n, port in enumerate(ports)
    ]
    studies = [write_study(case, tmp_path / f"study{n}", modalities=["FLAIR", "T2"]) for n in range(5)]
    try:
        for node in nodes:
            node.start()
        for n, study in enumerate(studies[:4]):
            sent = storescu(ports[n % 2], [p for fs in study.files.values() for p in fs])
            assert sent.returncode == 0, sent.stdout + sent.stderr
        # The last study's FLAIR goes to one node, its T2 to the other: still one study, one job.
        assert storescu(ports[0], studies[4].files["FLAIR"]).returncode == 0
        assert storescu(ports[1], studies[4].files["T2"]).returncode == 0
        sf = make_session_factory(make_engine(url))
        wait_until(
            lambda: (
                len(job_queue.list_jobs(sf)) >= 5
                and all(j.status == "done" for j in job_queue.list_jobs(sf))
                and send_queue.pending_send_count(sf) == 0
            ),
            120,
            "five jobs done and sent",
        )
        wait_until(lambda: len(dest.files()) >= 10, 30, "ten objects at storescp")
    finally:
        for node in nodes:
            node.stop()
        dest.stop()
    jobs = job_queue.list_jobs(sf)
    assert sorted(j.study_instance_uid for j in jobs) == sorted(s.study_instance_uid for s in studies)
    assert {j.attempts for j in jobs} == {1}
    assert {j.instance_count for j in jobs} == {2 * SHAPE[2]}
    owners = {j.owner.split(":")[-1] for j in jobs if j.owner}
    print(
        f"jobs per process: { {o: sum(1 for j in jobs if j.owner and j.owner.endswith(o)) for o in owners} }"
    )
    segs = sorted(str(ds.StudyInstanceUID) for ds in dest.datasets() if ds.Modality == "SEG")
    assert segs == sorted(s.study_instance_uid for s in studies)
    assert len(dest.files()) == 10


def _health(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_database_down_for_a_while_then_recovery_without_restart(
    tmp_path: Path, cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    url = cluster.new_database()
    case = make_synthetic_case(13, SHAPE)
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", catcher.ae_title, "127.0.0.1", catcher.port)], db_url=url
    )
    settings.metrics.port = free_port()
    node = NodeService(settings)
    install_model(
        node.registry, make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing)
    )
    before = write_study(case, tmp_path / "before", modalities=["FLAIR"])
    during = write_study(case, tmp_path / "during", modalities=["FLAIR"])
    node.start()
    try:
        assert storescu(node.scp.port, before.files["FLAIR"]).returncode == 0
        catcher.wait_for(lambda r: len(r) == 2, 60)
        http = node.http.port if node.http else 0
        assert _health(http)[0] == 200

        cluster.stop()
        with caplog.at_level(logging.ERROR):
            refused = storescu(node.scp.port, during.files["FLAIR"][:2], extra=["-v"])
            status, details = _health(http)
        out = refused.stdout + refused.stderr
        assert "Received Store Response (Refused: OutOfResources)" in out, out
        assert "C-STORE failed (0xA700 (Out of resources))" in caplog.text
        # One line per loop that met the outage, naming the driver's error whichever query met it first
        # (a new connection refused, or a pooled one closed under a running query).
        outage = [line for line in caplog.text.splitlines() if "database unreachable (" in line]
        assert outage and all("OperationalError: " in line for line in outage), outage
        assert "Traceback" not in caplog.text  # one line per outage, not a traceback per poll
        assert status == 503 and str(details["database"]).startswith("error: ")
        assert node.scp.server is not None  # still listening

        cluster.start()
        # No restart: the next C-STOREs are stored and the study is processed.
        wait_until(
            lambda: storescu(node.scp.port, during.files["FLAIR"]).returncode == 0, 30, "receiving again"
        )
        catcher.wait_for(lambda r: len(r) == 4, 60)
        wait_until(lambda: _health(http)[0] == 200, 30, "/healthz ok again")
        wait_until(lambda: "database reachable again after" in caplog.text, 10, "the recovery logged")
    finally:
        node.stop()
        catcher.stop()
    jobs = job_queue.list_jobs(node.sf)
    assert sorted(j.status for j in jobs) == ["done", "done"]
    assert {j.instance_count for j in jobs} == {SHAPE[2]}
    assert sum(ds.Modality == "SEG" for ds in catcher.received) == 2
