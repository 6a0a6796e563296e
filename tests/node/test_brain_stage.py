"""The pipeline's brain stage over real sockets: no tumour label outside the brain, the brain volume in
the job, and a study without a brain fails with the reason and sends nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import job_queue
from node.bootstrap import SHIPPED_BRAIN_EXTRACTOR_DIR, install_and_promote
from node.config import Destination
from node.sender import store_files
from node.service import NodeService
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SIEMENS = DATA / "dicom" / "siemens_t1_fl2d_sag_healthy"


@pytest.fixture()
def node_and_catcher(tmp_path: Path) -> Iterator[tuple[NodeService, CatchingSCP]]:
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    )
    node = NodeService(settings)
    install_and_promote(node.registry, SHIPPED_BRAIN_EXTRACTOR_DIR, by="test", reason="test")
    try:
        yield node, catcher
    finally:
        node.stop()
        catcher.stop()


def _finished(node: NodeService, uid: str, timeout: float = 120.0) -> job_queue.JobInfo:
    def done() -> job_queue.JobInfo | None:
        for job in job_queue.list_jobs(node.sf):
            if job.study_instance_uid == uid and job.status in ("done", "failed", "skipped"):
                return job
        return None

    return wait_until(done, timeout, f"the job of study {uid}")  # type: ignore[no-any-return]


def _send(node: NodeService, files: list[Path]) -> None:
    results = store_files(files, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}


def test_noise_study_fails_with_no_brain_and_sends_nothing(
    node_and_catcher: tuple[NodeService, CatchingSCP], tmp_path: Path
) -> None:
    node, catcher = node_and_catcher
    case = make_synthetic_case(3, (96, 96, 24))
    rng = np.random.default_rng(0)
    noise = rng.normal(300, 80, case.images["FLAIR"].shape).clip(0).astype(np.float32)
    affine = np.diag([2.4, 2.4, 5.0, 1.0])
    noisy = dataclasses.replace(case, images={"FLAIR": noise}, affine=affine, label=None)
    install_model(node.registry, make_threshold_model(tmp_path / "model", crop=(240, 240)))
    node.start()
    study = write_study(noisy, tmp_path / "study", modalities=["FLAIR"])
    _send(node, study.files["FLAIR"])
    job = _finished(node, study.study_instance_uid)
    assert job.status == "failed"
    assert "NoBrainFoundError" in job.reason and "found no brain" in job.reason
    assert "brain" in job.stages
    assert job_queue.get_job(node.sf, job.id).sends == []
    assert catcher.received == []


@pytest.mark.slow
@pytest.mark.skipif(not SIEMENS.is_dir(), reason=f"no real series at {SIEMENS}")
def test_real_head_labels_only_inside_the_brain(
    node_and_catcher: tuple[NodeService, CatchingSCP], tmp_path: Path
) -> None:
    from converters.dicom_series import load_series_folder
    from converters.reorient import volume_to_ras
    from node.brain_extraction import BrainExtractor, brain_volume_ml
    from node.segmenter import OpenVINOSegmenter

    node, catcher = node_and_catcher
    model_dir = make_threshold_model(tmp_path / "model", crop=(256, 256), modalities=("T1",), threshold=1.0)
    install_model(node.registry, model_dir)
    node.start()
    files = sorted(p for p in SIEMENS.iterdir() if p.is_file())
    _send(node, files)
    import pydicom

    job = _finished(node, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    assert job.status == "done", job.reason
    brain_ml = job.result["brain_volume_ml"]
    assert 1000 <= brain_ml <= 1800
    assert job.result["brain_extractor"].startswith("deepbet 1.0.2")

    # The same threshold model without the brain stage labels scalp and fat outside the brain: the
    # job's tumour volume is exactly the part inside the brain mask.
    image, affine = volume_to_ras(load_series_folder(SIEMENS))
    card = __import__("json").loads((model_dir / "model.json").read_text())
    mask = BrainExtractor.from_dir(SHIPPED_BRAIN_EXTRACTOR_DIR, threads=2).extract(image, affine)
    segmenter = OpenVINOSegmenter(card, model_dir / "model_fp32.xml")
    unmasked = segmenter.segment({"T1": image}, affine) > 0
    assert brain_volume_ml(unmasked & ~mask, affine) > 10  # without the brain stage: scalp and fat too
    # The node normalises inside the brain mask (world-space preprocessing), so the direct run does too;
    # nothing outside the brain is labelled then.
    raw = segmenter.segment({"T1": image}, affine, mask) > 0
    assert brain_volume_ml(raw & ~mask, affine) == 0
    inside_ml = brain_volume_ml(raw & mask, affine)
    assert job.result["volumes_ml"][0] == pytest.approx(inside_ml, abs=0.5)
    assert abs(brain_ml - brain_volume_ml(mask, affine)) < 1.0
    wait_until(lambda: len(catcher.received) >= 2, 60, "SEG and SR at the destination")
