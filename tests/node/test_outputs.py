"""The node's outputs and inputs beyond the end-to-end tests: device check at start-up, the PNG
preview's montage, the SEG's codes and references, and a genuine Enhanced MR Image Storage object."""

from __future__ import annotations

import copy
import io
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from sqlalchemy import select

from converters.case import Case
from converters.dicom_series import load_series
from converters.dicom_writer import write_study
from converters.reorient import ras_to_volume
from converters.synthetic import make_synthetic_case
from db import job_queue
from db.card import TASK_LABELS
from db.node_tables import NodeInstance
from node import dimse
from node.config import Destination
from node.preview import COLOURS, render_preview
from node.seg import SERIES_DESCRIPTION, build_seg, run_series
from node.selection import SeriesSelector, series_info
from node.sender import store_files
from node.spool import spool_path
from node.sr import SR_SERIES_DESCRIPTION
from tests.helpers.node import CatchingSCP, make_threshold_model, node_settings, running_node
from tests.helpers.peers import require_program
from tests.helpers.ports import free_port
from tests.helpers.served import run_serve
from tests.helpers.waiting import wait_until

ENHANCED_MR = UID("1.2.840.10008.5.1.4.1.1.4.1")
MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")




# --- 1. inference device: an absent one is a start-up error -------------------------------------------


def test_serve_refuses_an_absent_inference_device(tmp_path: Path) -> None:
    """``segnode serve`` with a device OpenVINO does not see: one line naming it and the available
    ones, exit code 2, no traceback (a traceback only with --debug), nothing listening."""
    import openvino as ov

    available = list(ov.Core().available_devices)
    if any(d.upper().split(".")[0] == "NPU" for d in available):
        pytest.skip(f"this machine has an NPU ({available})")
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ninference_device = "NPU"\n\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "node.db"}"\n\n[metrics]\nport = 0\n'
    )
    run = run_serve(config, tmp_path / "var")
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0] == (
        f"error: node.inference_device 'NPU' is not available on this machine "
        f"(OpenVINO sees: {', '.join(available)}); set [node] inference_device"
    )
    assert "Traceback" not in run.stdout + run.stderr
    assert "serving" not in run.stdout
    # Refused before the database is touched: none created (nor migrated), here or in SEGNODE_HOME.
    assert not (tmp_path / "node.db").exists()
    assert not list((tmp_path / "var").rglob("*.db"))

    debug = run_serve(config, tmp_path / "var", "--debug")
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert "node.exceptions.ModelLoadError: node.inference_device 'NPU' is not available" in debug.stderr


# --- 2. PNG preview -------------------------------------------------------------------------------------

#: Side of the square tumour on each of 10 slices (0: none); the 6 largest are on slices 2, 3, 4, 5, 6, 8.
SIDES = (0, 2, 8, 4, 10, 6, 12, 3, 5, 0)


