"""The SEG is built on series whose geometry scanners write in ways highdicom refuses as they are
(node/seg_geometry.py): orientation cosines rounded differently per slice (the real GE series),
orientation or pixel measures per frame (Philips Enhanced MR), SliceThickness missing. Each SEG's
labelled voxels land where the label map put them in the world."""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

from converters.case import Case
from converters.dicom_series import Volume, load_series
from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from node.config import Destination
from node.exceptions import JobError
from node.pipeline import Assembled, source_frame_labels
from node.seg import build_seg
from node.sender import store_files
from node.service import NodeService
from node.sr import build_sr
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.peers import dciodvfy_problems, require_shared
from tests.helpers.ports import free_port

CARD = {"name": "geometry-test", "version": "1", "labels": [{"value": 1, "name": "Whole tumour"}]}


def _series(name: str) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(require_shared("dicom", name).iterdir())]


def _legacy(datasets: list[Dataset]) -> Dataset:
    """The series as one Legacy Converted Enhanced MR image, written and read back."""
    image = LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(),
        instance_number=1,
    )  # fmt: skip
    buffer = io.BytesIO()
    image.save_as(buffer)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _enhanced(datasets: list[Dataset], per_frame: str) -> list[Dataset]:
    """The series as one Legacy Converted Enhanced MR image with ``per_frame`` moved from the shared
    functional groups into every frame's, as Philips writes orientation and pixel measures."""
    ds = _legacy(datasets)
    shared = ds.SharedFunctionalGroupsSequence[0]
    group = shared[per_frame].value
    del shared[per_frame]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        setattr(frame, per_frame, group)
    return [ds]


def _enhanced_spacing_rounded_per_frame(datasets: list[Dataset]) -> list[Dataset]:
    """Pixel measures per frame, every other frame's spacing written with other rounding (5e-5 mm)."""
    [ds] = _enhanced(datasets, "PixelMeasuresSequence")
    for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if n % 2:
            measures = copy.deepcopy(frame.PixelMeasuresSequence[0])
            measures.PixelSpacing = [f"{float(v) + 5e-5:.6f}" for v in measures.PixelSpacing]
            frame.PixelMeasuresSequence = [measures]
    return [ds]


def _rounded_per_slice(datasets: list[Dataset]) -> list[Dataset]:
    for n, ds in enumerate(datasets):
        if n % 2:
            ds.ImageOrientationPatient = [f"{float(v) + 5e-5:.8f}" for v in ds.ImageOrientationPatient]
    return datasets


def _without_thickness(datasets: list[Dataset], empty: bool) -> list[Dataset]:
    for ds in datasets:
        if empty:
            ds.SliceThickness = None
        else:
            del ds.SliceThickness
    return datasets


CASES: dict[str, Callable[[], list[Dataset]]] = {
    "GE, cosines rounded per slice": lambda: _series("ge_t1_mprage_healthy"),
    "Siemens, cosines 5e-5 apart": lambda: _rounded_per_slice(_series("siemens_t1_fl2d_sag_healthy")),
    "SliceThickness absent": lambda: _without_thickness(_series("siemens_t1_fl2d_sag_healthy"), False),
    "SliceThickness empty": lambda: _without_thickness(_series("siemens_t1_fl2d_sag_healthy"), True),
    "Enhanced MR, orientation per frame": lambda: _enhanced(
        _series("siemens_t1_fl2d_sag_healthy"), "PlaneOrientationSequence"
    ),
    "Enhanced MR, pixel measures per frame": lambda: _enhanced(
        _series("siemens_t1_fl2d_sag_healthy"), "PixelMeasuresSequence"
    ),
    "Enhanced MR, pixel spacing rounded per frame": lambda: _enhanced_spacing_rounded_per_frame(
        _series("siemens_t1_fl2d_sag_healthy")
    ),
}


def _world(volume: Volume, index: tuple[int, int, int]) -> npt.NDArray[np.float64]:
    k, r, c = index
    return np.asarray(
        volume.origin
        + k * volume.spacing[0] * volume.slice_direction
        + r * volume.spacing[1] * volume.column_direction
        + c * volume.spacing[2] * volume.row_direction
    )


