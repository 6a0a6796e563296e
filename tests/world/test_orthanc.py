"""Orthanc as the PACS, checked through its REST API: a four-series study pushed to the node comes back
as a SEG and an SR in the same study with the right references; Orthanc then forwards the whole study,
SEG and SR included, to the node again (a routing rule gone wrong): acknowledged, no second job.

node/test_orthanc.py shows the basic push-and-return; this adds the references and the loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import instances, job_queue, send_queue
from node.config import Destination
from node.service import NodeService
from tests.helpers.node import install_model, make_threshold_model, node_settings
from tests.helpers.orthanc import Orthanc
from tests.helpers.ports import free_port
from tests.helpers.waiting import holds_for, wait_until

SHAPE = (48, 48, 16)


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[tuple[Orthanc, NodeService]]:
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    case = make_synthetic_case(17, SHAPE)
    settings = node_settings(
        tmp_path, node_port, [Destination("orthanc", "ORTHANC", "127.0.0.1", orthanc.dicom)]
    )
    node = NodeService(settings)
    install_model(
        node.registry, make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing)
    )
    node.start()
    try:
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def _tags(orthanc: Orthanc, instance: str) -> dict[str, Any]:
    tags: dict[str, Any] = orthanc.get(f"/instances/{instance}/simplified-tags")
    return tags


def test_orthanc_study_gets_seg_and_sr_with_references_and_no_loop(
    pacs: tuple[Orthanc, NodeService], tmp_path: Path
) -> None:
    orthanc, node = pacs
    study = write_study(make_synthetic_case(17, SHAPE), tmp_path / "study")
    for files in study.files.values():
        for path in files:
            orthanc.post("/instances", path.read_bytes())
    [orthanc_study] = orthanc.get("/studies")
    orthanc.post("/modalities/segnode/store", orthanc_study.encode())

    def by_modality() -> dict[str, list[dict[str, Any]]]:
        return orthanc.series_by_modality(orthanc_study)

    wait_until(lambda: {"SEG", "SR"} <= set(by_modality()), 60, "SEG and SR stored in Orthanc")
    series = by_modality()
    assert len(series["MR"]) == 4 and len(series["SEG"]) == 1 and len(series["SR"]) == 1
    [seg_instance] = series["SEG"][0]["Instances"]
    [sr_instance] = series["SR"][0]["Instances"]
    seg, sr = _tags(orthanc, seg_instance), _tags(orthanc, sr_instance)
    assert seg["StudyInstanceUID"] == sr["StudyInstanceUID"] == study.study_instance_uid
    assert seg["FrameOfReferenceUID"] == study.frame_of_reference_uid
    # The SEG references every FLAIR instance (and only those) that Orthanc holds.
    flair = next(
        s for s in series["MR"] if s["MainDicomTags"]["SeriesInstanceUID"] == study.series_uids["FLAIR"]
    )
    flair_uids = {_tags(orthanc, i)["SOPInstanceUID"] for i in flair["Instances"]}
    [ref_series] = seg["ReferencedSeriesSequence"]
    assert ref_series["SeriesInstanceUID"] == study.series_uids["FLAIR"]
    assert {r["ReferencedSOPInstanceUID"] for r in ref_series["ReferencedInstanceSequence"]} == flair_uids
    # The SR's evidence lists the SEG it measures.
    evidence = {
        inst["ReferencedSOPInstanceUID"]
        for st in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for se in st["ReferencedSeriesSequence"]
        for inst in se["ReferencedSOPSequence"]
    }
    assert seg["SOPInstanceUID"] in evidence
    wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "sends acknowledged")

    # Orthanc forwards everything, our SEG and SR too, back to the node: acknowledged, no new job.
    kept_before = instances.instance_counts(node.sf)["kept"]
    result = orthanc.post("/modalities/segnode/store", orthanc_study.encode())
    assert result.get("FailedInstancesCount", 0) == 0, result
    counts = instances.instance_counts(node.sf)
    assert counts["kept"] == kept_before == 4 * SHAPE[2]
    assert counts["ignored"] == 2
    def one_job() -> None:
        assert len(job_queue.list_jobs(node.sf)) == 1

    holds_for(one_job, 2 * node.settings.node.study_idle_seconds + 1.0)  # every chance for a (wrong) rerun
    assert len(by_modality()["SEG"]) == 1
