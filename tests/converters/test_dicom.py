"""DICOM: Case -> MR study -> Volume round trips, the vendor series, refusals, Enhanced MR."""

from __future__ import annotations

import copy
import io
import os
import random
import re
import subprocess
import warnings
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from converters.dicom_series import _native_pixels, load_series, load_series_folder
from converters.dicom_writer import PROTOCOLS, QUANTISED_MAX, SyntheticPatient, write_study, write_volumes
from converters.exceptions import InvalidSeriesError
from converters.nifti import load_case
from converters.reorient import volume_to_ras
from converters.synthetic import make_synthetic_case
from converters.volume import Volume
from tests.helpers.peers import SHARED_DATA, require_program, require_shared

GE_SERIES = ("dicom", "ge_t1_mprage_healthy")

# Every value we write or read must be valid for its VR (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("strict_pydicom")



def _dciodvfy(files: list[Path]) -> list[str]:
    """Run dciodvfy on every file of ``files``; return its error lines.

    Its warnings are not failures, but pytest hides what a passing test prints, so the distinct warning
    lines (with how many files gave each) go to pytest's warnings summary as one ``warnings.warn``, as
    the viewer test does with its notes. One run takes ~10 ms, so a whole 4 x 155-file study costs ~5 s
    on one core, less on a pool of them.
    """
    program = require_program("dciodvfy")

    def check(path: Path) -> list[str]:
        result = subprocess.run([program, str(path)], capture_output=True, text=True, check=False, timeout=60)
        return [ln.strip() for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        reports = list(pool.map(check, files))
    errors: list[str] = []
    found: Counter[str] = Counter()
    for path, lines in zip(files, reports, strict=True):
        errors += [f"{path}: {ln}" for ln in lines if "Error" in ln]
        found.update({ln for ln in lines if "Warning" in ln})
    if found:
        summary = "\n".join(f"  [{n}/{len(files)} files] {line}" for line, n in sorted(found.items()))
        warnings.warn(
            f"NOTE: dciodvfy gave {len(found)} distinct warning(s) on {len(files)} files:\n{summary}",
            stacklevel=2,
        )
    return errors


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 10-slice synthetic FLAIR series on disk."""
    out = tmp_path_factory.mktemp("small")
    info = write_study(make_synthetic_case(4, (16, 14, 10)), out, modalities=["FLAIR"])
    return info.files["FLAIR"]


def _datasets(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(str(p)) for p in files]


def test_real_case_round_trip_is_exact_and_valid(tmp_path: Path) -> None:
    case = load_case(require_shared("train", "brats", "BraTS2021_00005"))
    info = write_study(case, tmp_path, seed=7)
    assert set(info.series) == {"FLAIR", "T1", "T1GD", "T2"}
    for modality, image in case.images.items():
        files = info.files[modality]
        assert len(files) == case.shape[2]
        shuffled = files[:]
        random.Random(1).shuffle(shuffled)  # the reader must not rely on file order
        volume = load_series(shuffled)
        array, affine = volume_to_ras(volume)
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, image)
        np.testing.assert_allclose(affine, case.affine, atol=1e-4, rtol=0)
        assert volume.series_instance_uid == info.series_uids[modality]
        assert volume.study_instance_uid == info.study_instance_uid
        assert volume.frame_of_reference_uid == info.frame_of_reference_uid
    assert _dciodvfy([f for fs in info.files.values() for f in fs]) == []


def test_written_attributes_are_realistic_and_synthetic(tmp_path: Path) -> None:
    case = make_synthetic_case(2, (12, 12, 8))
    patient = SyntheticPatient.from_seed(11)
    info = write_study(case, tmp_path, patient=patient)
    heads = {m: pydicom.dcmread(str(files[0])) for m, files in info.files.items()}
    assert {m: ds.SeriesDescription for m, ds in heads.items()} == {
        "FLAIR": "AX FLAIR",
        "T1": "AX T1",
        "T1GD": "AX T1 POST GD",
        "T2": "AX T2",
    }
    flair, t1, t1gd = heads["FLAIR"], heads["T1"], heads["T1GD"]
    assert float(flair.InversionTime) == 2500 and float(flair.RepetitionTime) == 9000
    assert "InversionTime" not in t1
    assert t1gd.ContrastBolusAgent and "ContrastBolusAgent" not in t1
    assert {ds.FrameOfReferenceUID for ds in heads.values()} == {info.frame_of_reference_uid}
    assert {ds.StudyInstanceUID for ds in heads.values()} == {info.study_instance_uid}
    assert len({ds.SeriesInstanceUID for ds in heads.values()}) == 4
    for ds in heads.values():
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.PatientName == patient.name and str(ds.PatientName).startswith("SYNTHETIC^")
        assert ds.MRAcquisitionType == "2D" and float(ds.MagneticFieldStrength) == 1.5
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == pytest.approx(case.spacing[2])
    _assert_sequences_are_physically_sensible(heads)
    sops = {pydicom.dcmread(str(f)).SOPInstanceUID for fs in info.files.values() for f in fs}
    assert len(sops) == info.n_files == 4 * 8
    # Fresh UIDs every time.
    again = write_study(case, tmp_path / "again", patient=patient)
    assert again.study_instance_uid != info.study_instance_uid


#: T1 of CSF at 1.5 T (ms); literature values are ~3500-4500 ms.
CSF_T1_MS_1_5T = 4000.0


def _cs(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """The values of a code string attribute (pydicom gives one value as a plain str)."""
    value = ds[keyword].value
    return (value,) if isinstance(value, str) else tuple(value)


def _assert_sequences_are_physically_sensible(heads: Mapping[str, Dataset]) -> None:
    """ScanningSequence, SequenceVariant, TR, TE (and TI) of each series fit its contrast at 1.5 T."""
    for modality, ds in heads.items():
        protocol = PROTOCOLS[modality]  # each series carries its own protocol, not another's
        assert _cs(ds, "ScanningSequence") == protocol.scanning_sequence, modality
        assert _cs(ds, "SequenceVariant") == protocol.sequence_variant, modality
        tr, te = float(ds.RepetitionTime), float(ds.EchoTime)
        assert (tr, te) == (protocol.repetition_time, protocol.echo_time), modality
        assert 0 < te < tr, modality
        variant = set(_cs(ds, "SequenceVariant"))
        # A fast/turbo spin echo (echo train > 1) reads segmented k-space; a plain spin echo does not.
        if int(ds.EchoTrainLength) > 1:
            assert "SK" in variant, modality
        else:
            assert variant == {"NONE"}, modality
    flair, t1, t1gd, t2 = (heads[m] for m in ("FLAIR", "T1", "T1GD", "T2"))
    # FLAIR: an inversion-recovery spin echo, magnetisation prepared, long TR and T2-weighted TE, and
    # an inversion time that nulls CSF: Mz(TI) = 1 - 2 exp(-TI/T1) + exp(-TR/T1) close to 0.
    assert set(_cs(flair, "ScanningSequence")) == {"SE", "IR"} and "MP" in _cs(flair, "SequenceVariant")
    tr, te, ti = (float(flair.RepetitionTime), float(flair.EchoTime), float(flair.InversionTime))
    assert tr >= 6000 and te >= 80 and 0 < ti < tr
    csf = 1 - 2 * np.exp(-ti / CSF_T1_MS_1_5T) + np.exp(-tr / CSF_T1_MS_1_5T)
    assert abs(csf) < 0.1, f"FLAIR TI {ti} ms leaves CSF at Mz = {csf:.2f} M0"
    # T1 and T1 post-Gd: the same short-TR short-TE spin echo before and after contrast.
    for ds in (t1, t1gd):
        assert _cs(ds, "ScanningSequence") == ("SE",)
        assert float(ds.RepetitionTime) <= 800 and float(ds.EchoTime) <= 20
    assert (t1.RepetitionTime, t1.EchoTime) == (t1gd.RepetitionTime, t1gd.EchoTime)
    # T2: long TR (little T1 weighting) and long TE, no inversion.
    assert _cs(t2, "ScanningSequence") == ("SE",) and "InversionTime" not in t2
    assert float(t2.RepetitionTime) >= 2000 and float(t2.EchoTime) >= 80


def test_zscored_case_is_quantised_within_half_a_step(tmp_path: Path) -> None:
    case = load_case(require_shared("train", "brats2013_flair_t1c", "brats_2013_pat0002_1"))
    info = write_study(case, tmp_path, modalities=["FLAIR"])
    head = pydicom.dcmread(str(info.files["FLAIR"][0]))
    slope = float(head.RescaleSlope)
    image = case.images["FLAIR"]
    assert slope == pytest.approx(float(np.abs(image).max()) / QUANTISED_MAX, rel=1e-6)
    array, affine = volume_to_ras(load_series(info.files["FLAIR"]))
    np.testing.assert_array_equal(array == 0, image == 0)  # the background stays exactly 0
    assert float(np.abs(array - image).max()) <= slope / 2 * (1 + 1e-4)
    np.testing.assert_allclose(affine, case.affine, atol=1e-4, rtol=0)
    assert _dciodvfy(info.files["FLAIR"]) == []


def _dcmdump_geometry(files: list[Path]) -> dict[str, dict[str, list[float]]]:
    """SOPInstanceUID -> {IPP, IOP, PixelSpacing} as dcmdump prints them."""
    program = require_program("dcmdump")
    args = [program, "+L"]
    for keyword in ("SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        args += ["+P", keyword]
    out = subprocess.run(
        [*args, *map(str, files)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    result: dict[str, dict[str, list[float]]] = {}
    current: dict[str, list[float]] = {}
    for line in out.splitlines():
        match = re.match(r"\((\w{4}),(\w{4})\) \w\w \[([^\]]*)\]", line)
        if not match:
            continue
        tag, value = f"{match[1]},{match[2]}".lower(), match[3]
        if tag == "0008,0018":
            current = result.setdefault(value, {})
        else:
            current[tag] = [float(v) for v in value.split("\\")]
    return result


def test_vendor_series_geometry_matches_dcmdump() -> None:
    folder = require_shared(*GE_SERIES)
    files = sorted(folder.iterdir())
    volume = load_series_folder(folder)
    assert volume.array.shape == (130, 256, 256)
    dumped = _dcmdump_geometry(files)
    assert len(dumped) == 130
    first, last = dumped[volume.sop_instance_uids[0]], dumped[volume.sop_instance_uids[-1]]
    np.testing.assert_allclose(volume.origin, first["0020,0032"], atol=1e-4)
    end = volume.origin + (volume.array.shape[0] - 1) * volume.spacing[0] * volume.slice_direction
    np.testing.assert_allclose(end, last["0020,0032"], atol=1e-3)
    for dump in (first, last):
        np.testing.assert_allclose(volume.row_direction, dump["0020,0037"][:3], atol=1e-6)
        np.testing.assert_allclose(volume.column_direction, dump["0020,0037"][3:], atol=1e-6)
        np.testing.assert_allclose(volume.spacing[1:], dump["0028,0030"], atol=1e-9)
    assert volume.spacing[0] == pytest.approx(1.2, abs=1e-4)  # SpacingBetweenSlices in the headers
    # The series is oblique and its file names are not in slice order: sorting really happened.
    assert abs(volume.column_direction[2]) > 0.1
    order = [dumped_uid for dumped_uid in dumped]
    assert order != volume.sop_instance_uids
    # Every consecutive pair of sorted slices is one spacing apart along the normal.
    depth = [np.dot(dumped[u]["0020,0032"], volume.slice_direction) for u in volume.sop_instance_uids]
    np.testing.assert_allclose(np.diff(depth), volume.spacing[0], atol=1e-3)


def test_rectangular_pixels_sit_where_simpleitk_puts_them(tmp_path: Path) -> None:
    """Rows != Columns and PixelSpacing [0.5, 0.8] (row spacing, column spacing; PS3.3 C.7.6.2.1.1) on an
    oblique stack: every voxel's position and value are those of SimpleITK's (GDCM's) reader, an
    implementation of its own. Square pixels cannot tell the two spacings apart."""
    import SimpleITK as sitk  # noqa: N813 (SimpleITK's own spelling)

    array = np.random.default_rng(3).integers(0, 1000, size=(7, 20, 30)).astype(np.float32)
    angle = np.deg2rad(20.0)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(angle), np.sin(angle)])
    written = Volume(
        array=array, origin=np.array([-50.0, -60.0, 10.0]), row_direction=row, column_direction=col,
        slice_direction=np.cross(row, col), spacing=(3.0, 0.5, 0.8),
    )  # fmt: skip
    files = write_volumes({"FLAIR": written}, tmp_path).files["FLAIR"]
    assert [float(v) for v in pydicom.dcmread(files[0]).PixelSpacing] == [0.5, 0.8]
    volume = load_series(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(files[0].parent)))
    image = reader.Execute()
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))  # (slice, row, column)
    k, i, j = (a.ravel() for a in np.indices(volume.array.shape))
    ours = (volume.affine @ np.stack([j, i, k, np.ones_like(k)]).astype(float))[:3].T
    indices = zip(j.tolist(), i.tolist(), k.tolist(), strict=True)
    theirs = [image.TransformIndexToPhysicalPoint(index) for index in indices]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # both LPS


def _rounded(files: list[Path], position_places: int, cosine_places: int) -> list[Dataset]:
    """The series as a system writing rounded geometry would send it."""
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [round(float(v), position_places) for v in ds.ImagePositionPatient]
        ds.ImageOrientationPatient = [round(float(v), cosine_places) for v in ds.ImageOrientationPatient]
        out.append(ds)
    return out


def _corners(volume: Any) -> npt.NDArray[np.float64]:
    """The world positions of the volume's eight corner voxels."""
    k, j, i = (n - 1 for n in volume.array.shape)
    index = np.array([[a, b, c, 1.0] for a in (0, i) for b in (0, j) for c in (0, k)]).T
    return np.asarray(volume.affine @ index)[:3]


VENDOR_SERIES = sorted(p for p in (SHARED_DATA / "dicom").glob("*") if p.is_dir())


@pytest.mark.parametrize("series", VENDOR_SERIES, ids=[p.name for p in VENDOR_SERIES])
@pytest.mark.parametrize(("position_places", "cosine_places"), [(2, 6), (1, 3)])
def test_geometry_written_rounded_loads_where_it_is(
    series: Path, position_places: int, cosine_places: int
) -> None:
    """Some systems write ImagePositionPatient to 0.1 or 0.01 mm and the cosines to a few places: an
    oblique stack's gaps are then uneven and its positions off the line by up to ~0.1 mm (refused as
    missing slices or a sheared stack before). Each vendor series so written loads, its voxels within
    0.15 mm of where the series as written by the scanner puts them."""
    files = sorted(series.iterdir())
    exact = load_series(files)
    volume = load_series(_rounded(files, position_places, cosine_places))
    assert volume.sop_instance_uids == exact.sop_instance_uids
    np.testing.assert_array_equal(volume.array, exact.array)
    assert np.abs(_corners(volume) - _corners(exact)).max() < 0.15
    np.testing.assert_allclose(volume.affine[:3, :3].T @ volume.affine[:3, :3], np.diag(
        [s * s for s in volume.spacing[::-1]]), atol=1e-9)  # fmt: skip


def test_a_missing_slice_is_refused_when_geometry_is_rounded() -> None:
    # The GE series is oblique (1.2 mm): written to 0.1 mm, a slice left out is still a gap.
    files = sorted(require_shared(*GE_SERIES).iterdir())
    ordered = load_series(files).sop_instance_uids
    kept = [ds for ds in _rounded(files, 1, 4) if ds.SOPInstanceUID != ordered[60]]
    with pytest.raises(InvalidSeriesError, match=r"missing slices \(uneven gaps\): gap of 2\.[34]"):
        load_series(kept)


def test_cosines_written_to_four_places_flickering_in_the_last_one_load() -> None:
    """0.7071 and 0.7072 are one unit of the fourth place apart, which a float difference makes a hair
    over 1e-4: a series whose rounding flickers there loaded or not depending on the value."""
    files = sorted(require_shared(*GE_SERIES).iterdir())
    exact = load_series(files)
    flickering = _rounded(files, 3, 6)
    for n, ds in enumerate(flickering):
        row = (0.7071, 0.7071 if n % 2 else 0.7072, 0.0)  # a coronal-oblique row, rounded two ways
        ds.ImageOrientationPatient = [*row, 0.0, 0.0, -1.0]
    assert 0.7072 - 0.7071 > 1e-4  # in binary floating point
    normal = np.cross([0.7071, 0.7071, 0.0], [0.0, 0.0, -1.0])
    normal /= np.linalg.norm(normal)
    for n, ds in enumerate(flickering):
        ds.ImagePositionPatient = [round(float(v), 3) for v in n * exact.spacing[0] * normal]
    assert load_series(flickering).array.shape == exact.array.shape


# --- pixel data read from its bytes --------------------------------------------------------------


def _grey_image(syntax: str, bits: int, stored: int, signed: int, pixels: npt.NDArray[Any]) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation, ds.SamplesPerPixel = signed, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.astype(f"<u{bits // 8}").tobytes()
    return ds


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("bits", "stored"), [(8, 8), (8, 6), (16, 16), (16, 12), (16, 10), (32, 32), (32, 24)]
)
@pytest.mark.parametrize("signed", [0, 1])
def test_native_pixels_are_what_pydicom_decodes(syntax: str, bits: int, stored: int, signed: int) -> None:
    # Every bit pattern's kind: the unused high bits set at random (pydicom masks them off, or
    # extends the stored bits' sign over them), and the extremes of the stored range.
    rng = np.random.default_rng(bits * 100 + stored + signed)
    raw = rng.integers(0, 2**bits, size=(7, 5), dtype=np.uint64)
    raw[0, :3] = [0, 2 ** (stored - 1) - 1, 2 ** (stored - 1)]
    raw[1, :2] = [2**stored - 1, 2**bits - 1]
    ds = _grey_image(syntax, bits, stored, signed, raw)
    fast = _native_pixels(ds)
    assert fast is not None
    expected = pydicom.pixels.pixel_array(ds)
    assert fast.dtype == expected.dtype
    np.testing.assert_array_equal(fast, expected)


def test_native_pixels_of_a_deflated_file_are_what_pydicom_decodes() -> None:
    # A deflated data set is inflated when pydicom reads it: its Pixel Data are native bytes again.
    rng = np.random.default_rng(5)
    ds = _grey_image(DeflatedExplicitVRLittleEndian, 16, 12, 0, rng.integers(0, 2**16, size=(5, 7)))
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert read.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    fast = _native_pixels(read)
    assert fast is not None
    np.testing.assert_array_equal(fast, read.pixel_array)


def test_native_pixels_leave_other_images_to_pydicom() -> None:
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert _native_pixels(_grey_image(ExplicitVRBigEndian, 16, 16, 0, pixels)) is None
    assert _native_pixels(_grey_image(JPEG2000Lossless, 16, 16, 0, pixels)) is None
    no_meta = _grey_image(ExplicitVRLittleEndian, 16, 16, 0, pixels)
    del no_meta.file_meta  # a data set from the network before its file meta is attached
    assert _native_pixels(no_meta) is None
    shifted = _grey_image(ExplicitVRLittleEndian, 16, 12, 0, pixels)
    shifted.HighBit = 15  # stored bits not at the bottom
    assert _native_pixels(shifted) is None
    frames = _grey_image(ExplicitVRLittleEndian, 16, 16, 0, pixels)
    frames.NumberOfFrames = 2
    assert _native_pixels(frames) is None
    short = _grey_image(ExplicitVRLittleEndian, 16, 16, 0, pixels)
    short.PixelData = short.PixelData[:-2]
    assert _native_pixels(short) is None


def test_real_series_load_the_same_as_through_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = require_shared(*GE_SERIES).parent
    import converters.dicom_series as dicom_series

    for series in sorted(p for p in folder.iterdir() if p.is_dir()):
        fast = load_series_folder(series)
        assert _native_pixels(pydicom.dcmread(next(series.iterdir()))) is not None, series.name
        with monkeypatch.context() as patch:
            patch.setattr(dicom_series, "_native_pixels", lambda ds: None)
            decoded = load_series_folder(series)
        np.testing.assert_array_equal(fast.array, decoded.array, err_msg=series.name)


# --- refusals ---------------------------------------------------------------------------------


def _uid(datasets: list[Dataset]) -> str:
    return re.escape(str(datasets[0].SeriesInstanceUID))


def test_refuses_mixed_orientations(small_series: list[Path]) -> None:
    ds = _datasets(small_series)
    ds[4].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    with pytest.raises(
        InvalidSeriesError, match=rf"series {_uid(ds)}: mixed orientations: ImageOrientationPatient"
    ):
        load_series(ds)


def test_refuses_mixed_sizes(small_series: list[Path]) -> None:
    ds = _datasets(small_series)
    ds[2].Rows = 12
    ds[2].PixelData = ds[2].PixelData[: 12 * 16 * 2]
    with pytest.raises(InvalidSeriesError, match=rf"series {_uid(ds)}: mixed sizes: Rows x Columns 12x16"):
        load_series(ds)


def test_refuses_duplicate_positions(small_series: list[Path]) -> None:
    ds = _datasets(small_series)
    ds[6].ImagePositionPatient = copy.deepcopy(ds[5].ImagePositionPatient)
    with pytest.raises(InvalidSeriesError, match=rf"series {_uid(ds)}: duplicate positions: .* both at"):
        load_series(ds)


def test_refuses_missing_slice(small_series: list[Path]) -> None:
    files = small_series[:4] + small_series[5:]
    uid = re.escape(str(pydicom.dcmread(str(files[0])).SeriesInstanceUID))
    with pytest.raises(InvalidSeriesError, match=rf"series {uid}: missing slices \(uneven gaps\): gap of"):
        load_series(files)


def test_refuses_positions_drifting_off_a_regular_stack(small_series: list[Path]) -> None:
    """Two packages, five gaps of 4.4 mm then four of 4.0 mm: each gap is within 10 % of the mean
    (4.22 mm), so no slice counts as missing, but a regular 4.22 mm stack puts slice 5 0.89 mm from
    its ImagePositionPatient. It was loaded so, the slices of the second package shifted."""
    ds = _datasets(small_series)
    depth = np.concatenate([[0.0], np.cumsum([4.4] * 5 + [4.0] * 4)])
    normal = load_series(ds).slice_direction
    start = np.asarray(ds[0].ImagePositionPatient, dtype=np.float64)
    for d, z in zip(ds, depth, strict=True):
        d.ImagePositionPatient = [format_number_as_ds(float(v)) for v in start + z * normal]
    with pytest.raises(
        InvalidSeriesError,
        match=rf"series {_uid(ds)}: positions drift off a regular stack \(uneven gaps\): .* is 0\.889 mm",
    ):
        load_series(ds)
    # The same stack regular within rounding to 0.01 mm loads.
    for k, d in enumerate(ds):
        d.ImagePositionPatient = [round(float(v), 2) for v in start + k * 4.22 * normal]
    assert load_series(ds).spacing[0] == pytest.approx(4.22, abs=0.01)


def test_refuses_missing_pixel_data(small_series: list[Path]) -> None:
    ds = _datasets(small_series)
    del ds[3].PixelData
    sop = re.escape(str(ds[3].SOPInstanceUID))
    with pytest.raises(InvalidSeriesError, match=rf"series {_uid(ds)} instance {sop}: missing pixel data"):
        load_series(ds)


def test_refuses_short_pixel_data(small_series: list[Path]) -> None:
    ds = _datasets(small_series)
    ds[7].PixelData = ds[7].PixelData[:-20]
    with pytest.raises(
        InvalidSeriesError,
        match=rf"series {_uid(ds)} instance .*: pixel data is 428 bytes but Rows 14 x Columns 16 .*needs 448",
    ):
        load_series(ds)


def test_refuses_more_than_one_series(small_series: list[Path]) -> None:
    ds = _datasets(small_series)
    ds[0].SeriesInstanceUID = generate_uid()
    with pytest.raises(InvalidSeriesError, match=r"more than one series: SeriesInstanceUIDs \['1\.2"):
        load_series(ds)


def test_refuses_positions_off_the_normal_and_bad_files(small_series: list[Path], tmp_path: Path) -> None:
    ds = _datasets(small_series)
    ipp = [float(v) for v in ds[5].ImagePositionPatient]
    ds[5].ImagePositionPatient = [ipp[0] + 2.0, ipp[1], ipp[2]]
    with pytest.raises(InvalidSeriesError, match=r"mm off the line along the slice normal"):
        load_series(ds)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(InvalidSeriesError, match=r"junk\.dcm: not a readable DICOM file"):
        load_series([junk])
    with pytest.raises(InvalidSeriesError, match="empty series"):
        load_series([])


# --- spacing and rescale ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("thickness", "between", "gap"),
    [
        ("5.0", "5.0", 1.2),  # overlapping slices: SliceThickness and SpacingBetweenSlices both wrong
        ("1.0", None, 3.3),  # slices with gaps between them, no SpacingBetweenSlices
    ],
)
def test_slice_spacing_comes_from_positions(
    small_series: list[Path], thickness: str, between: str | None, gap: float
) -> None:
    ds = _datasets(small_series)
    stored = [d.pixel_array.copy() for d in ds]
    # An oblique stack (tilted 20 degrees about the row axis), so the gap is measured along its normal.
    angle = np.deg2rad(20.0)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(angle), np.sin(angle)])
    normal = np.cross(row, col)
    start = np.array([-90.0, -80.0, -40.0])
    rank = list(range(len(ds)))
    random.Random(5).shuffle(rank)  # dataset n goes to the rank[n]-th place along the normal
    for d, k in zip(ds, rank, strict=True):
        d.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in (*row, *col)]
        d.ImagePositionPatient = [format_number_as_ds(float(v)) for v in start + k * gap * normal]
        d.SliceThickness = thickness
        if between is None:
            del d.SpacingBetweenSlices
        else:
            d.SpacingBetweenSlices = between
    volume = load_series(ds)
    assert volume.spacing[0] == pytest.approx(gap, abs=1e-6)
    np.testing.assert_allclose(volume.origin, start, atol=1e-6)
    np.testing.assert_allclose(volume.slice_direction, normal, atol=1e-6)
    expected = np.eye(4)
    expected[:3, 0] = row * float(ds[0].PixelSpacing[1])
    expected[:3, 1] = col * float(ds[0].PixelSpacing[0])
    expected[:3, 2] = normal * gap
    expected[:3, 3] = start
    np.testing.assert_allclose(volume.affine, expected, atol=1e-6)
    # The pixels follow their positions, and the last slice is where the positions put it.
    for n, k in enumerate(rank):
        np.testing.assert_array_equal(volume.array[k], stored[n])
        assert volume.sop_instance_uids[k] == ds[n].SOPInstanceUID
    last = volume.affine @ np.array([0.0, 0.0, len(ds) - 1.0, 1.0])
    np.testing.assert_allclose(last[:3], start + (len(ds) - 1) * gap * normal, atol=1e-6)


