"""The node killed with SIGKILL mid-job and restarted delivers the SEG exactly once (real BraTS case)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from converters.dicom_series import load_series
from converters.dicom_writer import write_study
from converters.nifti import load_case
from converters.reorient import ras_to_volume
from db import job_queue, send_queue
from db.registry import open_registry
from db.session import make_engine, make_session_factory
from node.config import Destination
from node.sender import store_files
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model
from tests.helpers.peers import require_shared
from tests.helpers.ports import free_port
from tests.helpers.served import ServedNode, node_toml
from tests.helpers.waiting import wait_until


@pytest.fixture()
def catcher() -> Iterator[CatchingSCP]:
    scp = CatchingSCP().start(free_port())
    yield scp
    scp.stop()


@pytest.mark.slow
def test_sigkill_mid_job_then_restart_delivers_seg_exactly_once(tmp_path: Path, catcher: CatchingSCP) -> None:
    case_dir = require_shared("train", "brats", "BraTS2021_00005")
    case = load_case(case_dir)
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    model_dir = make_threshold_model(tmp_path / "model", crop=(192, 192), threshold=1.5)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    install_model(open_registry(url), model_dir)
    port = free_port()
    config = node_toml(tmp_path, port, url, [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)])
    sf = make_session_factory(make_engine(url))
    served = ServedNode(config, tmp_path / "var", tmp_path / "serve.log", port)
    try:
        served.start()
        results = store_files(study.files["FLAIR"], "127.0.0.1", port, "SEGNODE", "PACS")
        assert {s for _, s, _ in results} == {0}
        job = wait_until(
            lambda: next((j for j in job_queue.list_jobs(sf) if j.status == "running"), None),
            60,
            "a running job",
            interval=0.01,
        )
        served.kill()
        killed = job_queue.get_job(sf, job.id)
        assert killed.status == "running", f"the job ended before the kill: {killed.status}"
        assert catcher.received == []

        served.start()
        catcher.wait_for(lambda r: len(r) >= 2, 120)
        wait_until(
            lambda: send_queue.pending_send_count(sf) == 0 and job_queue.get_job(sf, job.id).status == "done",
            30,
            "the job done and its sends acknowledged",
        )
    finally:
        served.stop()
    done = job_queue.get_job(sf, job.id)
    assert done.attempts == 2
    assert "re-queued" not in done.reason
    assert [ds.Modality for ds in catcher.received].count("SEG") == 1
    assert [ds.Modality for ds in catcher.received].count("SR") == 1
    assert "left running by a stopped process" in (tmp_path / "serve.log").read_text()

    # The returned mask equals the model run on the NIfTI case directly.
    from node.segmenter import OpenVINOSegmenter

    card = json.loads((model_dir / "model.json").read_text())
    direct = OpenVINOSegmenter(card, model_dir / "model_fp32.xml").segment(case.images, case.affine)
    volume = load_series(study.files["FLAIR"])
    expected = np.asarray(ras_to_volume(direct, volume)) > 0
    seg_file = tmp_path / "seg.dcm"
    next(ds for ds in catcher.received if ds.Modality == "SEG").save_as(seg_file, enforce_file_format=True)
    seg = hd.seg.segread(seg_file)
    returned = (
        seg.get_pixels_by_source_instance(
            source_sop_instance_uids=volume.sop_instance_uids,
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )[..., 0]
        > 0
    )
    assert expected.sum() > 1000
    dice = 2 * (returned & expected).sum() / (returned.sum() + expected.sum())
    assert dice >= 0.99
