"""Case / Volume -> DICOM MR study: one MR Image Storage series per modality, one file per slice.

Modules written (PS3.3 A.4, MR Image IOD): Patient (C.7.1.1), General Study (C.7.2.1), Patient Study
(C.7.2.2), General Series (C.7.3.1), Frame of Reference (C.7.4.1), General Equipment (C.7.5.1), General
Image (C.7.6.1), Image Plane (C.7.6.2), Image Pixel (C.7.6.3), Contrast/Bolus (C.7.6.4, post-contrast T1
only), MR Image (C.8.3.1), VOI LUT (C.11.2), SOP Common (C.12.1).

Pixel values
------------
Images are stored as 16-bit integers. Integer-valued input (real BraTS images, the synthetic phantom)
that fits uint16 (or int16, when negative values occur) is stored as is, without Rescale Slope and
Intercept, so reading it back gives exactly the same array. Other input (e.g. z-scored BraTS 2013 images)
is quantised symmetrically into int16 with RescaleIntercept 0 and RescaleSlope ``max(|v|) / 32767``
(written as a DICOM DS string and used as written): 0 stays exactly 0 and every other value is read back
within half a slope step (``max(|v|) / 65534``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from converters.case import MODALITIES, Case
from converters.exceptions import ConverterError
from converters.reorient import case_to_volume
from converters.volume import Volume

logger = logging.getLogger(__name__)

#: Largest stored magnitude of the quantised (non-integer) encoding.
QUANTISED_MAX = 32767

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class SyntheticPatient:
    """Patient attributes of a converted study: obviously fake, never taken from the source."""

    name: str = "SYNTHETIC^PATIENT"
    patient_id: str = "SYN00000"
    birth_date: str = "19700101"
    sex: str = "O"

    @classmethod
    def from_seed(cls, seed: int) -> SyntheticPatient:
        """A reproducible fake patient for ``seed``."""
        rng = np.random.default_rng(seed)
        year = int(rng.integers(1940, 2000))
        month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        return cls(
            name=f"SYNTHETIC^PATIENT{seed % 100000:05d}",
            patient_id=f"SYN{seed % 100000:05d}",
            birth_date=f"{year:04d}{month:02d}{day:02d}",
            sex=str(rng.choice(["F", "M"])),
        )


@dataclass(frozen=True)
class MRProtocol:
    """Acquisition attributes of one contrast (MR Image module, PS3.3 C.8.3.1)."""

    description: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    repetition_time: float
    echo_time: float
    echo_train_length: int
    flip_angle: float
    inversion_time: float | None = None
    contrast_agent: str | None = None


#: Typical 1.5 T brain-tumour protocol, one entry per canonical modality.
PROTOCOLS: dict[str, MRProtocol] = {
    "FLAIR": MRProtocol(
        "AX FLAIR", ("SE", "IR"), ("SK", "SP", "MP"), ("SP",), 9000.0, 120.0, 24, 90.0, inversion_time=2500.0
    ),
    "T1": MRProtocol("AX T1", ("SE",), ("NONE",), ("SP",), 500.0, 10.0, 1, 90.0),
    "T1GD": MRProtocol(
        "AX T1 POST GD", ("SE",), ("NONE",), ("SP", "FS"), 500.0, 10.0, 1, 90.0,
        contrast_agent="Gadobutrol 1.0 mmol/mL",
    ),
    "T2": MRProtocol("AX T2", ("SE",), ("SK",), ("SP",), 4000.0, 100.0, 16, 90.0),
}  # fmt: skip

MAGNETIC_FIELD_STRENGTH_T = 1.5
LARMOR_MHZ_PER_T = 42.577


@dataclass
class SeriesInfo:
    """One written series."""

    modality: str
    series_instance_uid: str
    series_number: int
    description: str
    files: list[Path] = field(default_factory=list)


@dataclass
class StudyInfo:
    """What :func:`write_study` wrote."""

    study_instance_uid: str
    frame_of_reference_uid: str
    out_dir: Path
    series: dict[str, SeriesInfo] = field(default_factory=dict)

    @property
    def series_uids(self) -> dict[str, str]:
        """Modality -> SeriesInstanceUID."""
        return {m: s.series_instance_uid for m, s in self.series.items()}

    @property
    def files(self) -> dict[str, list[Path]]:
        """Modality -> files in slice order."""
        return {m: list(s.files) for m, s in self.series.items()}

    @property
    def n_files(self) -> int:
        """Total number of files written."""
        return sum(len(s.files) for s in self.series.values())


@dataclass(frozen=True)
class PixelEncoding:
    """How float voxel values are stored: ``value = stored * slope + intercept``."""

    stored: npt.NDArray[np.integer]
    slope: float
    intercept: float
    signed: bool
    exact: bool


def encode_pixels(array: npt.NDArray[np.floating], *, what: str = "image") -> PixelEncoding:
    """Choose a 16-bit storage for ``array`` (see the module notes) and encode it.

    Parameters
    ----------
    array:
        Float voxel values; must be finite.
    what:
        Name of the source for error messages.

    Returns
    -------
    PixelEncoding
        ``exact`` is True when decoding gives back ``array`` bit for bit.
    """
    if not np.all(np.isfinite(array)):
        raise ConverterError(f"{what}: image holds NaN or infinite values")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if np.array_equal(array, np.rint(array)):
        if lo >= 0 and hi <= 65535:
            return PixelEncoding(array.astype(np.uint16), 1.0, 0.0, signed=False, exact=True)
        if lo >= -32768 and hi <= 32767:
            return PixelEncoding(array.astype(np.int16), 1.0, 0.0, signed=True, exact=True)
    amax = max(abs(lo), abs(hi))
    slope = float(format_number_as_ds(amax / QUANTISED_MAX)) if amax > 0 else 1.0
    stored = np.clip(np.rint(array.astype(np.float64) / slope), -QUANTISED_MAX, QUANTISED_MAX).astype(
        np.int16
    )
    return PixelEncoding(stored, slope, 0.0, signed=True, exact=False)


def _ds(value: float) -> str:
    """``value`` as a DS string of at most 16 characters (PS3.5 6.2).

    pydicom's ``format_number_as_ds`` gives 17 characters for values that round up to the next
    power of ten (e.g. -9.999999999999996 -> "-10.0000000000000", met in oblique positions); such
    a value is first rounded to 12 significant digits.
    """
    text = format_number_as_ds(float(value))
    if len(text) > 16:
        text = format_number_as_ds(float(f"{float(value):.12g}"))
    return text


def _study_dataset(
    patient: SyntheticPatient, study_uid: str, frame_uid: str, when: dt.datetime, description: str
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient module (C.7.1.1): synthetic values only.
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "segnode: synthetic patient attributes, none from the source"
    # General Study (C.7.2.1).
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = description
    # Frame of Reference (C.7.4.1) and General Equipment (C.7.5.1).
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "segnode"
    ds.ManufacturerModelName = "nifti-to-dicom converter"
    ds.SoftwareVersions = "segnode 0.1.0"
    ds.InstitutionName = "segnode synthetic site"
    return ds


def _series_dataset(
    base: Dataset, protocol: MRProtocol, volume: Volume, series_uid: str, number: int
) -> Dataset:
    ds = copy.deepcopy(base)
    # General Series (C.7.3.1).
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = protocol.description
    ds.ProtocolName = protocol.description
    ds.SeriesDate = base.StudyDate
    ds.SeriesTime = base.StudyTime
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    # MR Image (C.8.3.1).
    ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]
    ds.ScanningSequence = list(protocol.scanning_sequence)
    ds.SequenceVariant = list(protocol.sequence_variant)
    ds.ScanOptions = list(protocol.scan_options)
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = protocol.description.replace("AX ", "").replace(" ", "_")[:16]  # SH: 16 chars
    ds.AngioFlag = "N"
    ds.RepetitionTime = _ds(protocol.repetition_time)
    ds.EchoTime = _ds(protocol.echo_time)
    ds.EchoTrainLength = protocol.echo_train_length
    if protocol.inversion_time is not None:
        ds.InversionTime = _ds(protocol.inversion_time)
    ds.FlipAngle = _ds(protocol.flip_angle)
    ds.NumberOfAverages = "1"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds(MAGNETIC_FIELD_STRENGTH_T)
    ds.ImagingFrequency = _ds(MAGNETIC_FIELD_STRENGTH_T * LARMOR_MHZ_PER_T)
    ds.EchoNumbers = "1"
    ds.PixelBandwidth = "150"
    ds.SliceThickness = _ds(volume.spacing[0])
    ds.SpacingBetweenSlices = _ds(volume.spacing[0])
    if protocol.contrast_agent is not None:  # Contrast/Bolus (C.7.6.4)
        ds.ContrastBolusAgent = protocol.contrast_agent
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = "7.5"
    # Image Plane (C.7.6.2), shared by all slices.
    ds.ImageOrientationPatient = [_ds(v) for v in (*volume.row_direction, *volume.column_direction)]
    ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[2])]
    # Image Pixel (C.7.6.3).
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(volume.array.shape[1]), int(volume.array.shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.AcquisitionNumber = 1
    return ds


def _window(array: npt.NDArray[np.floating]) -> tuple[float, float]:
    """VOI window (centre, width) covering the 0.5-99.5 percentiles of the non-zero voxels."""
    values = array[array != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float(lo + hi) / 2.0, max(float(hi - lo), 1e-3)


def write_volume_series(
    volume: Volume,
    out_dir: Path,
    *,
    modality: str = "T1",
    series_number: int = 1,
    study: Dataset | None = None,
    patient: SyntheticPatient | None = None,
    progress: ProgressCallback | None = None,
    description: str | None = None,
) -> SeriesInfo:
    """Write ``volume`` as one MR Image Storage series, one file per slice, in ``out_dir``.

    The Image Plane module (PS3.3 C.7.6.2) comes from the volume's geometry as it is, oblique or
    not: ImageOrientationPatient from its row and column directions, ImagePositionPatient of slice
    ``k`` at ``origin + k * slice spacing * slice_direction``, PixelSpacing (row, column spacing),
    SliceThickness and SpacingBetweenSlices the slice spacing (contiguous slices).

    Parameters
    ----------
    volume:
        Image and geometry; ``volume.array[k]`` becomes the file ``IM{k+1:04d}.dcm``.
    out_dir:
        Folder for the files (created).
    modality:
        Which :data:`PROTOCOLS` entry supplies the acquisition attributes.
    series_number:
        SeriesNumber.
    study:
        Study-level attributes (from another series of the same study); a new study is made when None.
    patient:
        Synthetic patient for a new study.
    progress:
        Called with 1 after each file.
    description:
        SeriesDescription and ProtocolName (default: the protocol's, e.g. ``"AX FLAIR"``).

    Returns
    -------
    SeriesInfo
        With fresh SeriesInstanceUID and the files in slice order.
    """
    if modality not in PROTOCOLS:
        raise ConverterError(f"modality {modality!r} has no MR protocol; known: {sorted(PROTOCOLS)}")
    if volume.array.ndim != 3 or min(volume.array.shape) < 1:
        raise ConverterError(f"{modality}: expected a non-empty 3D array, got shape {volume.array.shape}")
    if study is None:
        study = _study_dataset(
            patient or SyntheticPatient(), generate_uid(), generate_uid(), dt.datetime.now(), "MR BRAIN"
        )
    protocol = PROTOCOLS[modality]
    if description is not None:
        protocol = dataclasses.replace(protocol, description=description)
    encoding = encode_pixels(volume.array, what=f"{modality} image")
    if not encoding.exact:
        logger.info("%s: non-integer values quantised with RescaleSlope %g", modality, encoding.slope)
    series_uid = generate_uid()
    series = _series_dataset(study, protocol, volume, series_uid, series_number)
    series.PixelRepresentation = 1 if encoding.signed else 0
    if not encoding.exact:
        series.RescaleIntercept = _ds(encoding.intercept)
        series.RescaleSlope = _ds(encoding.slope)
        series.RescaleType = "US"
    centre, width = _window(volume.array)
    series.WindowCenter, series.WindowWidth = _ds(centre), _ds(width)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = SeriesInfo(modality, series_uid, series_number, protocol.description)
    for k in range(volume.array.shape[0]):
        path = out_dir / f"IM{k + 1:04d}.dcm"
        _write_slice(series, volume, encoding.stored[k], k, path)
        info.files.append(path)
        if progress is not None:
            progress(1)
    logger.debug("wrote series %s (%s, %d files)", series_uid, modality, len(info.files))
    return info


def _write_slice(
    series: Dataset, volume: Volume, pixels: npt.NDArray[np.integer], k: int, path: Path
) -> None:
    ds = copy.copy(series)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = k + 1
    ds.InstanceCreationDate, ds.InstanceCreationTime = series.StudyDate, series.StudyTime
    ds.ContentDate, ds.ContentTime = series.StudyDate, series.StudyTime
    position = volume.origin + k * volume.spacing[0] * volume.slice_direction
    ds.ImagePositionPatient = [_ds(v) for v in position]
    normal = np.cross(volume.row_direction, volume.column_direction)
    ds.SliceLocation = _ds(float(position @ normal))
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def write_study(
    case: Case,
    out_dir: Path,
    *,
    modalities: Sequence[str] | None = None,
    patient: SyntheticPatient | None = None,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
) -> StudyInfo:
    """Write ``case`` as a DICOM MR study: one axial series per modality, one file per slice.

    Parameters
    ----------
    case:
        The case; its affine becomes ImageOrientationPatient/ImagePositionPatient/PixelSpacing (RAS is
        converted to LPS; axes are only permuted/flipped, never resampled).
    out_dir:
        Folder; series ``n`` of modality ``M`` goes to ``out_dir/<nn>_<M>/IM0001.dcm`` ...
    modalities:
        Which modalities to write (default: every one the case has, in :data:`MODALITIES` order).
    patient:
        Synthetic patient attributes; by default derived from ``seed`` (or a fixed fake patient).
    seed:
        Seed for the synthetic patient when ``patient`` is None. UIDs are always fresh.
    progress:
        Called with 1 after each file written.

    Returns
    -------
    StudyInfo
        Study, frame of reference and per-modality series UIDs and files.
    """
    chosen = list(modalities) if modalities is not None else [m for m in MODALITIES if m in case.images]
    unknown = [m for m in chosen if m not in case.images]
    if unknown or not chosen:
        raise ConverterError(
            f"case {case.case_id}: modalities {unknown or chosen} not in the case {sorted(case.images)}"
        )
    volumes = {modality: case_to_volume(case, modality) for modality in chosen}
    info = write_volumes(volumes, out_dir, patient=patient, seed=seed, progress=progress)
    logger.info("case %s: wrote %d series, %d files", case.case_id, len(info.series), info.n_files)
    return info


def write_volumes(
    volumes: Mapping[str, Volume],
    out_dir: Path,
    *,
    descriptions: Mapping[str, str] | None = None,
    patient: SyntheticPatient | None = None,
    seed: int | None = None,
    progress: ProgressCallback | None = None,
) -> StudyInfo:
    """Write volumes (any geometry: axial, sagittal, coronal, oblique) as one DICOM MR study.

    Parameters
    ----------
    volumes:
        Modality (a :data:`PROTOCOLS` key) -> volume; each becomes one series, written by
        :func:`write_volume_series` in ``out_dir/<nn>_<modality>/``.
    out_dir:
        Folder of the study.
    descriptions:
        Modality -> SeriesDescription (e.g. ``"SAG FLAIR"``); the protocol's by default.
    patient, seed:
        Synthetic patient attributes (see :func:`write_study`).
    progress:
        Called with 1 after each file written.

    Returns
    -------
    StudyInfo
        Study, frame of reference and per-modality series UIDs and files.
    """
    if patient is None:
        patient = SyntheticPatient.from_seed(seed) if seed is not None else SyntheticPatient()
    study_uid, frame_uid = generate_uid(), generate_uid()
    study = _study_dataset(patient, study_uid, frame_uid, dt.datetime.now(), "MR BRAIN TUMOUR (converted)")
    info = StudyInfo(study_uid, frame_uid, Path(out_dir))
    for modality, volume in volumes.items():
        number = MODALITIES.index(modality) + 1 if modality in MODALITIES else len(MODALITIES) + 1
        folder = Path(out_dir) / f"{number:02d}_{modality}"
        info.series[modality] = write_volume_series(
            volume,
            folder,
            modality=modality,
            series_number=number,
            study=study,
            progress=progress,
            description=(descriptions or {}).get(modality),
        )
    return info