#: Per-slice (RescaleSlope, RescaleIntercept): binary fractions, so that ``stored * slope + intercept``
#: is exact in float32 for the phantom's 16-bit values and the comparison can be exact. ``None``: absent.
PER_SLICE_RESCALE: list[tuple[str, str] | None] = [
    ("0.5", "-100"),
    ("2", "7.5"),
    None,
    ("0.25", "0"),
    ("1.5", "-1024"),
    ("4", "12.25"),
    ("0.125", "3"),
    ("3", "-0.5"),
    ("1", "1000"),
    ("0.75", "-2.5"),
]


def test_rescale_is_applied_per_slice(small_series: list[Path]) -> None:
    ds = _datasets(small_series)
    assert len(ds) == len(PER_SLICE_RESCALE)
    expected: dict[str, npt.NDArray[np.float64]] = {}
    for d, rescale in zip(ds, PER_SLICE_RESCALE, strict=True):
        slope, intercept = rescale or ("1", "0")
        if rescale is None:
            for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
                if keyword in d:
                    delattr(d, keyword)
        else:
            d.RescaleSlope, d.RescaleIntercept, d.RescaleType = slope, intercept, "US"
        expected[d.SOPInstanceUID] = d.pixel_array.astype(np.float64) * float(slope) + float(intercept)
    random.Random(2).shuffle(ds)  # each rescale must travel with its slice through the sort
    volume = load_series(ds)
    assert volume.array.dtype == np.float32
    assert len(set(volume.sop_instance_uids)) == len(ds)
    for k, uid in enumerate(volume.sop_instance_uids):
        np.testing.assert_array_equal(volume.array[k], expected[uid], err_msg=f"slice {k}")