def _seg_points(seg: Dataset) -> list[npt.NDArray[np.float64]]:
    """World position of every labelled pixel of a SEG."""
    pixels = seg.pixel_array
    pixels = pixels[None] if pixels.ndim == 2 else pixels
    shared = seg.SharedFunctionalGroupsSequence[0]
    cosines = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    points = []
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        origin = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        for r, c in np.argwhere(pixels[n]):
            points.append(origin + r * spacing[0] * cosines[3:] + c * spacing[1] * cosines[:3])
    return points


@pytest.mark.parametrize("name", list(CASES))
def test_the_seg_is_built_and_its_voxels_land_where_the_labels_are(name: str) -> None:
    datasets = CASES[name]()
    before = [list(ds.get("ImageOrientationPatient") or []) for ds in datasets]
    volume = load_series(datasets)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    marks = [(2, 40, 100), (volume.array.shape[0] - 3, 120, 30)]
    for mark in marks:
        labels[mark] = 1
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    sources = [by_uid[uid] for uid in dict.fromkeys(volume.sop_instance_uids)]
    assembled = Assembled(reference=volume, sources=sources, images={}, affine=np.eye(4))
    seg = build_seg(sources, source_frame_labels(labels, assembled), CARD, software_version="test")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    points = _seg_points(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    assert len(points) == len(marks)
    for mark in marks:
        assert min(float(np.linalg.norm(_world(volume, mark) - p)) for p in points) < 1e-3, mark
    assert [list(ds.get("ImageOrientationPatient") or []) for ds in datasets] == before  # not modified


@pytest.mark.parametrize("where", ["shared", "per-frame"])
def test_a_multi_frame_source_without_slice_thickness_gets_the_frame_spacing_in_the_seg(
    where: str, tmp_path: Path
) -> None:
    """Pixel Measures without SliceThickness (a converter or anonymiser dropped it) in a multi-frame
    source: the SEG's shared Pixel Measures, which highdicom copies from it, carry the frame spacing
    (SliceThickness is Type 1C there; dciodvfy rejected the SEG), as for single-frame sources."""
    datasets = _series("siemens_t1_fl2d_sag_healthy")
    if where == "shared":
        ds = _legacy(datasets)
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    else:
        [ds] = _enhanced(datasets, "PixelMeasuresSequence")
        measures = ds.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence[0]  # one item, every frame
    del measures.SliceThickness
    volume = load_series([ds])
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[15:18, 100:120, 100:130] = 1
    assembled = Assembled(reference=volume, sources=[ds], images={}, affine=np.eye(4))
    seg = build_seg([ds], source_frame_labels(labels, assembled), CARD, software_version="test")
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_problems(path) == []
    written = pydicom.dcmread(path).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(written.SliceThickness) == pytest.approx(volume.spacing[0], rel=1e-5)
    assert "SliceThickness" not in measures  # the source is not modified


def test_orientations_further_apart_than_the_loaders_tolerance_are_a_job_error() -> None:
    datasets = _series("siemens_t1_fl2d_sag_healthy")
    labels = np.ones((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=np.uint8)
    datasets[1].ImageOrientationPatient = [float(v) + 1e-3 for v in datasets[1].ImageOrientationPatient]
    with pytest.raises(JobError, match=r"ImageOrientationPatient differ by up to 0\.001"):
        build_seg(datasets, labels, CARD, software_version="test")


SHAPE = (48, 48, 12)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[NodeService, CatchingSCP, Case]]:
    case = make_synthetic_case(5, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    catcher = CatchingSCP().start(free_port())
    node = NodeService(
        node_settings(tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)])
    )
    install_model(node.registry, model)
    node.start()
    try:
        yield node, catcher, case
    finally:
        node.stop()
        catcher.stop()