def _phantom(sides: Sequence[int]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Slice z of the image is the constant 10 * z (so a tile's grey level names its slice); the label
    map has a square of side ``sides[z]`` whose top-left corner moves with z, away from the edges."""
    image = np.zeros((len(sides), 32, 32), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    for z, side in enumerate(sides):
        image[z] = 10.0 * z
        if side:
            r0, c0 = 4 + z, 3 + 2 * z % 11
            labels[z, r0 : r0 + side, c0 : c0 + side] = 1
    return image, labels


def _tiles(png: bytes, tile: int = 256) -> tuple[Image.Image, list[npt.NDArray[np.uint8]]]:
    sheet = Image.open(io.BytesIO(png))
    sheet.load()
    rgb = np.asarray(sheet.convert("RGB"))
    rows, cols = rgb.shape[0] // tile, rgb.shape[1] // tile
    tiles = [
        rgb[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)
    ]
    return sheet, tiles


def _outlined(tile: npt.NDArray[np.uint8], factor: int) -> npt.NDArray[np.bool_]:
    """Pixels of the source grid that carry an outline colour (a grey pixel has R == G == B)."""
    centres = tile[factor // 2 :: factor, factor // 2 :: factor].astype(int)
    return np.asarray((centres[..., 0] != centres[..., 1]) | (centres[..., 1] != centres[..., 2]))


def test_preview_montage_of_the_slices_with_most_tumour() -> None:
    image, labels = _phantom(SIDES)
    png = render_preview(image, labels)  # defaults: 6 slices, 3 columns, 256-pixel tiles
    sheet, tiles = _tiles(png)
    assert sheet.format == "PNG" and sheet.mode == "RGB"
    assert sheet.size == (3 * 256, 2 * 256)  # 6 tiles in 2 rows of 3
    expected_slices = [2, 3, 4, 5, 6, 8]  # the six largest squares, in slice order
    # Grey level of slice z: (10 z - lo) / (hi - lo) * 255, lo and hi the 1st and 99.5th percentiles
    # of the volume (here the values of slices 0 and 9).
    grey = {z: 10.0 * z / 90.0 * 255.0 for z in range(len(SIDES))}
    factor = 256 // 32
    for tile, z in zip(tiles, expected_slices, strict=True):
        outline = _outlined(tile, factor)
        background = tile[factor // 2 :: factor, factor // 2 :: factor][~outline]
        assert np.all(background[:, 0] == background[:, 1])
        assert np.abs(background.astype(float) - grey[z]).max() <= 1.0, f"tile of slice {z}"
        # The outline is exactly the square's one-pixel border: not inside, not outside.
        side = SIDES[z]
        r0, c0 = 4 + z, 3 + 2 * z % 11
        border = np.zeros((32, 32), bool)
        border[r0 : r0 + side, c0 : c0 + side] = True
        border[r0 + 1 : r0 + side - 1, c0 + 1 : c0 + side - 1] = False
        np.testing.assert_array_equal(outline, border, err_msg=f"outline of slice {z}")
        colours = {
            tuple(int(v) for v in px) for px in tile[factor // 2 :: factor, factor // 2 :: factor][outline]
        }
        assert colours == {COLOURS[1]}
        # Nearest-neighbour scaling: each source pixel is a factor x factor block of one colour.
        blocks = tile.reshape(32, factor, 32, factor, 3)
        assert np.all(blocks == blocks[:, :1, :, :1, :])


def test_preview_irregular_outline_lies_on_the_boundary_and_few_slices() -> None:
    """A disc of label 1 with a label-2 blob: every outline pixel is in its label's region and touches
    its outside; no interior pixel is coloured. Fewer tumour slices than tiles: one tile each."""
    image = np.tile(np.linspace(0, 100, 40, dtype=np.float32), (5, 40, 1))
    labels = np.zeros(image.shape, np.uint8)
    rr, cc = np.mgrid[:40, :40]
    labels[1][(rr - 20) ** 2 + (cc - 18) ** 2 <= 81] = 1
    labels[3][(rr - 15) ** 2 + (cc - 25) ** 2 <= 36] = 1
    labels[3][(rr - 28) ** 2 + (cc - 12) ** 2 <= 16] = 2
    png = render_preview(image, labels, tile=120)  # 40 -> 120: factor 3
    sheet, tiles = _tiles(png, tile=120)
    assert sheet.size == (2 * 120, 120)  # two tumour slices: one row of two tiles
    for tile, z in zip(tiles, [1, 3], strict=True):
        centres = tile[1::3, 1::3].astype(int)
        for value in (1, 2):
            colour = np.all(centres == COLOURS[value], axis=-1)
            region = labels[z] == value
            if not region.any():
                assert not colour.any()
                continue
            interior = ndimage.binary_erosion(region)
            outside_neighbour = ndimage.binary_dilation(~region) & region
            assert colour.any()
            assert not (colour & ~region).any(), f"slice {z} label {value}: colour outside the region"
            assert not (colour & interior).any(), f"slice {z} label {value}: colour in the interior"
            np.testing.assert_array_equal(colour, outside_neighbour)
        grey = ~np.any(centres != centres[..., :1], axis=-1)
        assert (grey | np.all(centres == COLOURS[1], axis=-1) | np.all(centres == COLOURS[2], axis=-1)).all()


def test_preview_of_a_512_matrix_keeps_every_outline_and_small_lesion() -> None:
    """A 512-pixel slice in a 256-pixel tile: nearest sampling kept every other row and column, so a
    one-pixel outline broke into pieces and a 2-voxel lesion vanished from the preview the radiologist
    sees (the SEG and SR still reported it)."""
    from converters.masks import surface

    image = np.tile(np.linspace(0, 100, 512, dtype=np.float32), (1, 512, 1))
    labels = np.zeros(image.shape, np.uint8)
    rr, cc = np.mgrid[:512, :512]
    labels[0][(rr - 200) ** 2 + (cc - 240) ** 2 <= 60**2] = 1
    labels[0, 401:403, 101] = 2  # two voxels, on odd and even rows
    _, [tile] = _tiles(render_preview(image, labels))
    for value, region in ((1, labels[0] == 1), (2, labels[0] == 2)):
        coloured = np.all(tile == COLOURS[value], axis=-1)
        assert coloured.any(), f"label {value} not drawn"
        # Every source outline pixel lands in a coloured tile pixel (each tile pixel covers 2 x 2).
        rows, cols = np.nonzero(surface(region))
        assert coloured[rows // 2, cols // 2].all(), f"label {value}: outline pixels lost"
    circle = np.all(tile == COLOURS[1], axis=-1)
    assert ndimage.label(circle, structure=np.ones((3, 3)))[1] == 1  # one closed outline, not pieces


def test_preview_keeps_the_aspect_ratio_of_a_non_square_slice() -> None:
    """256 rows x 160 columns of 1 mm (or 200 x 200 pixels of 1.2 x 0.96 mm): a round lesion stays round
    instead of being stretched to the square tile."""
    rr, cc = np.mgrid[:256, :160]
    image = np.full((1, 256, 160), 50.0, np.float32)
    image[0, :, :80] = 100.0
    labels = np.zeros(image.shape, np.uint8)
    labels[0][(rr - 128) ** 2 + (cc - 80) ** 2 <= 40**2] = 1
    _, [tile] = _tiles(render_preview(image, labels))
    rows, cols = np.nonzero(np.all(tile == COLOURS[1], axis=-1))
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(width / height - 1.0) < 0.05, (width, height)
    # Padded at the sides, the image in the middle.
    assert tile[10, 20].tolist() == [0, 0, 0] and tile[10, 60].tolist() == [255, 255, 255]
    # Square pixels of unequal spacing: the tile is 256 high and 0.96 / 1.2 * 256 = 205 wide.
    rr, cc = np.mgrid[:200, :200]
    labels = np.zeros((1, 200, 200), np.uint8)
    labels[0][((rr - 100) * 1.2) ** 2 + ((cc - 100) * 0.96) ** 2 <= 60**2] = 1
    png = render_preview(np.ones((1, 200, 200), np.float32), labels, pixel_spacing=(1.2, 0.96))
    rows, cols = np.nonzero(np.all(_tiles(png)[1][0] == COLOURS[1], axis=-1))
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(width / height - 1.0) < 0.05, (width, height)


def test_preview_without_tumour_shows_the_middle_slice() -> None:
    image, labels = _phantom([0] * 7)
    sheet, [tile] = _tiles(render_preview(image, labels, tile=64), tile=64)
    assert sheet.size == (64, 64)
    assert np.all(tile == tile[0, 0]) and tile[0, 0, 0] == pytest.approx(30 / 60 * 255, abs=1)


# --- 3. SEG: codes, algorithm identification, references ------------------------------------------------


@pytest.fixture(scope="module")
def flair_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small synthetic FLAIR series (8 slices of 32 x 24), files in slice order."""
    study = write_study(
        make_synthetic_case(11, (24, 32, 8)), tmp_path_factory.mktemp("seg"), modalities=["FLAIR"]
    )
    return study.files["FLAIR"]


def _card(task: str) -> dict[str, Any]:
    return {"name": "test-model", "version": "2.3.4", "task": task, "labels": TASK_LABELS[task]}


def _code(item: Dataset) -> tuple[str, str, str]:
    return (str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _sources_and_labels(flair_series: list[Path], task: str) -> tuple[list[Dataset], np.ndarray]:
    """The FLAIR series' datasets and a small lesion on their frames: one label, or, for
    ``brats_regions``, edema around a core around an enhancing part."""
    sources: list[Dataset] = [pydicom.dcmread(p) for p in flair_series]
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    labels = np.zeros((len(sources), rows, columns), np.uint8)
    labels[2:6, 5:15, 4:12] = 1
    if task == "brats_regions":
        labels[3:5, 7:12, 6:10] = 2
        labels[4, 9:11, 7:9] = 3
    return sources, labels


@pytest.mark.parametrize("task", ["whole_tumor", "brats_regions"])
def test_seg_codes_algorithm_and_references(
    task: str, flair_series: list[Path], tmp_path: Path, strict_pydicom: None
) -> None:
    sources, labels = _sources_and_labels(flair_series, task)
    seg = build_seg(sources, labels, _card(task), software_version="9.9.9")
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    read = hd.seg.Segmentation.from_dataset(ds)
    assert read.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    expected = TASK_LABELS[task]
    assert read.number_of_segments == len(expected)
    for number, label in enumerate(expected, start=1):
        desc = read.get_segment_description(number)
        assert desc.segment_label == label["name"]
        category, kind = label["category"], label["type"]
        assert desc.segmented_property_category == hd.sr.CodedConcept(
            category["code"], category["scheme"], category["meaning"]
        )
        assert desc.segmented_property_type == hd.sr.CodedConcept(
            kind["code"], kind["scheme"], kind["meaning"]
        )
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        [region] = desc.anatomic_regions
        assert region == hd.sr.CodedConcept("12738006", "SCT", "Brain")
        algorithm = desc.algorithm_identification
        assert algorithm is not None
        assert (algorithm[0].AlgorithmName, algorithm[0].AlgorithmVersion) == ("test-model", "2.3.4")
        [family] = algorithm[0].AlgorithmFamilyCodeSequence
        ai = codes.cid7162.ArtificialIntelligence
        assert _code(family) == (ai.value, ai.scheme_designator, ai.meaning)
        assert _code(family) == ("123110", "DCM", "Artificial Intelligence")
    # The same, as plain pydicom attributes of the file (what a viewer reads).
    first = ds.SegmentSequence[0]
    assert _code(first.AnatomicRegionSequence[0]) == ("12738006", "SCT", "Brain")
    assert _code(first.SegmentedPropertyCategoryCodeSequence[0]) == (
        "49755003",
        "SCT",
        "Morphologically abnormal structure",
    )
    assert first.SegmentAlgorithmType == "AUTOMATIC"
    assert [_code(s.SegmentedPropertyTypeCodeSequence[0])[:2] for s in ds.SegmentSequence] == [
        (lab["type"]["code"], lab["type"]["scheme"]) for lab in expected
    ]
    assert ds.SeriesDescription.startswith("AI ") and ds.SoftwareVersions == "9.9.9"

    # Every source instance is referenced, once, with its class, in the source series.
    [series] = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = [
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence
    ]
    assert sorted(referenced) == sorted((MR_IMAGE, str(s.SOPInstanceUID)) for s in sources)
    # Frames hold the tumour slices only, each derived from its own source image.
    uids = [str(s.SOPInstanceUID) for s in sources]
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False
    )
    np.testing.assert_array_equal(pixels, labels)
    frame_sources = {
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in ds.PerFrameFunctionalGroupsSequence
    }
    assert frame_sources == set(uids[2:6])


@pytest.mark.parametrize("task", ["whole_tumor", "brats_regions"])
def test_demo_scores_every_segment_and_reads_the_whole_tumour_volume(
    task: str, flair_series: list[Path], tmp_path: Path
) -> None:
    """``segnode demo``'s Dice and volume are of the whole tumour: a ``brats_regions`` SEG's union of
    segments, its SR's whole-tumour group (not segment 1, edema alone); a ``whole_tumor`` model's one
    segment as before; 0 mL from the report of a study without tumour."""
    from node.demo import reported_tumour_volume_ml, returned_tumour
    from node.sr import build_sr

    sources, labels = _sources_and_labels(flair_series, task)
    card = _card(task)
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    build_seg(sources, labels, card, software_version="9.9.9").save_as(seg_path, enforce_file_format=True)
    seg = hd.seg.segread(seg_path)
    uids = [str(s.SOPInstanceUID) for s in sources]
    np.testing.assert_array_equal(returned_tumour(seg, uids), labels > 0)

    volumes = [12.5, 3.25, 0.5][: seg.number_of_segments]
    regions = {"whole_tumour": 16.25, "tumour_core": 3.75} if task == "brats_regions" else None
    brain = {"brain_volume_ml": 1200.0, "tumour_share_percent": 1.4}
    sr = build_sr(seg, sources, volumes, card, regions=regions, **brain)
    sr.save_as(sr_path, enforce_file_format=True)
    assert reported_tumour_volume_ml(hd.sr.srread(sr_path).content) == pytest.approx(sum(volumes))

    nothing = regions and dict.fromkeys(regions, 0.0)
    none = build_sr(None, sources, [0.0] * len(volumes), card, regions=nothing, **brain)
    none.save_as(sr_path, enforce_file_format=True)
    assert reported_tumour_volume_ml(hd.sr.srread(sr_path).content) == 0.0


# --- 4. Enhanced MR Image Storage (true multi-frame, PS3.3 A.36.2) ----------------------------------------


def _item(**attributes: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


#: Attributes copied from the single-frame sources: Patient, General Study, General Series, Frame of
#: Reference, General Equipment (PS3.3 A.36.2.3).
_COPIED = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "PatientIdentityRemoved", "DeidentificationMethod", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription", "Modality",
    "SeriesDate", "SeriesTime", "ProtocolName", "PatientPosition", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "InstitutionName", "MagneticFieldStrength", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
    "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
)  # fmt: skip


def _mr_functional_groups(first: Dataset) -> dict[str, Dataset]:
    """The MR functional groups of the shared item, from a FLAIR's single-frame attributes (C.8.13.5)."""
    return {
        "MRTimingAndRelatedParametersSequence": _item(
            RepetitionTime=first.RepetitionTime,
            FlipAngle=first.FlipAngle,
            EchoTrainLength=first.EchoTrainLength,
            RFEchoTrainLength=first.EchoTrainLength,
            GradientEchoTrainLength=0,
            SpecificAbsorptionRateSequence=[
                _item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.4)
            ],
            OperatingModeSequence=[
                _item(OperatingModeType=mode, OperatingMode="IEC_NORMAL")
                for mode in ("STATIC FIELD", "RF", "GRADIENT")
            ],
            GradientOutputType="DB_DT",
            GradientOutput=10.0,
        ),
        "MRFOVGeometrySequence": _item(
            InPlanePhaseEncodingDirection="ROW",
            MRAcquisitionFrequencyEncodingSteps=int(first.Columns),
            MRAcquisitionPhaseEncodingStepsInPlane=int(first.Rows),
            PercentSampling="100",
            PercentPhaseFieldOfView="100",
        ),
        "MREchoSequence": _item(EffectiveEchoTime=float(first.EchoTime)),
        "MRModifierSequence": _item(
            InversionRecovery="YES",
            InversionTimes=[float(first.InversionTime)],
            FlowCompensation="NONE",
            T2Preparation="NO",
            SpectrallySelectedExcitation="NONE",
            SpatialPresaturation="NONE",
            PartialFourier="NO",
            ParallelAcquisition="NO",
        ),
        "MRImagingModifierSequence": _item(
            MagnetizationTransfer="NONE",
            BloodSignalNulling="NO",
            Tagging="NONE",
            TransmitterFrequency=[float(first.ImagingFrequency)],
            PixelBandwidth=first.PixelBandwidth,
        ),
        "MRReceiveCoilSequence": _item(
            ReceiveCoilName="HEAD",
            ReceiveCoilManufacturerName="",
            ReceiveCoilType="VOLUME",
            QuadratureReceiveCoil="YES",
        ),
        "MRTransmitCoilSequence": _item(
            TransmitCoilName="BODY", TransmitCoilManufacturerName="", TransmitCoilType="BODY"
        ),
        "MRAveragesSequence": _item(NumberOfAverages=first.NumberOfAverages),
    }


def make_enhanced_mr(sources: Sequence[Dataset], frame_order: Sequence[int]) -> Dataset:
    """A genuine Enhanced MR Image Storage object (not the Legacy Converted class) from single-frame
    MR images of one FLAIR series: image type ORIGINAL, the MR image, pulse-sequence and functional-group
    modules of PS3.3 A.36.2.4 (timing, FOV, echo, modifier, coils, averages in the shared item; frame
    content and plane position per frame). Frame n holds ``sources[frame_order[n]]``."""
    first = sources[0]
    ds = Dataset()
    for keyword in _COPIED:
        if keyword in first:
            setattr(ds, keyword, copy.deepcopy(first[keyword].value))
    when = f"{first.StudyDate}{first.StudyTime}"
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, generate_uid()
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 300, 1
    # A description no selection pattern matches: the FLAIR must be found by its MR attributes.
    ds.SeriesDescription = ds.ProtocolName = "AX BRAIN MULTIFRAME"
    ds.DeviceSerialNumber = "0001"
    ds.ContentDate, ds.ContentTime = first.StudyDate, first.StudyTime
    ds.InstanceCreationDate, ds.InstanceCreationTime = first.StudyDate, first.StudyTime
    # Enhanced MR Image module (C.8.13.1) with the MR Image and Spectroscopy Instance macro.
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = (
        "MONOCHROME",
        "VOLUME",
        "NONE",
    )
    ds.ComplexImageComponent, ds.AcquisitionContrast = "MAGNITUDE", "FLUID_ATTENUATED"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime, ds.AcquisitionDuration = when, 120.0
    ds.ContentQualification, ds.ResonantNucleus, ds.KSpaceFiltering = "PRODUCT", "1H", "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.AcquisitionContextSequence = []
    ds.BurnedInAnnotation, ds.LossyImageCompression, ds.PresentationLUTShape = "NO", "00", "IDENTITY"
    # MR Pulse Sequence module (C.8.13.4).
    ds.PulseSequenceName, ds.MRAcquisitionType, ds.EchoPulseSequence = "FLAIR", "2D", "SPIN"
    ds.MultipleSpinEcho, ds.MultiPlanarExcitation, ds.PhaseContrast = "NO", "NO", "NO"
    ds.TimeOfFlightContrast, ds.SteadyStatePulseSequence, ds.EchoPlanarPulseSequence = "NO", "NONE", "NO"
    ds.SaturationRecovery, ds.SpectrallySelectedSuppression, ds.OversamplingPhase = "NO", "NONE", "NONE"
    ds.GeometryOfKSpaceTraversal, ds.RectilinearPhaseEncodeReordering = "RECTILINEAR", "LINEAR"
    ds.SegmentedKSpaceTraversal, ds.NumberOfKSpaceTrajectories = "SINGLE", 1
    # Multi-frame Dimension module (C.7.6.17): stack and in-stack position.
    organisation = generate_uid()
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organisation)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=organisation,
            DimensionIndexPointer=tag,
            FunctionalGroupPointer=0x00209111,  # FrameContentSequence
            DimensionDescriptionLabel=label,
        )
        for tag, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position Number"))
    ]
    shared = _item(
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=first.PixelSpacing,
                SliceThickness=first.SliceThickness,
                SpacingBetweenSlices=first.SpacingBetweenSlices,
            )
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=first.ImageOrientationPatient)],
        FrameAnatomySequence=[
            _item(
                AnatomicRegionSequence=[
                    _item(CodeValue="12738006", CodingSchemeDesignator="SCT", CodeMeaning="Brain")
                ],
                FrameLaterality="U",
            )
        ],
        PixelValueTransformationSequence=[
            _item(
                RescaleIntercept=first.get("RescaleIntercept", "0"),
                RescaleSlope=first.get("RescaleSlope", "1"),
                RescaleType=first.get("RescaleType", "US"),
            )
        ],
        FrameVOILUTSequence=[_item(WindowCenter=first.WindowCenter, WindowWidth=first.WindowWidth)],
        MRImageFrameTypeSequence=[
            _item(
                FrameType=ds.ImageType,
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
                ComplexImageComponent="MAGNITUDE",
                AcquisitionContrast="FLUID_ATTENUATED",
            )
        ],
    )
    for keyword, item in _mr_functional_groups(first).items():
        setattr(shared, keyword, [item])
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(
            FrameContentSequence=[
                _item(
                    FrameAcquisitionNumber=1,
                    FrameReferenceDateTime=when,
                    FrameAcquisitionDateTime=when,
                    FrameAcquisitionDuration=5000.0,
                    StackID="1",
                    InStackPositionNumber=k + 1,
                    DimensionIndexValues=[1, k + 1],
                )
            ],
            PlanePositionSequence=[_item(ImagePositionPatient=sources[k].ImagePositionPatient)],
        )
        for k in frame_order
    ]
    ds.NumberOfFrames = len(frame_order)
    ds.PixelData = b"".join(sources[k].PixelData for k in frame_order)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