# --- Enhanced (multi-frame) MR -----------------------------------------------------------------


def _enhanced(small_series: list[Path], tmp_path: Path) -> Path:
    """``small_series`` as one Legacy Converted Enhanced MR file, its frames in shuffled order."""
    legacy = _datasets(small_series)
    random.Random(3).shuffle(legacy)
    enhanced = LegacyConvertedEnhancedMRImage(
        legacy,
        series_instance_uid=generate_uid(),
        series_number=9,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    return path


def test_enhanced_mr_loads_like_the_single_frame_series(small_series: list[Path], tmp_path: Path) -> None:
    single = load_series(small_series)
    path = _enhanced(small_series, tmp_path)
    enhanced = pydicom.dcmread(str(path))
    multi = load_series([path])
    np.testing.assert_array_equal(multi.array, single.array)
    for attr in ("origin", "row_direction", "column_direction", "slice_direction"):
        np.testing.assert_allclose(getattr(multi, attr), getattr(single, attr), atol=1e-6)
    assert multi.spacing == pytest.approx(single.spacing)
    assert multi.sop_instance_uids == [enhanced.SOPInstanceUID] * single.array.shape[0]
    # Rescale in the shared PixelValueTransformationSequence is applied too.
    ds = pydicom.dcmread(str(path))
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "3", "5", "US"
    shared.PixelValueTransformationSequence = [transform]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        if "PixelValueTransformationSequence" in frame:
            del frame.PixelValueTransformationSequence
    np.testing.assert_array_equal(load_series([ds]).array, single.array * 3 + 5)
    # A frame without a position is refused, naming the frame.
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    with pytest.raises(
        InvalidSeriesError, match=r"frame 3: missing PlanePositionSequence/ImagePositionPatient"
    ):
        load_series([ds])


def test_enhanced_mr_rescale_is_applied_per_frame(small_series: list[Path], tmp_path: Path) -> None:
    single = load_series(small_series)  # no rescale: the stored values, sorted along the normal
    ds = pydicom.dcmread(str(_enhanced(small_series, tmp_path)))
    shared = Dataset()
    shared.RescaleSlope, shared.RescaleIntercept, shared.RescaleType = "3", "5", "US"
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = [shared]
    frames = ds.PerFrameFunctionalGroupsSequence
    assert len(frames) == len(PER_SLICE_RESCALE)
    depth = [
        np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64) @ single.slice_direction
        for f in frames
    ]
    ranks = np.argsort(np.argsort(depth))  # frame n is slice ranks[n] of the volume
    assert len(set(ranks.tolist())) == len(frames) and list(ranks) != list(range(len(frames)))
    expected = np.full(single.array.shape, np.nan)
    for frame, k, rescale in zip(frames, ranks, PER_SLICE_RESCALE, strict=True):
        if "PixelValueTransformationSequence" in frame:
            del frame.PixelValueTransformationSequence
        if rescale is None:  # this frame falls back to the shared functional group
            slope, intercept = 3.0, 5.0
        else:
            item = Dataset()
            item.RescaleSlope, item.RescaleIntercept, item.RescaleType = (*rescale, "US")
            frame.PixelValueTransformationSequence = [item]
            slope, intercept = float(rescale[0]), float(rescale[1])
        expected[k] = single.array[k].astype(np.float64) * slope + intercept
    np.testing.assert_array_equal(load_series([ds]).array, expected)