def test_a_study_with_cosines_rounded_per_slice_gets_its_seg_over_the_network(
    served: tuple[NodeService, CatchingSCP, Case], tmp_path: Path
) -> None:
    """As GE writes them: every other slice's orientation cosines 6e-8 off (the node received such a
    study, segmented it, and failed at the SEG before node/seg_geometry.py)."""
    node, catcher, case = served
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    files = study.files["FLAIR"]
    for n, path in enumerate(files):
        if n % 2:
            ds = pydicom.dcmread(path)
            ds.ImageOrientationPatient = [f"{float(v) + 6e-8:.10f}" for v in ds.ImageOrientationPatient]
            ds.save_as(path)
    results = store_files(files, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}
    received = catcher.wait_for(lambda r: {ds.Modality for ds in r} >= {"SEG", "SR"}, 60)
    seg = next(ds for ds in received if ds.Modality == "SEG")
    referenced = {
        item.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for item in derivation.SourceImageSequence
    }
    assert referenced and referenced <= {pydicom.dcmread(p).SOPInstanceUID for p in files}


def _multi_frame(positions: list[list[float]]) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(positions)
    frames = []
    for position in positions:
        plane, frame = Dataset(), Dataset()
        plane.ImagePositionPatient = position
        frame.PlanePositionSequence = [plane]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    return ds


def test_enhanced_frames_written_rounded_find_their_slices() -> None:
    """An oblique 0.5 mm Enhanced MR with positions rounded to 0.1 mm (which the loader accepts) has
    frames up to a quarter slice off: each still finds its slice, in the order the frames come; two
    frames on one slice are refused."""
    normal = np.array([0.0, 0.5, np.sqrt(3) / 2])
    origin = np.array([-90.03, -110.02, -40.04])
    volume = SimpleNamespace(origin=origin, slice_direction=normal, spacing=(0.5, 0.5, 0.5))
    order = [3, 0, 2, 1]  # the frames' slices, as the file lists them
    # Rounding moved each frame by up to 0.12 mm along the normal: a quarter of a slice.
    moved = (0.1, -0.1, 0.05, -0.12)
    positions = [(origin + (k * 0.5 + off) * normal).tolist() for k, off in zip(order, moved, strict=True)]
    labels = np.arange(4, dtype=np.uint8).reshape(4, 1, 1)  # slice k holds k
    def assembled(frames: list[list[float]]) -> Assembled:
        return Assembled(
            reference=volume, sources=[_multi_frame(frames)], images={}, affine=np.eye(4)  # type: ignore[arg-type]
        )

    assert source_frame_labels(labels, assembled(positions)).ravel().tolist() == order
    with pytest.raises(JobError, match="share a slice"):
        source_frame_labels(labels, assembled([positions[0], positions[0]]))


@pytest.mark.parametrize(
    "bad",
    [
        {"SliceThickness": b"QZXST "},
        {"SpacingBetweenSlices": b"QZXSB "},
        {"SliceThickness": b"1.5\\QZXST", "SpacingBetweenSlices": b"QZXSB "},
        {"SpacingBetweenSlices": b"-3"},
        {"SliceThickness": b"0 "},
    ],
    ids=["SliceThickness", "SpacingBetweenSlices", "both", "negative spacing", "zero thickness"],
)
def test_a_slice_thickness_or_spacing_that_is_no_positive_number_is_omitted_and_the_seg_built(
    bad: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed DS (real headers carry them) failed the SEG with ``ValueError: could not convert
    string to float``; a negative SpacingBetweenSlices (the signed step older scanners write) or a
    zero thickness was copied into the SEG, invalid there (dciodvfy: "Not permitted to be negative").
    Now each is omitted, the thickness measured from the positions, the keyword logged without the
    value, and the SEG's voxels land where the labels are."""
    case = make_synthetic_case(5, shape=(64, 64, 12))
    files = write_study(case, tmp_path, modalities=["FLAIR"]).files["FLAIR"]
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in files]
    valid_thickness = float(datasets[0].SliceThickness)
    for ds in datasets:
        for keyword, raw in bad.items():
            tag = tag_for_keyword(keyword)
            assert tag is not None
            ds[tag] = RawDataElement(BaseTag(tag), dictionary_VR(tag), len(raw), raw, 0, False, True)
    volume = load_series(datasets)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    mark = (3, 30, 34)
    labels[mark] = 1
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    sources = [by_uid[uid] for uid in dict.fromkeys(volume.sop_instance_uids)]
    assembled = Assembled(reference=volume, sources=sources, images={}, affine=np.eye(4))
    caplog.set_level(logging.INFO)
    seg = build_seg(sources, source_frame_labels(labels, assembled), CARD, software_version="test")
    build_sr(seg, sources, [0.001], CARD)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert [line for line in dciodvfy_problems(path) if "Error" in line] == []
    read = pydicom.dcmread(path)
    measures = read.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    expected = volume.spacing[0] if "SliceThickness" in bad else valid_thickness
    assert float(measures.SliceThickness) == pytest.approx(expected, rel=1e-5)
    if "SpacingBetweenSlices" in measures:  # highdicom's own, from the positions
        assert float(measures.SpacingBetweenSlices) == pytest.approx(volume.spacing[0], rel=1e-5)
    [point] = _seg_points(read)
    assert float(np.linalg.norm(_world(volume, mark) - point)) < 1e-3
    logged = [r.getMessage() for r in caplog.records if r.name == "node.seg_geometry"]
    for keyword in bad:
        assert any(f" {keyword} not a positive number" in m for m in logged), logged
    assert not any("QZX" in m or "-3" in m for m in logged), logged
    assert all(keyword in ds for ds in sources for keyword in bad)  # the sources are not modified


