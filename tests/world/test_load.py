"""Load: eight DCMTK storescu processes at once, each sending a full four-series study to the node.

Every SEG is delivered, no instance is lost (a row and a readable spool file for each), and the test
prints instances/s (receive) and studies/min (first C-STORE to the last SEG delivered).
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest

from converters.dicom_writer import StudyInfo, write_study
from converters.synthetic import make_synthetic_case
from db import instances, job_queue, send_queue
from db.transactions import utcnow
from node.config import Destination
from node.service import NodeService
from tests.helpers.dcmtk import storescu
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SHAPE = (48, 48, 40)
STUDIES = 8


@pytest.mark.slow
def test_eight_concurrent_associations_each_a_four_series_study(tmp_path: Path) -> None:
    cases = [make_synthetic_case(30 + n, SHAPE) for n in range(STUDIES)]
    studies: list[StudyInfo] = [write_study(c, tmp_path / f"study{n}") for n, c in enumerate(cases)]
    per_study = 4 * SHAPE[2]
    assert all(s.n_files == per_study for s in studies)
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", catcher.ae_title, "127.0.0.1", catcher.port)]
    )
    settings.node.study_idle_seconds = 1.0
    settings.node.max_associations = STUDIES + 2
    settings.node.workers = 2
    node = NodeService(settings)
    install_model(
        node.registry, make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=cases[0].spacing)
    )
    node.start()
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(STUDIES) as pool:
            results: list[subprocess.CompletedProcess[str]] = list(
                pool.map(
                    lambda s: storescu(node.scp.port, [p for fs in s.files.values() for p in fs]), studies
                )
            )
        received_s = time.perf_counter() - start
        for result in results:
            assert result.returncode == 0, result.stdout + result.stderr
        catcher.wait_for(lambda r: sum(ds.Modality == "SEG" for ds in r) == STUDIES, 120)
        delivered_s = time.perf_counter() - start
        wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "all sends acknowledged")
    finally:
        node.stop()
        catcher.stop()
    total = STUDIES * per_study
    print(
        f"\nload: {STUDIES} concurrent associations, {total} instances received in {received_s:.1f} s "
        f"({total / received_s:.0f} instances/s); {STUDIES} studies' SEGs delivered in {delivered_s:.1f} s "
        f"({STUDIES / delivered_s * 60:.1f} studies/min)"
    )
    counts = instances.instance_counts(node.sf)
    assert counts == {"kept": total, "ignored": 0, "studies": STUDIES}
    jobs = job_queue.list_jobs(node.sf)
    assert len(jobs) == STUDIES, [(j.study_instance_uid, j.run, j.status, j.instance_count) for j in jobs]
    assert sorted(j.study_instance_uid for j in jobs) == sorted(s.study_instance_uid for s in studies)
    assert {j.status for j in jobs} == {"done"} and {j.instance_count for j in jobs} == {per_study}
    spooled = list(Path(settings.node.spool_path()).rglob("*.dcm"))
    assert len(spooled) == total
    sample = spooled[:: max(1, total // 50)]
    assert all(len(pydicom.dcmread(p).PixelData) == SHAPE[0] * SHAPE[1] * 2 for p in sample)
    segs = sorted(str(ds.StudyInstanceUID) for ds in catcher.received if ds.Modality == "SEG")
    assert segs == sorted(s.study_instance_uid for s in studies)
    assert len(catcher.received) == 2 * STUDIES


def test_a_study_still_being_received_is_never_due(tmp_path: Path) -> None:
    """What the load test found, in small: a write that waited for the lock must not move the idle
    timer backwards, and a study an open association is delivering is not due however old its timer."""
    from datetime import timedelta

    from db.session import make_engine, make_session_factory, upgrade

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    sf = make_session_factory(make_engine(url))
    t0 = utcnow()

    def receive(uid: str, at: object) -> None:
        instances.record_instance(
            sf, sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.1", kept=True, path=f"/spool/{uid}", calling_ae="PACS", now=at,  # type: ignore[arg-type]
        )  # fmt: skip

    receive("1.2.3.1.1", t0)
    receive("1.2.3.1.2", t0 - timedelta(seconds=30))  # stamped before a long wait for the lock
    assert instances.schedule_due_studies(sf, 10.0, now=t0 + timedelta(seconds=5)) == []
    assert instances.schedule_due_studies(sf, 10.0, now=t0 + timedelta(seconds=60), receiving={"1.2.3"}) == []
    instances.touch_studies(sf, {"1.2.3"}, now=t0 + timedelta(seconds=60))
    assert instances.schedule_due_studies(sf, 10.0, now=t0 + timedelta(seconds=65)) == []
    assert len(instances.schedule_due_studies(sf, 10.0, now=t0 + timedelta(seconds=71))) == 1