@pytest.mark.parametrize("slope", ["NaN", "inf", "x"])
def test_enhanced_mr_rescale_that_is_no_finite_number_is_refused_naming_the_frame(
    small_series: list[Path], tmp_path: Path, slope: str
) -> None:
    """As a single-frame image's is: a NaN slope loaded silently and made every network input inside
    the brain NaN (an empty result); a value that is no number was a bare ValueError, so the job
    never tried the role's next series."""
    ds = pydicom.dcmread(str(_enhanced(small_series, tmp_path)))
    frame = ds.PerFrameFunctionalGroupsSequence[1]
    item = Dataset()
    item.RescaleIntercept, item.RescaleType = "0", "US"
    item.add_new(0x00281053, "DS", None)
    item[0x00281053]._value = slope  # a value pydicom would refuse to set
    frame.PixelValueTransformationSequence = [item]
    with pytest.raises(InvalidSeriesError, match=r"frame 2: RescaleSlope = .* is not a (finite )?number"):
        load_series([ds])


def test_datasets_without_file_meta_and_single_slices(small_series: list[Path]) -> None:
    reference = load_series(small_series)
    ds = _datasets(small_series)
    for d in ds:
        del d.file_meta  # as decoded from a C-STORE request
    np.testing.assert_array_equal(load_series(ds).array, reference.array)
    one = load_series(small_series[3:4])
    assert one.array.shape == (1, 14, 16)
    np.testing.assert_array_equal(one.array[0], reference.array[3])
    # One slice: the spacing comes from SliceThickness (nothing to measure).
    assert one.spacing[0] == pytest.approx(float(pydicom.dcmread(str(small_series[0])).SliceThickness))


