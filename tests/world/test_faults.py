"""Faults: the node killed (SIGKILL) while receiving, the disk running low while it serves.

node/test_restart.py kills the node mid-job; here it is killed mid-association with a four-series
study half received, the PACS sends the study again after the restart (as a PACS does for what was
not acknowledged), and two destinations (a pynetdicom SCP and DCMTK storescp) must each get exactly
one SEG. The database down for a while is in world/test_postgres.py.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import instances, job_queue, send_queue
from db.node_tables import NodeInstance
from db.registry import open_registry
from db.session import make_engine, make_session_factory
from node import reactor
from node.config import Destination
from node.service import NodeService
from tests.helpers.dcmtk import DcmtkStoreSCP, storescu
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.ports import free_port
from tests.helpers.served import ServedNode, node_toml
from tests.helpers.waiting import wait_until

SHAPE = (48, 48, 30)


class Pacs(threading.Thread):
    """Sends files over one association, one C-STORE at a time, recording what was acknowledged."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port, self.files = port, files
        self.acknowledged: list[str] = []
        self.error = ""

    def run(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(MRImageStorage)
        ae.network_timeout = ae.dimse_timeout = 10
        assoc = reactor.associate(ae, "127.0.0.1", self.port, "SEGNODE")
        try:
            for path in self.files:
                ds = pydicom.dcmread(path)
                rsp = assoc.send_c_store(ds)
                if rsp is None or "Status" not in rsp:
                    self.error = "no response (association gone)"
                    return
                if rsp.Status == 0:
                    self.acknowledged.append(str(ds.SOPInstanceUID))
        except Exception as exc:  # the node vanished under us
            self.error = repr(exc)
        finally:
            if assoc.is_established:
                assoc.abort()


@pytest.mark.slow
def test_sigkill_while_receiving_loses_nothing_acknowledged_and_sends_one_seg(tmp_path: Path) -> None:
    catcher = CatchingSCP().start(free_port())
    dcmtk = DcmtkStoreSCP(tmp_path / "dcmtk")
    case = make_synthetic_case(8, SHAPE)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    install_model(
        open_registry(url), make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing)
    )
    port = free_port()
    destinations = [Destination("pacs", catcher.ae_title, "127.0.0.1", catcher.port), dcmtk.destination()]
    config = node_toml(tmp_path, port, url, destinations, idle=2.0)
    served = ServedNode(config, tmp_path / "var", tmp_path / "serve.log", port)
    study = write_study(case, tmp_path / "study")
    files = [p for fs in study.files.values() for p in fs]
    sf = make_session_factory(make_engine(url))

    def received() -> int:
        with sf() as s:
            return int(s.scalar(select(func.count()).select_from(NodeInstance)) or 0)

    try:
        served.start()
        pacs = Pacs(port, files)
        pacs.start()
        wait_until(lambda: received() >= 45, 60, "45 instances received", interval=0.005)
        served.kill()
        pacs.join(30)
        acknowledged = list(pacs.acknowledged)
        # A row is committed just before its Success goes out, so the PACS may have one or two fewer.
        assert 40 <= len(acknowledged) < len(files), f"{len(acknowledged)} acknowledged"
        assert pacs.error, "the association should have broken"

        # Every acknowledged instance is on disk, complete, and recorded.
        with sf() as s:
            rows = {r.sop_instance_uid: r for r in s.scalars(select(NodeInstance))}
        for uid in acknowledged:
            assert uid in rows, f"acknowledged instance {uid} has no row"
            spooled = pydicom.dcmread(rows[uid].path or "")
            assert spooled.SOPInstanceUID == uid and len(spooled.PixelData) == SHAPE[0] * SHAPE[1] * 2
        for path in Path(tmp_path / "spool").rglob("*.dcm"):  # no half-written file under a final name
            assert len(pydicom.dcmread(path).PixelData) == SHAPE[0] * SHAPE[1] * 2
        assert job_queue.list_jobs(sf) == []

        served.start()
        resent = storescu(port, files)  # the PACS sends the study again
        assert resent.returncode == 0, resent.stdout + resent.stderr

        def finished() -> job_queue.JobInfo | None:
            jobs = job_queue.list_jobs(sf)
            done = [j for j in jobs if j.status == "done"]
            if done and send_queue.pending_send_count(sf) == 0 and all(j.status == "done" for j in jobs):
                return done[0]
            return None

        job = wait_until(finished, 90, "the study processed and both destinations served")
        wait_until(lambda: len(dcmtk.files()) >= 2, 30, "storescp has SEG and SR")
    finally:
        served.stop()
        catcher.stop()
        dcmtk.stop()
    assert received() == len(files)
    assert job.instance_count == len(files)
    assert [j.status for j in job_queue.list_jobs(sf)] == ["done"], job_queue.list_jobs(sf)
    assert [ds.Modality for ds in catcher.received].count("SEG") == 1
    assert [ds.Modality for ds in dcmtk.datasets()].count("SEG") == 1
    assert len(catcher.received) == 2 and len(dcmtk.files()) == 2


def test_disk_below_min_free_refuses_associations_and_keeps_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills while the node serves: new associations refused (DCMTK sees it), what was
    received stays and is processed, and the node accepts again once there is room."""
    case = make_synthetic_case(9, (48, 48, 12))
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", catcher.ae_title, "127.0.0.1", catcher.port)]
    )
    settings.node.study_idle_seconds = 1.0
    node = NodeService(settings)
    install_model(
        node.registry, make_threshold_model(tmp_path / "model", crop=(48, 48), spacing=case.spacing)
    )
    first = write_study(case, tmp_path / "first", modalities=["FLAIR"])
    second = write_study(case, tmp_path / "second", modalities=["FLAIR"])
    node.start()
    try:
        assert storescu(node.scp.port, first.files["FLAIR"]).returncode == 0
        node.scp.settings.min_free_disk_mb = 10**9  # "the disk is full" from now on
        with caplog.at_level(logging.ERROR, logger="node.scp"):
            refused = storescu(node.scp.port, second.files["FLAIR"], extra=["-v"])
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stdout + refused.stderr
        assert "below min_free_disk_mb 1000000000" in caplog.text
        # What was received before is intact and still processed.
        job = wait_until(
            lambda: next((j for j in job_queue.list_jobs(node.sf) if j.status in ("done", "failed")), None),
            60,
            "the first study's job",
        )
        assert job.status == "done" and job.study_instance_uid == first.study_instance_uid
        assert job.instance_count == 12
        assert all(Path(p).is_file() for p in job_queue.job_instance_paths(node.sf, job.id))
        catcher.wait_for(lambda r: len(r) == 2, 30)
        node.scp.settings.min_free_disk_mb = 1  # room again
        wait_until(
            lambda: storescu(node.scp.port, second.files["FLAIR"]).returncode == 0, 10, "accepting again"
        )
        wait_until(
            lambda: any(
                j.study_instance_uid == second.study_instance_uid and j.status == "done"
                for j in job_queue.list_jobs(node.sf)
            ),
            60,
            "the second study processed",
        )
    finally:
        node.stop()
        catcher.stop()
    assert instances.instance_counts(node.sf)["studies"] == 2
