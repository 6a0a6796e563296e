"""End-to-end tests of the node over real sockets: study in by C-STORE, SEG and SR out by C-STORE."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from converters.case import Case
from converters.dicom_series import load_series
from converters.dicom_writer import StudyInfo, write_study
from converters.reorient import ras_to_volume
from converters.synthetic import make_synthetic_case
from db import job_queue, send_queue
from db.node_tables import NodeStudy
from db.transactions import as_utc, utcnow
from node.config import Destination
from node.sender import store_files
from node.service import NodeService
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.peers import require_program
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SHAPE = (64, 64, 24)


@pytest.fixture(scope="module")
def case() -> Case:
    return make_synthetic_case(7, SHAPE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, case: Case) -> Path:
    return make_threshold_model(
        tmp_path_factory.mktemp("model"), crop=SHAPE[:2], spacing=case.spacing, threshold=1.5
    )


@dataclass
class Env:
    node: NodeService
    catcher: CatchingSCP
    tmp: Path

    def send_study(self, study: StudyInfo, modalities: list[str] | None = None) -> None:
        files = [p for m, fs in study.files.items() if modalities is None or m in modalities for p in fs]
        results = store_files(files, "127.0.0.1", self.node.scp.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {0}

    def job_for(self, study: StudyInfo, timeout: float = 60.0) -> job_queue.JobInfo:
        def finished() -> job_queue.JobInfo | None:
            for job in job_queue.list_jobs(self.node.sf):
                if job.study_instance_uid == study.study_instance_uid and job.status in (
                    "done",
                    "failed",
                    "skipped",
                ):
                    return job
            return None

        return wait_until(finished, timeout, f"the job of study {study.study_instance_uid}")  # type: ignore[no-any-return]


@pytest.fixture()
def env(tmp_path: Path, model_dir: Path) -> Iterator[Env]:
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    )
    settings.metrics.port = free_port()
    node = NodeService(settings)
    install_model(node.registry, model_dir)
    node.start()
    try:
        yield Env(node, catcher, tmp_path)
    finally:
        node.stop()
        catcher.stop()


def _direct_mask(model_dir: Path, case: Case, study: StudyInfo) -> np.ndarray:
    """The model run on the NIfTI case directly, mapped onto the FLAIR series' (slice, row, col) grid."""
    from node.segmenter import OpenVINOSegmenter

    card = json.loads((model_dir / "model.json").read_text())
    labels = OpenVINOSegmenter(card, model_dir / "model_fp32.xml").segment(case.images, case.affine)
    volume = load_series(study.files["FLAIR"])
    return np.asarray(ras_to_volume(labels, volume)), volume.sop_instance_uids


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _validate_with_peers(seg: Path, sr: Path, tmp_path: Path, voxels: int) -> None:
    """dciodvfy (dicom3tools) finds no error or warning; dcmqi reads the SEG as a viewer would."""
    dciodvfy = require_program("dciodvfy")
    for path in (seg, sr):
        report = subprocess.run(
            [dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        problems = [
            line
            for line in (report.stdout + report.stderr).splitlines()
            if "Error" in line or "Warning" in line
        ]
        assert problems == [], f"{path.name}: {problems}"
    segimage2itkimage = require_program("segimage2itkimage", str(Path(sys.executable).parent))
    out = tmp_path / "dcmqi"
    out.mkdir()
    run = subprocess.run(
        [segimage2itkimage, "--inputDICOM", str(seg), "--outputDirectory", str(out), "--outputType", "nifti"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "Failed to get CIELab" not in run.stdout + run.stderr
    import nibabel as nib

    assert int(np.asarray(nib.load(out / "1.nii.gz").dataobj).sum()) == voxels
    meta = json.loads((out / "meta.json").read_text())
    assert meta["segmentAttributes"][0][0]["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == "108369006"


def test_study_in_seg_and_sr_out(env: Env, case: Case, model_dir: Path, tmp_path: Path) -> None:
    study = write_study(case, tmp_path / "study")
    env.send_study(study)
    received = env.catcher.wait_for(lambda r: len(r) >= 2, 60)
    job = env.job_for(study)
    assert job.status == "done", job.reason
    assert set(job.stages) >= {"select", "sr", "write"}
    # Read, segmented and its SEG built in the job, or while T1, T1GD and T2 arrived (early analysis,
    # the default).
    early = job.result["early_analysis"] or {}
    assert {"load", "inference", "seg"} <= set(job.stages) | set(early.get("stages", {}))
    assert job.result["series"] == {"FLAIR": study.series_uids["FLAIR"]}
    assert {ds.Modality for ds in received} == {"SEG", "SR"}

    seg_file = tmp_path / "seg.dcm"
    next(ds for ds in received if ds.Modality == "SEG").save_as(seg_file, enforce_file_format=True)
    seg = hd.seg.segread(seg_file)
    assert seg.SeriesDescription == "AI TUMOUR SEG (segnode, not for diagnosis alone)"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == study.study_instance_uid
    desc = seg.SegmentSequence[0]
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert desc.SegmentAlgorithmType == "AUTOMATIC"
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("test-threshold", "1.0.0")
    assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    referenced = {
        inst.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for inst in series.ReferencedInstanceSequence
    }
    flair_uids = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.files["FLAIR"]
    ]
    assert referenced == set(flair_uids)

    expected, order = _direct_mask(model_dir, case, study)
    returned = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=order, segment_numbers=[1], assert_missing_frames_are_empty=True
    )[..., 0]
    assert expected.any()
    assert _dice(returned, expected) >= 0.99

    sr_file = tmp_path / "sr.dcm"
    next(ds for ds in received if ds.Modality == "SR").save_as(sr_file, enforce_file_format=True)
    sr = hd.sr.srread(sr_file)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    measurement = groups[0].get_measurements()[0]
    assert measurement.unit.value == "mL"
    voxel_ml = float(np.prod(load_series(study.files["FLAIR"]).spacing)) / 1000
    assert measurement.value == pytest.approx(expected.sum() * voxel_ml, rel=1e-3)
    assert groups[0].referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID

    assert Path(job.result["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _validate_with_peers(Path(job.result["seg"]), Path(job.result["sr"]), tmp_path, int(expected.sum()))
    port = env.node.http.port if env.node.http else 0
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'segnode_jobs{state="done"} 1.0' in metrics
    assert 'segnode_instances_received_total{outcome="kept"} 96.0' in metrics
    assert "segnode_inference_seconds_count 1.0" in metrics
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read())
    assert health["status"] == "ok" and health["model"].startswith("test-threshold 1.0.0")


def test_study_without_flair_is_skipped(env: Env, case: Case, tmp_path: Path) -> None:
    study = write_study(case, tmp_path / "study", modalities=["T1", "T2"])
    env.send_study(study)
    job = env.job_for(study)
    assert job.status == "skipped"
    assert job.reason.startswith("no FLAIR series in the study (considered: series ")
    assert "AX T1" in job.reason and "AX T2" in job.reason
    assert job_queue.get_job(env.node.sf, job.id).sends == []
    assert env.catcher.received == []


def test_destination_down_then_up_gets_seg_exactly_once(tmp_path: Path, case: Case, model_dir: Path) -> None:
    up = CatchingSCP().start(free_port())
    down_port = free_port()
    settings = node_settings(
        tmp_path,
        free_port(),
        [
            Destination("down", "LATE", "127.0.0.1", down_port),
            Destination("up", "CATCHER", "127.0.0.1", up.port),
        ],
    )
    node = NodeService(settings)
    install_model(node.registry, model_dir)
    node.start()
    late = CatchingSCP("LATE")
    try:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        Env(node, up, tmp_path).send_study(study)
        up.wait_for(lambda r: len(r) == 2, 60)  # the live destination is not blocked by the dead one

        def failed_twice() -> bool:
            sends = send_queue.due_sends(node.sf, now=utcnow() + timedelta(days=1))
            return bool(sends) and all(s.attempts >= 2 and "association" in s.last_error for s in sends)

        wait_until(failed_twice, 30, "two failed attempts to the dead destination")
        late.start(down_port)
        late.wait_for(lambda r: len(r) >= 2, 30)
        wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "all sends acknowledged")
    finally:
        node.stop()
        late.stop()
        up.stop()
    rendered = node.metrics.render().decode()
    assert 'segnode_send_failures_total{destination="down"}' in rendered
    assert node.metrics.send_failures.labels("down")._value.get() >= 4  # two objects, two attempts each
    assert node.metrics.sends.labels("down")._value.get() == 2
    segs = [ds.SOPInstanceUID for ds in late.received if ds.Modality == "SEG"]
    assert len(segs) == 1 and len(late.received) == 2
    assert len(up.received) == 2


def test_model_promoted_while_running_is_used_for_next_study(env: Env, case: Case, tmp_path: Path) -> None:
    first = write_study(case, tmp_path / "first", modalities=["FLAIR"])
    env.send_study(first)
    assert env.job_for(first).model_label == "test-threshold 1.0.0 (fp32, #1)"

    newer = make_threshold_model(
        tmp_path / "v2", version="2.0.0", crop=SHAPE[:2], spacing=case.spacing, threshold=1.0
    )
    promoted = install_model(env.node.registry, newer)
    second = write_study(case, tmp_path / "second", modalities=["FLAIR"])
    env.send_study(second)
    job = env.job_for(second)
    assert job.status == "done"
    assert job.model_label == f"test-threshold 2.0.0 (fp32, #{promoted.id})"
    received = env.catcher.wait_for(lambda r: sum(ds.Modality == "SEG" for ds in r) == 2, 30)
    versions = sorted(
        ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
        for ds in received
        if ds.Modality == "SEG"
    )
    assert versions == ["1.0.0", "2.0.0"]


def test_instances_after_job_start_make_a_new_run(env: Env, case: Case, tmp_path: Path) -> None:
    study = write_study(case, tmp_path / "study", modalities=["FLAIR", "T2"])
    env.send_study(study, ["FLAIR"])
    first = env.job_for(study)
    assert first.run == 1 and first.instance_count == SHAPE[2]
    env.send_study(study, ["T2"])

    def second_run() -> job_queue.JobInfo | None:
        uid = study.study_instance_uid
        jobs = [j for j in job_queue.list_jobs(env.node.sf) if j.study_instance_uid == uid]
        return next((j for j in jobs if j.run == 2 and j.status == "done"), None)

    job = wait_until(second_run, 60, "the second run of the study")
    assert job.instance_count == 2 * SHAPE[2]


def test_a_slow_spool_write_never_lets_a_job_read_a_missing_file(
    env: Env, case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first instance's row is committed while its file is still being written; a write slower than
    study_idle_seconds (0.3 s here) used to let the study look idle and its job fail with
    FileNotFoundError. The study is in flight from the moment an instance arrives."""
    import node.scp
    from node.spool import write_atomic

    slowed: list[Path] = []

    def slow_first_write(path: Path, data: bytes) -> None:
        if not slowed:
            slowed.append(path)
            time.sleep(4 * env.node.settings.node.study_idle_seconds + 0.5)
        write_atomic(path, data)

    monkeypatch.setattr(node.scp, "write_atomic", slow_first_write)
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    env.send_study(study)
    job = env.job_for(study)
    assert slowed, "the spool write was not slowed"
    assert (job.status, job.run, job.instance_count) == ("done", 1, SHAPE[2]), job.error
    runs = [j for j in job_queue.list_jobs(env.node.sf) if j.study_instance_uid == study.study_instance_uid]
    assert len(runs) == 1


def test_enhanced_mr_multiframe_study(env: Env, case: Case, model_dir: Path, tmp_path: Path) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    legacy = [pydicom.dcmread(p) for p in reversed(study.files["FLAIR"])]  # frames in reverse slice order
    enhanced = LegacyConvertedEnhancedMRImage(
        legacy, series_instance_uid=hd.UID(), series_number=100, sop_instance_uid=hd.UID(), instance_number=1
    )
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    assert store_files([path], "127.0.0.1", env.node.scp.port, "SEGNODE", "PACS")[0][1] == 0
    job = env.job_for(study)
    assert job.status == "done", job.reason
    seg_ds = next(
        ds
        for ds in env.catcher.wait_for(lambda r: any(d.Modality == "SEG" for d in r), 30)
        if ds.Modality == "SEG"
    )
    seg_file = tmp_path / "seg.dcm"
    seg_ds.save_as(seg_file, enforce_file_format=True)
    seg = hd.seg.segread(seg_file)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        enhanced.SOPInstanceUID
    )
    expected, _ = _direct_mask(model_dir, case, study)
    returned = np.zeros_like(expected)
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source_frame = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
        returned[len(legacy) - int(source_frame)] = (
            seg.pixel_array[n] if seg.pixel_array.ndim == 3 else seg.pixel_array
        )
    assert _dice(returned, expected) >= 0.99


def test_inconsistent_series_fails_with_reason(env: Env, case: Case, tmp_path: Path) -> None:
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    files = study.files["FLAIR"]
    results = store_files(files[:10] + files[11:], "127.0.0.1", env.node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}
    job = env.job_for(study)
    assert job.status == "failed"
    assert job.reason.startswith(
        f"FLAIR series {study.series_uids['FLAIR']} (AX FLAIR, {SHAPE[2] - 1} slices): "
    )
    assert env.catcher.received == []


@pytest.mark.postgres
def test_two_nodes_share_one_postgresql_database(
    tmp_path: Path, case: Case, model_dir: Path, postgres_server: object
) -> None:
    """Two node processes' worth of services on one PostgreSQL database and one spool: each study once."""
    url = str(postgres_server.new_database())  # type: ignore[attr-defined]
    catcher = CatchingSCP().start(free_port())
    nodes = []
    try:
        for _ in range(2):
            settings = node_settings(
                tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)], db_url=url
            )
            settings.node.workers = 2
            nodes.append(NodeService(settings))
        install_model(nodes[0].registry, model_dir)
        for node in nodes:
            node.start()
        studies = [write_study(case, tmp_path / f"study{n}", modalities=["FLAIR"]) for n in range(4)]
        for n, study in enumerate(studies):
            Env(nodes[n % 2], catcher, tmp_path).send_study(study)
        catcher.wait_for(lambda r: len(r) >= 8, 90)
        wait_until(lambda: send_queue.pending_send_count(nodes[0].sf) == 0, 30, "all sends acknowledged")
    finally:
        for node in nodes:
            node.stop()
        catcher.stop()
    jobs = job_queue.list_jobs(nodes[0].sf)
    assert sorted(j.study_instance_uid for j in jobs) == sorted(s.study_instance_uid for s in studies)
    assert {j.status for j in jobs} == {"done"} and {j.attempts for j in jobs} == {1}
    referenced = sorted(str(ds.StudyInstanceUID) for ds in catcher.received if ds.Modality == "SEG")
    assert referenced == sorted(s.study_instance_uid for s in studies)


def test_four_channel_model_gets_all_four_series(env: Env, case: Case, tmp_path: Path) -> None:
    four = make_threshold_model(
        tmp_path / "four",
        name="test-four",
        crop=SHAPE[:2],
        spacing=case.spacing,
        modalities=("FLAIR", "T1", "T1GD", "T2"),
    )
    install_model(env.node.registry, four)
    study = write_study(case, tmp_path / "study")
    env.send_study(study)
    job = env.job_for(study)
    assert job.status == "done", job.reason
    assert job.model_label is not None and job.model_label.startswith("test-four")
    assert job.result["series"] == study.series_uids
    seg = next(
        ds
        for ds in env.catcher.wait_for(lambda r: any(d.Modality == "SEG" for d in r), 30)
        if ds.Modality == "SEG"
    )
    referenced = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
    assert referenced == {study.series_uids["FLAIR"]}  # the SEG lies on the first channel's grid


def test_with_minute_long_polls_the_seg_is_back_seconds_after_the_study(
    tmp_path: Path, model_dir: Path, case: Case
) -> None:
    """Nothing waits for a poll: the association's end wakes the workers, which wait exactly until the
    study is due (study_idle_seconds after its last instance), and the job's end wakes the sender."""
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)], idle=1.0
    )
    settings.node.poll_seconds = 60.0  # no worker or sender poll comes during the test
    node = NodeService(settings)
    install_model(node.registry, model_dir)
    node.start()
    try:
        time.sleep(1.0)  # past the start-up quiet period; the worker is in its 60 s wait
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        Env(node, catcher, tmp_path).send_study(study)
        received = catcher.wait_for(lambda r: {ds.Modality for ds in r} == {"SEG", "SR"}, 30)
        assert len(received) == 2
        [job] = job_queue.list_jobs(node.sf)
        assert job.started_at is not None
        with node.sf() as s:  # when the node stamped the study's last instance (its idle timer's start)
            [last] = s.scalars(select(NodeStudy.last_received_at)).all()
        # The job started when the study became due (idle 1 s), not before and not a poll (60 s) later.
        # Measured from the node's own stamp, with 9 s to spare: measured from the send's return, with
        # 0.5 s to spare, a loaded CI machine's delays (the release, the worker's wake-up) were enough.
        assert 0.8 <= (job.started_at - as_utc(last)).total_seconds() < 10.0
    finally:
        node.stop()
        catcher.stop()


def test_the_worker_polls_on_when_it_cannot_learn_the_next_due_study(
    env: Env, case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> float:
        raise RuntimeError("no such table: node_studies")

    monkeypatch.setattr("db.instances.seconds_until_due", broken)
    time.sleep(0.3)  # the worker's loop meets the error a few times first
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    env.send_study(study)
    assert env.job_for(study).status == "done"