def test_a_one_frame_enhanced_mr_takes_its_spacing_from_pixel_measures(small_series: list[Path]) -> None:
    """A multi-frame image keeps SliceThickness and SpacingBetweenSlices in its Pixel Measures functional
    group, per frame or shared: only the top-level ones were read, so one 5 mm slice as an Enhanced MR
    image got 1 mm (the single-frame slice 5 mm) and the SR a tumour volume 5 x too small."""
    [source] = _datasets(small_series[3:4])
    source.SliceThickness, source.SpacingBetweenSlices = "5", "6"
    image = LegacyConvertedEnhancedMRImage(
        [source], series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(),
        instance_number=1,
    )  # fmt: skip
    buffer = io.BytesIO()
    image.save_as(buffer)
    enhanced = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    measures = enhanced.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert "SliceThickness" not in enhanced and measures.SliceThickness == 5
    assert load_series([enhanced]).spacing[0] == 5.0
    # The single-frame slice alike: a slice with no neighbours stands for its own thickness.
    assert load_series([source]).spacing[0] == 5.0
    frame_measures = copy.deepcopy(measures)
    frame_measures.SliceThickness = "4"
    enhanced.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence = [frame_measures]
    assert load_series([enhanced]).spacing[0] == 4.0  # the frame's own group first
    del enhanced.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence, measures.SliceThickness
    measures.SpacingBetweenSlices = "6"  # highdicom writes 1.0 for one frame, whatever the source says
    assert load_series([enhanced]).spacing[0] == 6.0  # no thickness anywhere: the spacing


