"""DCMTK as the PACS on both sides of the node, dciodvfy and dcmqi as readers, and real vendor DICOM.

``storescu`` sends a converted four-series study, DCMTK ``storescp`` is the destination that receives
the SEG and the SR; dciodvfy validates both (its warnings are printed), dcmqi's ``segimage2itkimage``
reads the SEG into a mask equal, voxel for voxel in patient space, to the node's; highdicom reads
both back. The real GE MP-RAGE series (oblique, files out of order) goes in through ``storescu``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from converters.dicom_series import load_series
from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import job_queue, send_queue
from node.service import NodeService
from tests.helpers.dcmtk import DcmtkStoreSCP, run_tool, storescu
from tests.helpers.node import install_model, make_threshold_model, node_settings
from tests.helpers.peers import require_program, require_shared
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SHAPE = (64, 64, 20)


@pytest.fixture()
def dcmtk_node(tmp_path: Path) -> Iterator[tuple[NodeService, DcmtkStoreSCP]]:
    scp = DcmtkStoreSCP(tmp_path / "received")
    case = make_synthetic_case(5, SHAPE)
    settings = node_settings(tmp_path, free_port(), [scp.destination()])
    node = NodeService(settings)
    install_model(
        node.registry, make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing)
    )
    node.start()
    try:
        yield node, scp
    finally:
        node.stop()
        scp.stop()


def _finished(node: NodeService, study_uid: str) -> job_queue.JobInfo:
    def done() -> job_queue.JobInfo | None:
        return next(
            (
                j
                for j in job_queue.list_jobs(node.sf)
                if j.study_instance_uid == study_uid and j.status in ("done", "failed", "skipped")
            ),
            None,
        )

    job: job_queue.JobInfo = wait_until(done, 90, f"the job of study {study_uid}")
    return job


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's findings on ``path``; prints its warnings, fails on any error."""
    program = require_program("dciodvfy")
    report = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (report.stdout + report.stderr).splitlines()
    warnings = [line for line in lines if "Warning" in line]
    errors = [line for line in lines if "Error" in line]
    print(f"dciodvfy {path.name}: {len(errors)} errors, {len(warnings)} warnings")
    for line in warnings:
        print(f"  {line}")
    assert errors == [], f"dciodvfy {path.name}: {errors}"
    return warnings


def _world_points_lps(mask: np.ndarray, affine: np.ndarray) -> set[tuple[float, float, float]]:
    """Patient-space (LPS, mm, rounded to 0.1) centres of the voxels set in ``mask``.

    ``mask`` is indexed like ``affine``'s voxel axes.
    """
    idx = np.argwhere(mask > 0)
    pts = (affine[:3, :3] @ idx.T).T + affine[:3, 3]
    return {(round(float(p[0]), 1), round(float(p[1]), 1), round(float(p[2]), 1)) for p in pts}