@pytest.mark.parametrize(
    ("where", "bad"),
    [
        ("shared", {"SliceThickness": b"1,5 "}),
        ("per-frame", {"SliceThickness": b"QZXST "}),
        ("shared", {"SpacingBetweenSlices": b"0.5\\QZXSB"}),
        ("per-frame", {"SpacingBetweenSlices": b""}),
    ],
    ids=["shared thickness 1,5", "per-frame thickness", "shared spacing 2 values", "per-frame empty spacing"],
)
def test_a_multi_frame_pixel_measures_thickness_or_spacing_that_is_no_number_is_omitted(
    where: str, bad: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same malformed DS in an Enhanced MR's Pixel Measures, shared or per frame: highdicom copied a
    malformed SliceThickness or SpacingBetweenSlices into the SEG (dciodvfy rejects it) and failed on
    a two-valued or empty SpacingBetweenSlices (``sqlite3.ProgrammingError``, ``KeyError:
    (0028,9110)``). Now each is omitted, the thickness measured from the frame positions, the keyword
    logged without the value, and the SEG's voxels land where the labels are."""
    case = make_synthetic_case(5, shape=(64, 64, 12))
    datasets = [pydicom.dcmread(p) for p in write_study(case, tmp_path, modalities=["FLAIR"]).files["FLAIR"]]
    for single in datasets:
        single.SliceThickness = "2.5"  # a valid thickness other than the frame spacing
    [ds] = _enhanced(datasets, "PixelMeasuresSequence") if where == "per-frame" else [_legacy(datasets)]
    group = "PerFrameFunctionalGroupsSequence" if where == "per-frame" else "SharedFunctionalGroupsSequence"
    measures = ds[group].value[0].PixelMeasuresSequence[0]  # one item, shared by every frame when per frame
    for keyword, raw in bad.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None
        measures[tag] = RawDataElement(BaseTag(tag), dictionary_VR(tag), len(raw), raw, 0, False, True)
    volume = load_series([ds])
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    mark = (3, 30, 34)
    labels[mark] = 1
    assembled = Assembled(reference=volume, sources=[ds], images={}, affine=np.eye(4))
    caplog.set_level(logging.INFO)
    seg = build_seg([ds], source_frame_labels(labels, assembled), CARD, software_version="test")
    build_sr(seg, [ds], [0.001], CARD)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert [line for line in dciodvfy_problems(path) if "Error" in line] == []
    read = pydicom.dcmread(path)
    written = read.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    expected = volume.spacing[0] if "SliceThickness" in bad else 2.5
    assert float(written.SliceThickness) == pytest.approx(expected, rel=1e-5)
    if "SpacingBetweenSlices" in written:
        assert float(written.SpacingBetweenSlices) == pytest.approx(volume.spacing[0], rel=1e-5)
    [point] = _seg_points(read)
    assert float(np.linalg.norm(_world(volume, mark) - point)) < 1e-3
    logged = [r.getMessage() for r in caplog.records if r.name == "node.seg_geometry"]
    for keyword in bad:
        assert any(f" {keyword} not a positive number in" in m for m in logged), logged
    assert not any("QZX" in m or "1,5" in m for m in logged), logged
    assert all(keyword in measures for keyword in bad)  # the source is not modified