def _monochrome1(ds: Dataset, syntax: str | None = None) -> Dataset:
    """``ds`` with its stored values turned over and PhotometricInterpretation MONOCHROME1 (written in
    ``syntax`` when given: big-endian, say)."""
    ds = copy.deepcopy(ds)
    pixels = ds.pixel_array
    stored = ((1 << int(ds.BitsStored)) - 1 - pixels.astype(np.int64)).astype(pixels.dtype)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
        stored = stored.astype(stored.dtype.newbyteorder(">"))
    ds.PixelData = stored.tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    return ds


@pytest.mark.parametrize("through", ["native", "pydicom", "enhanced"])
def test_a_monochrome1_series_loads_the_right_way_up(through: str) -> None:
    """MONOCHROME1 (the lowest value shown white): each stored value turned within the stored range,
    so the volume is the MONOCHROME2 original's, whether the pixels are read natively, decoded by
    pydicom (big-endian) or read from one Enhanced MR image."""
    folder = require_shared("dicom", "siemens_t1_fl2d_sag_healthy")
    sources = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    original = load_series(sources).array
    if through == "native":
        inverted = [_monochrome1(ds) for ds in sources]
    elif through == "pydicom":
        inverted = [_monochrome1(ds, ExplicitVRBigEndian) for ds in sources]
    else:
        image = LegacyConvertedEnhancedMRImage(
            sources, series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(),
            instance_number=1,
        )  # fmt: skip
        buffer = io.BytesIO()
        image.save_as(buffer)
        inverted = [_monochrome1(pydicom.dcmread(io.BytesIO(buffer.getvalue())))]
    np.testing.assert_array_equal(load_series(inverted).array, original)
