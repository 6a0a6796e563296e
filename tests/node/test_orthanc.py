"""With a real PACS (Orthanc): Orthanc pushes a study to the node, the SEG and SR land in Orthanc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import job_queue, send_queue
from node.config import Destination
from node.service import NodeService
from tests.helpers.node import install_model, make_threshold_model, node_settings
from tests.helpers.orthanc import Orthanc
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until


@pytest.fixture()
def orthanc_and_node(tmp_path: Path) -> Iterator[tuple[Orthanc, NodeService]]:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    case_spacing = make_synthetic_case(11, (64, 64, 24)).spacing
    settings = node_settings(
        tmp_path, node_port, [Destination("orthanc", "ORTHANC", "127.0.0.1", orthanc.dicom)]
    )
    node = NodeService(settings)
    install_model(
        node.registry, make_threshold_model(tmp_path / "model", crop=(64, 64), spacing=case_spacing)
    )
    node.start()
    try:
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def test_orthanc_pushes_study_and_receives_seg_and_sr(
    orthanc_and_node: tuple[Orthanc, NodeService], tmp_path: Path
) -> None:
    orthanc, node = orthanc_and_node
    study = write_study(make_synthetic_case(11, (64, 64, 24)), tmp_path / "study", modalities=["FLAIR", "T2"])
    for files in study.files.values():
        for path in files:
            orthanc.post("/instances", path.read_bytes())
    [orthanc_study] = orthanc.get("/studies")
    orthanc.post("/modalities/segnode/store", orthanc_study.encode())

    def modalities() -> set[str]:
        return {s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{orthanc_study}/series")}

    wait_until(lambda: {"SEG", "SR"} <= modalities(), 60, "SEG and SR stored in Orthanc")
    [job] = job_queue.list_jobs(node.sf)
    assert job.status == "done" and job.instance_count == 48
    wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "sends recorded as acknowledged")
    assert [s.status for s in job_queue.get_job(node.sf, job.id).sends] == ["done", "done"]
    series = orthanc.get(f"/studies/{orthanc_study}/series")
    seg = next(s for s in series if s["MainDicomTags"].get("Modality") == "SEG")
    assert seg["MainDicomTags"]["SeriesDescription"] == "AI TUMOUR SEG (segnode, not for diagnosis alone)"