def test_echoscu_verifies_the_node(dcmtk_node: tuple[NodeService, DcmtkStoreSCP]) -> None:
    node, _ = dcmtk_node
    echoscu = require_program("echoscu")
    ok = run_tool([echoscu, "-v", "-aet", "PACS", "-aec", "SEGNODE", "127.0.0.1", str(node.scp.port)], 30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Received Echo Response (Success)" in ok.stdout + ok.stderr
    wrong = run_tool([echoscu, "-aec", "NOTSEGNODE", "127.0.0.1", str(node.scp.port)], 30)
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr


def test_storescu_study_in_storescp_gets_seg_and_sr_validated_and_read_back(
    dcmtk_node: tuple[NodeService, DcmtkStoreSCP], tmp_path: Path
) -> None:
    node, scp = dcmtk_node
    study = write_study(make_synthetic_case(5, SHAPE), tmp_path / "study")
    files = [p for fs in study.files.values() for p in fs]
    assert len(files) == 4 * SHAPE[2]
    sent = storescu(node.scp.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    job = _finished(node, study.study_instance_uid)
    assert job.status == "done", job.reason
    assert job.instance_count == 4 * SHAPE[2]
    assert job.result["series"] == {"FLAIR": study.series_uids["FLAIR"]}
    wait_until(lambda: len(scp.files()) >= 2, 30, "storescp received SEG and SR")
    [seg_path], [sr_path] = scp.of_modality("SEG"), scp.of_modality("SR")
    wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "sends acknowledged")

    _dciodvfy(seg_path)
    _dciodvfy(sr_path)

    # highdicom reads both back; the SR's volume references the SEG.
    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == study.study_instance_uid
    volume = load_series(study.files["FLAIR"])
    node_mask = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_instance_uids,
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )[..., 0]
    assert node_mask.any()
    [group] = sr.content.get_volumetric_roi_measurement_groups()  # type: ignore[attr-defined]
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    assert group.get_measurements()[0].value == pytest.approx(node_mask.sum() * voxel_ml, rel=1e-3)
    # The node's own file and what storescp received are the same object.
    assert pydicom.dcmread(job.result["seg"]).SOPInstanceUID == seg.SOPInstanceUID

    # dcmqi reads the SEG as a viewer would: the same voxels in patient space.
    segimage2itkimage = require_program("segimage2itkimage", str(Path(sys.executable).parent))
    out = tmp_path / "dcmqi"
    out.mkdir()
    run = subprocess.run(
        [
            segimage2itkimage,
            "--inputDICOM",
            str(seg_path),
            "--outputDirectory",
            str(out),
            "--outputType",
            "nifti",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    import nibabel as nib

    image: Any = nib.load(out / "1.nii.gz")
    dcmqi_mask = np.asarray(image.dataobj)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    dcmqi_points = _world_points_lps(dcmqi_mask, ras_to_lps @ image.affine)
    # node_mask is (slice, row, column); the volume's affine maps (column, row, slice).
    node_points = _world_points_lps(np.transpose(node_mask, (2, 1, 0)), volume.affine)
    assert len(node_points) == int(node_mask.sum())
    assert dcmqi_points == node_points


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # the GE headers' own long SH values
def test_real_ge_series_by_storescu_is_skipped_without_flair_and_assembles_right(
    dcmtk_node: tuple[NodeService, DcmtkStoreSCP],
) -> None:
    node, scp = dcmtk_node
    folder = require_shared("dicom", "ge_t1_mprage_healthy")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    files = [p for p, ds in zip(files, headers, strict=True) if "ImagePositionPatient" in ds]
    assert len(files) == 130
    sent = storescu(node.scp.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    study_uid = str(headers[0].StudyInstanceUID)
    job = _finished(node, study_uid)
    assert job.status == "skipped"
    assert job.reason.startswith("no FLAIR series in the study (considered: series ")
    assert job.instance_count == 130
    assert scp.files() == []  # nothing sent for a skipped study

    # Received and assembled with the right geometry: the spooled copies load into the volume an
    # independent computation from the original headers gives.
    spooled = [Path(p) for p in job_queue.job_instance_paths(node.sf, job.id)]
    assert len(spooled) == 130
    volume = load_series(spooled)
    iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    assert abs(normal[2]) < 0.999  # oblique: not a pure axial stack
    positions = sorted(
        (np.asarray(ds.ImagePositionPatient, dtype=float) for ds in headers if "ImagePositionPatient" in ds),
        key=lambda p: float(p @ normal),
    )
    depth = [float(p @ normal) for p in positions]
    np.testing.assert_allclose(volume.origin, positions[0], atol=1e-3)
    np.testing.assert_allclose(volume.row_direction, row, atol=1e-5)
    np.testing.assert_allclose(volume.column_direction, col, atol=1e-5)
    np.testing.assert_allclose(volume.slice_direction, normal / np.linalg.norm(normal), atol=1e-5)
    pixel_spacing = [float(v) for v in headers[0].PixelSpacing]
    assert volume.spacing[0] == pytest.approx((depth[-1] - depth[0]) / 129, abs=1e-3)
    assert volume.spacing[0] == pytest.approx(1.2, abs=0.01)  # 1.2 mm slices, as the README says
    assert list(volume.spacing[1:]) == pytest.approx(pixel_spacing, abs=1e-4)
    assert volume.array.shape[0] == 130
    # Slice order follows the positions, not the (scrambled) file names or instance numbers.
    by_uid = {
        str(ds.SOPInstanceUID): float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal)
        for ds in headers
    }
    assert np.all(np.diff([by_uid[u] for u in volume.sop_instance_uids]) > 0)
    original = load_series(files)
    np.testing.assert_array_equal(volume.array, original.array)