ENHANCED_SHAPE = (48, 48, 24)
#: Frame n of the Enhanced MR object holds slice FRAME_ORDER[n]: not in slice order on purpose.
FRAME_ORDER = [int(k) for k in np.random.default_rng(5).permutation(ENHANCED_SHAPE[2])]


@pytest.fixture(scope="module")
def enhanced_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, list[Path], Path]:
    """(case, single-frame FLAIR files, the same FLAIR as one genuine Enhanced MR file)."""
    tmp = tmp_path_factory.mktemp("enhanced")
    case = make_synthetic_case(7, ENHANCED_SHAPE)
    study = write_study(case, tmp / "study", modalities=["FLAIR"])
    files = study.files["FLAIR"]
    enhanced = make_enhanced_mr([pydicom.dcmread(p) for p in files], FRAME_ORDER)
    path = tmp / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return case, files, path


def test_genuine_enhanced_mr_is_valid_and_loads_like_the_single_frame_series(
    enhanced_study: tuple[Case, list[Path], Path], strict_pydicom: None
) -> None:
    """The test object is what the standard calls an Enhanced MR image (dciodvfy: no error, no
    warning), and converters.dicom_series assembles it into the single-frame series' volume."""
    _, files, path = enhanced_study
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ENHANCED_MR and ds.file_meta.MediaStorageSOPClassUID == ENHANCED_MR
    assert (
        int(ds.NumberOfFrames) == ENHANCED_SHAPE[2]
        and "UnassignedSharedConvertedAttributesSequence" not in (ds.SharedFunctionalGroupsSequence[0])
    )
    single, multi = load_series(files), load_series([path])
    np.testing.assert_array_equal(multi.array, single.array)
    for attr in ("origin", "row_direction", "column_direction", "slice_direction"):
        np.testing.assert_allclose(getattr(multi, attr), getattr(single, attr), atol=1e-6)
    assert multi.spacing == pytest.approx(single.spacing)
    # Selection reads TE, TI and inversion recovery from the MR functional groups (no top-level EchoTime).
    assert "EchoTime" not in ds and "InversionTime" not in ds and "ScanningSequence" not in ds
    info = series_info(ds, [path], int(ds.NumberOfFrames))
    assert (info.inversion_recovery, info.echo_time, info.inversion_time, info.axial) == (
        True,
        120.0,
        2500.0,
        True,
    )
    assert SeriesSelector().matches("FLAIR", info) and not SeriesSelector().matches("T2", info)
    report = subprocess.run(
        [require_program("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = report.stdout + report.stderr
    assert "EnhancedMRImage" in output
    assert [line for line in output.splitlines() if "Error" in line or "Warning" in line] == []


def test_genuine_enhanced_mr_is_kept_and_segmented(
    enhanced_study: tuple[Case, list[Path], Path], tmp_path: Path
) -> None:
    """Over a real association to a running node: the Enhanced MR object is spooled and recorded as
    kept, selected as the FLAIR (TE, TI and inversion recovery from its MR functional groups), and the
    returned SEG references it frame by frame with the mask of the single-frame path."""
    from node.segmenter import OpenVINOSegmenter

    case, files, path = enhanced_study
    model_dir = make_threshold_model(tmp_path / "model", crop=ENHANCED_SHAPE[:2], spacing=case.spacing)
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    )
    try:
        with running_node(settings, model_dir) as node:
            [(_, status, error)] = store_files([path], "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
            assert status == dimse.SUCCESS, error
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            with node.sf() as s:
                [row] = s.scalars(select(NodeInstance))
                assert (row.sop_instance_uid, row.sop_class_uid, row.kept) == (
                    str(ds.SOPInstanceUID),
                    ENHANCED_MR,
                    True,
                )
                spooled = Path(row.path or "")
            assert spooled == spool_path(
                settings.node.spool_path(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            assert pydicom.dcmread(spooled).PixelData == pydicom.dcmread(path).PixelData

            def finished() -> job_queue.JobInfo | None:
                ended = ("done", "failed", "skipped")
                return next((j for j in job_queue.list_jobs(node.sf) if j.status in ended), None)

            job = wait_until(finished, 60, "the job of the Enhanced MR study")
            assert job.status == "done", job.reason
            assert job.result["series"] == {"FLAIR": str(ds.SeriesInstanceUID)}
            received = catcher.wait_for(lambda r: any(d.Modality == "SEG" for d in r), 30)
            seg = next(d for d in received if d.Modality == "SEG")
    finally:
        catcher.stop()
    [series] = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ds.SeriesInstanceUID
    [instance] = series.ReferencedInstanceSequence
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        ENHANCED_MR,
        ds.SOPInstanceUID,
    )
    # The model run on the single-frame series' grid, against the SEG's frames put back in slice order.
    card = json.loads((model_dir / "model.json").read_text())
    direct = OpenVINOSegmenter(card, model_dir / "model_fp32.xml").segment(case.images, case.affine)
    expected = np.asarray(ras_to_volume(direct, load_series(files)))
    assert expected.any()
    returned = np.zeros_like(expected)
    pixels = seg.pixel_array.reshape(-1, *expected.shape[1:])
    for n, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        returned[FRAME_ORDER[int(source.ReferencedFrameNumber) - 1]] = pixels[n]
    both = ((returned > 0) & (expected > 0)).sum()
    assert 2 * both / ((returned > 0).sum() + (expected > 0).sum()) >= 0.99


def test_seg_warm_up_loads_highdicoms_tables_before_the_first_seg() -> None:
    """node.seg.warm_up fills highdicom's cached tables (the service calls it at start)."""
    from highdicom import _standard_utils as tables

    from node.seg import warm_up

    loaders = [tables.get_sop_class_iod_map, tables.get_iod_module_map, tables.get_module_attribute_map]
    for loader in loaders:
        loader.cache_clear()
    warm_up()
    assert all(loader.cache_info().currsize == 1 for loader in loaders)


@pytest.mark.parametrize("description", [SERIES_DESCRIPTION, SR_SERIES_DESCRIPTION])
def test_an_outputs_description_keeps_its_marker_what_it_is_and_its_disclaimer(description: str) -> None:
    """A result released after failing QC, in a re-run and a retry at once: the description fits LO's 64
    characters with the QC marker, "(not for diagnosis alone)", the run and retry whole, and still says
    whether it is the SEG or the volume (up to 9 runs and 9 retries)."""
    what = description.split(" (")[0].split()[-1]  # SEG, VOLUME
    for run in range(1, 13):
        for resend in range(0, 4):
            for failed in (False, True):
                number, text = run_series(9901, description, run, resend=resend, qc_failed=failed)
                assert len(text) <= 64, text
                assert text.count("not for diagnosis alone)") == 1, text
                assert text.startswith("QC FAILED: ") == failed, text
                suffix = (f" run {run}" if run > 1 else "") + (f" retry {resend}" if resend else "")
                assert text.endswith(suffix), text
                if run <= 9:
                    assert what in text, text
                assert number == 9901 + 10 * (run - 1) + 1000 * resend
