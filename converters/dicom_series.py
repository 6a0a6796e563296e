"""DICOM series -> :class:`~converters.volume.Volume`.

Single-frame series (MR/CT Image Storage, one slice per instance) and Enhanced (multi-frame) MR Image
Storage are read. Slices are ordered by ImagePositionPatient projected on the slice normal (the cross
product of the two ImageOrientationPatient cosines, PS3.3 C.7.6.2.1.1), never by InstanceNumber or file
name; the slice spacing is measured from the positions, not taken from SliceThickness or
SpacingBetweenSlices (but a one-slice series, with nothing to measure, takes them: from the Pixel
Measures functional group of a multi-frame image); RescaleSlope and RescaleIntercept (PS3.3 C.11.1)
are applied per slice.

Refused, with :class:`~converters.exceptions.InvalidSeriesError` naming the series and the problem:
more than one series, mixed orientations, mixed sizes (Rows/Columns) or pixel spacings, duplicate
positions, positions off the slice normal, missing slices (uneven gaps), positions drifting off a regular
stack (gaps each near the mean that add up, :data:`SLICE_POSITION_TOLERANCE`), missing or short pixel
data, colour images. The geometry checks allow for positions and cosines written rounded
(:data:`POSITION_TOLERANCE_MM`, :data:`NORMAL_TOLERANCE_RAD`, :data:`DIRECTION_TOLERANCE`). The node
gives this loader one stack at a time of a series holding several (planes, acquisitions:
node/selection.py ``_stacks``).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from converters.exceptions import InvalidSeriesError
from converters.volume import Volume

logger = logging.getLogger(__name__)

#: Two orientations differ when a cosine differs by more than this (plus a hair for the binary
#: representation: cosines written to 4 decimals, 0.7071 and 0.7072, are 1.00000000000001e-4 apart).
ORIENTATION_TOLERANCE = 1e-4 + 1e-12
#: A gap may differ from the mean spacing by this fraction (or by twice :data:`POSITION_TOLERANCE_MM`,
#: whichever is more) before a slice counts as missing.
GAP_TOLERANCE = 0.1
#: A slice may sit this fraction of the slice spacing (plus :data:`POSITION_TOLERANCE_MM`) away, along the
#: normal, from where the regular stack puts it (first position + k x mean spacing). Gaps each within
#: :data:`GAP_TOLERANCE` can still add up: two packages 4.4 then 4.0 mm apart put a slice 2.3 mm off.
SLICE_POSITION_TOLERANCE = 0.1
#: Positions closer than this (mm) along the normal are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-3
#: How far (mm) a written ImagePositionPatient may be from where a regular stack puts it. Some systems
#: write positions rounded to 0.1 or 0.01 mm: an oblique 1 mm stack then has uneven gaps of up to
#: ~0.17 mm and positions up to ~0.09 mm off the line along its normal, a tenth of a voxel or less.
POSITION_TOLERANCE_MM = 0.1
#: How far (radians) the slice normal computed from a rounded ImageOrientationPatient may point from the
#: stack's true direction: the allowed distance off the line grows by this much per mm along the normal.
NORMAL_TOLERANCE_RAD = 1e-3
#: ImageOrientationPatient's two vectors may be this far from unit length and orthogonality (rounded
#: cosines); they are then made orthonormal.
DIRECTION_TOLERANCE = 1e-2

ENHANCED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
}


@dataclass
class _Slice:
    """One 2D frame with its geometry, before sorting."""

    label: str  # SOPInstanceUID (plus frame number for multi-frame), for messages
    sop_uid: str
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slope: float
    intercept: float
    pixels: Callable[[], npt.NDArray[np.generic]]


def _series_name(ds: Dataset) -> str:
    return f"series {ds.get('SeriesInstanceUID', '(no SeriesInstanceUID)')}"


def _floats(value: object, n: int, where: str, keyword: str) -> npt.NDArray[np.float64]:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise InvalidSeriesError(f"{where}: {keyword} = {value!r} is not {n} numbers") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InvalidSeriesError(f"{where}: {keyword} = {value!r} is not {n} numbers")
    return out


def _read(item: Path | Dataset) -> Dataset:
    if isinstance(item, Dataset):
        return item
    try:
        return pydicom.dcmread(str(item))
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InvalidSeriesError(f"{item}: not a readable DICOM file ({exc})") from exc


def _expected_bytes(ds: Dataset, frames: int) -> int:
    return (
        int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("SamplesPerPixel", 1))
        * int(ds.BitsAllocated)
        // 8
        * frames
    )


def _check_pixel_data(ds: Dataset, where: str, frames: int) -> None:
    """Refuse missing pixel data, colour images and (uncompressed) pixel data shorter than declared."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InvalidSeriesError(f"{where}: missing pixel data (no PixelData element)")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds:
            raise InvalidSeriesError(f"{where}: missing {keyword}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidSeriesError(f"{where}: SamplesPerPixel = {ds.SamplesPerPixel}; only grey-scale images")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    compressed = bool(syntax is not None and syntax.is_compressed)
    if "PixelData" in ds and not compressed:
        have, need = len(ds.PixelData), _expected_bytes(ds, frames)
        if have < need:
            raise InvalidSeriesError(
                f"{where}: pixel data is {have} bytes but Rows {ds.Rows} x Columns {ds.Columns} x "
                f"{ds.BitsAllocated} bits x {frames} frame(s) needs {need}"
            )


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """``ds`` itself, or a shallow copy with a Transfer Syntax in its file meta so pydicom can decode it.

    Datasets decoded from the network (e.g. a C-STORE request before its file meta is attached) carry
    their native pixel data in the encoding they were received in (PS3.5 A.1, A.2).
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = getattr(ds, "original_encoding", (False, True))
    out = copy.copy(ds)
    out.file_meta = FileMetaDataset()
    if little is False:
        out.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        out.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return out


#: Transfer syntaxes whose Pixel Data is the native little-endian bytes (PS3.5 A.1, A.2, A.5: a
#: deflated data set is inflated when it is read).
_NATIVE_LITTLE_ENDIAN = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)


@functools.cache
def readable_transfer_syntaxes(candidates: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``candidates`` whose pixel data this installation can decode, in their order.

    Native (uncompressed, deflated, big-endian) syntaxes always; a compressed one when a pydicom
    decoder for it has its plugin installed (python-gdcm brings JPEG lossless and lossy, JPEG-LS and
    JPEG 2000; pydicom decodes RLE itself). The SCP accepts MR images only in these, so that a PACS
    never has an image acknowledged that the node could not read (node/scp.py).
    """
    readable = []
    for candidate in candidates:
        uid = UID(candidate)
        if not uid.is_compressed:
            readable.append(candidate)
            continue
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:  # pydicom has no decoder for it at all (video, JPEG XL, JPIP)
            continue
        if decoder.is_available:
            readable.append(candidate)
    return tuple(readable)


def _native_pixels(ds: Dataset) -> npt.NDArray[np.generic] | None:
    """The pixels of a single-frame grey-scale image whose Pixel Data is native little-endian, read
    straight from its bytes; None for any other image (pydicom decodes those: compressed, big-endian,
    1-bit, a high bit not at the top of the stored bits, float).

    The values pydicom's ``pixel_array`` gives (the bits above BitsStored masked off, or the sign
    extended from them; tests/converters/test_dicom.py), without its decoder's set-up per
    instance (~0.7 ms, a third of reading a series of 240 x 240 slices).
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    bits, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if bits not in (8, 16, 32) or not isinstance(stored, int) or not 1 <= stored <= bits:
        return None
    if ds.get("HighBit", stored - 1) != stored - 1 or ds.get("SamplesPerPixel", 1) != 1:
        return None
    if int(ds.get("NumberOfFrames") or 1) != 1:
        return None
    signed = ds.get("PixelRepresentation") == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    rows, columns = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if len(data) < _expected_bytes(ds, 1):
        return None
    pixels = np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)
    unused = bits - stored
    if unused == 0:
        return pixels
    if signed:  # the stored bits' sign extended over the unused ones
        return np.right_shift(np.left_shift(pixels, unused), unused)
    return np.bitwise_and(pixels, dtype.type((1 << stored) - 1))


def _pixels(ds: Dataset, where: str) -> npt.NDArray[np.generic]:
    native = _native_pixels(ds)
    if native is not None:
        return _as_monochrome2(ds, native, where)
    try:
        decoded = np.asarray(_with_transfer_syntax(ds).pixel_array)
    except Exception as exc:  # decoder errors come in many types
        raise InvalidSeriesError(f"{where}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    return _as_monochrome2(ds, decoded, where)


def _as_monochrome2(ds: Dataset, pixels: npt.NDArray[np.generic], where: str) -> npt.NDArray[np.generic]:
    """MONOCHROME1 stored values (the lowest shown white, PS3.3 C.7.6.3.1.2) turned the other way up,
    so that a FLAIR's lesion is bright as the model learnt it: an unsigned value v becomes
    (2^BitsStored - 1) - v, a signed one -1 - v, the inversion that keeps the stored range (the same
    for every image of a series). Rescale Slope and Intercept apply after it, as before."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric != "MONOCHROME1":
        return pixels
    if pixels.dtype.kind == "i":
        return np.invert(pixels)
    if pixels.dtype.kind != "u":
        raise InvalidSeriesError(f"{where}: MONOCHROME1 with {pixels.dtype} pixel data cannot be inverted")
    stored = int(ds.get("BitsStored") or 8 * pixels.dtype.itemsize)
    return np.subtract(np.asarray((1 << stored) - 1, dtype=pixels.dtype), pixels)


def _rescale(ds: Dataset, where: str) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (PS3.3 C.11.1.1.2): one finite number each (absent: 1 and 0)."""
    return _rescale_values(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), where)


def _rescale_values(slope: Any, intercept: Any, where: str) -> tuple[float, float]:
    """A slope and an intercept as :func:`_rescale` reads them, wherever they were found (a frame's
    Pixel Value Transformation group of an Enhanced MR image too)."""
    out: list[float] = []
    for keyword, value, default in (("RescaleSlope", slope, 1.0), ("RescaleIntercept", intercept, 0.0)):
        try:
            number = float(value or default)
        except (TypeError, ValueError) as exc:
            raise InvalidSeriesError(f"{where}: {keyword} = {value!r} is not a number") from exc
        if not np.isfinite(number):
            raise InvalidSeriesError(f"{where}: {keyword} = {value!r} is not a finite number")
        out.append(number)
    return out[0], out[1]


def _single_frame_slice(ds: Dataset, series: str) -> _Slice:
    sop = str(ds.get("SOPInstanceUID", "?"))
    where = f"{series} instance {sop}"
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds:
            raise InvalidSeriesError(f"{where}: missing {keyword}")
    _check_pixel_data(ds, where, 1)
    spacing = _floats(ds.PixelSpacing, 2, where, "PixelSpacing")
    slope, intercept = _rescale(ds, where)
    return _Slice(
        label=sop,
        sop_uid=sop,
        position=_floats(ds.ImagePositionPatient, 3, where, "ImagePositionPatient"),
        orientation=_floats(ds.ImageOrientationPatient, 6, where, "ImageOrientationPatient"),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        slope=slope,
        intercept=intercept,
        pixels=lambda: _pixels(ds, where),
    )


def _functional(ds: Dataset, frame: Dataset | None, sequence: str, keyword: str, where: str) -> object:
    """``keyword`` from the per-frame functional group ``sequence``, else from the shared one."""
    groups = [frame] if frame is not None else []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None


def _multi_frame_slices(ds: Dataset, series: str) -> list[_Slice]:
    sop = str(ds.get("SOPInstanceUID", "?"))
    where = f"{series} instance {sop}"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        found = len(per_frame) if per_frame else 0
        raise InvalidSeriesError(
            f"{where}: PerFrameFunctionalGroupsSequence has {found} items, NumberOfFrames {frames}"
        )
    _check_pixel_data(ds, where, frames)
    cache: dict[str, npt.NDArray[np.generic]] = {}

    def frame_pixels(index: int) -> Callable[[], npt.NDArray[np.generic]]:
        def get() -> npt.NDArray[np.generic]:
            if "all" not in cache:
                data = _pixels(ds, where)
                cache["all"] = data.reshape(frames, int(ds.Rows), int(ds.Columns))
            return cache["all"][index]

        return get

    slices: list[_Slice] = []
    for index, frame in enumerate(per_frame):
        fwhere = f"{where} frame {index + 1}"
        position = _functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient", fwhere)
        orientation = _functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient", fwhere)
        spacing = _functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing", fwhere)
        for keyword, value in (
            ("PlanePositionSequence/ImagePositionPatient", position),
            ("PlaneOrientationSequence/ImageOrientationPatient", orientation),
            ("PixelMeasuresSequence/PixelSpacing", spacing),
        ):
            if value is None:
                raise InvalidSeriesError(f"{fwhere}: missing {keyword}")
        slope, intercept = _rescale_values(
            _functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope", fwhere),
            _functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept", fwhere),
            fwhere,
        )
        pixel_spacing = _floats(spacing, 2, fwhere, "PixelSpacing")
        slices.append(
            _Slice(
                label=f"{sop} frame {index + 1}",
                sop_uid=sop,
                position=_floats(position, 3, fwhere, "ImagePositionPatient"),
                orientation=_floats(orientation, 6, fwhere, "ImageOrientationPatient"),
                pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=slope,
                intercept=intercept,
                pixels=frame_pixels(index),
            )
        )
    return slices


def _is_multi_frame(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) in ENHANCED_SOP_CLASSES or "PerFrameFunctionalGroupsSequence" in ds


def _check_consistent(slices: list[_Slice], series: str) -> None:
    first = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise InvalidSeriesError(
                f"{series}: mixed orientations: ImageOrientationPatient {s.orientation.round(5).tolist()} "
                f"in {s.label} vs {first.orientation.round(5).tolist()} in {first.label}"
            )
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InvalidSeriesError(
                f"{series}: mixed sizes: Rows x Columns {s.rows}x{s.columns} in {s.label} "
                f"vs {first.rows}x{first.columns} in {first.label}"
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-5):
            raise InvalidSeriesError(
                f"{series}: mixed pixel spacings: PixelSpacing {list(s.pixel_spacing)} in {s.label} "
                f"vs {list(first.pixel_spacing)} in {first.label}"
            )


def _directions(
    orientation: npt.NDArray[np.float64], series: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    row, col = orientation[:3], orientation[3:]
    tol = DIRECTION_TOLERANCE
    if abs(np.linalg.norm(row) - 1) > tol or abs(np.linalg.norm(col) - 1) > tol or abs(row @ col) > tol:
        raise InvalidSeriesError(
            f"{series}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors"
        )
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row  # rounded cosines: the nearest orthonormal pair (Gram-Schmidt)
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _order_and_spacing(
    slices: list[_Slice], normal: npt.NDArray[np.float64], series: str
) -> tuple[list[_Slice], float]:
    """Slices sorted along the normal and the slice spacing; refuse duplicates and gaps."""
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.asarray([float(s.position @ normal) for s in ordered])
    gaps = np.diff(depth)
    for n, gap in enumerate(gaps):
        if gap < DUPLICATE_TOLERANCE_MM:
            raise InvalidSeriesError(
                f"{series}: duplicate positions: {ordered[n].label} and {ordered[n + 1].label} both at "
                f"{depth[n]:.3f} mm along the slice normal"
            )
    if len(ordered) == 1:
        return ordered, 0.0
    spacing = float(depth[-1] - depth[0]) / (len(ordered) - 1)
    bad = np.flatnonzero(np.abs(gaps - spacing) > max(GAP_TOLERANCE * spacing, 2 * POSITION_TOLERANCE_MM))
    if bad.size:
        n = int(bad[0])
        raise InvalidSeriesError(
            f"{series}: missing slices (uneven gaps): gap of {gaps[n]:.3f} mm between {ordered[n].label} and "
            f"{ordered[n + 1].label}, mean spacing {spacing:.3f} mm"
        )
    drift = np.abs(depth - (depth[0] + spacing * np.arange(len(ordered))))
    worst = int(np.argmax(drift))
    if drift[worst] > POSITION_TOLERANCE_MM + SLICE_POSITION_TOLERANCE * spacing:
        raise InvalidSeriesError(
            f"{series}: positions drift off a regular stack (uneven gaps): {ordered[worst].label} is "
            f"{drift[worst]:.3f} mm along the slice normal from where slice {worst} of a regular "
            f"{spacing:.3f} mm stack would be"
        )
    origin = ordered[0].position
    for s, d in zip(ordered, depth, strict=True):
        off = s.position - (origin + (d - depth[0]) * normal)
        if np.linalg.norm(off) > POSITION_TOLERANCE_MM + NORMAL_TOLERANCE_RAD * (d - depth[0]):
            raise InvalidSeriesError(
                f"{series}: ImagePositionPatient of {s.label} is {np.linalg.norm(off):.3f} mm off the line "
                "along the slice normal (tilted or sheared stack)"
            )
    return ordered, spacing


def _single_slice_spacing(ds: Dataset) -> float:
    """The slice spacing of a one-slice series, which has no second position to measure it from.

    SliceThickness, else SpacingBetweenSlices, else 1 mm. A slice with no neighbours stands for its own
    thickness; SliceThickness is what images carry (Type 2 in the Image Plane module), whereas the
    spacing to neighbours is optional and converters fill it with a placeholder (highdicom's Legacy
    Converted Enhanced MR image of one slice says 1.0 whatever its source says). A multi-frame image
    keeps both in its Pixel Measures functional group (PS3.3 C.7.6.16.2.1): the frame's first, then
    the shared one.
    """
    multi = _is_multi_frame(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frame = per_frame[0] if multi and per_frame else None
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        value = ds.get(keyword)
        if multi:
            value = _functional(ds, frame, "PixelMeasuresSequence", keyword, "") or value
        try:
            number = float(value) if value not in (None, "") else 0.0
        except (TypeError, ValueError):
            continue
        if np.isfinite(number) and number > 0:
            return number
    return 1.0


def load_series(items: Sequence[Path] | Sequence[Dataset] | Sequence[Path | Dataset]) -> Volume:
    """Assemble one DICOM series (files or datasets, any order) into a :class:`Volume`.

    Parameters
    ----------
    items:
        The instances of one series: single-frame images (one slice each) or one Enhanced
        (multi-frame) MR image.

    Returns
    -------
    Volume
        float32 ``array[slice, row, column]`` after RescaleSlope/Intercept, with slices ascending
        along the normal ``row_direction x column_direction``; ``spacing[0]`` measured from positions
        (one slice: its SliceThickness, else SpacingBetweenSlices, else 1 mm).

    Raises
    ------
    InvalidSeriesError
        Names the series (SeriesInstanceUID), the instance and the problem; see the module notes.
    """
    if not items:
        raise InvalidSeriesError("empty series: no instances given")
    datasets = [_read(item) for item in items]
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(uids) > 1:
        raise InvalidSeriesError(f"more than one series: SeriesInstanceUIDs {uids}")
    first = datasets[0]
    series = _series_name(first)
    multi = [ds for ds in datasets if _is_multi_frame(ds)]
    if multi and len(datasets) > 1:
        raise InvalidSeriesError(
            f"{series}: {len(datasets)} instances including {len(multi)} multi-frame; "
            "expected one multi-frame image alone"
        )
    slices = (
        _multi_frame_slices(first, series) if multi else [_single_frame_slice(ds, series) for ds in datasets]
    )
    _check_consistent(slices, series)
    row, col, normal = _directions(slices[0].orientation, series)
    ordered, slice_spacing = _order_and_spacing(slices, normal, series)
    if len(ordered) == 1:
        slice_spacing = _single_slice_spacing(first)
    array = np.empty((len(ordered), ordered[0].rows, ordered[0].columns), dtype=np.float32)
    for k, s in enumerate(ordered):
        pixels = s.pixels()
        if pixels.shape != (s.rows, s.columns):
            raise InvalidSeriesError(
                f"{series}: {s.label} decodes to shape {pixels.shape}, not {s.rows}x{s.columns}"
            )
        if s.slope == 1.0 and s.intercept == 0.0:
            array[k] = pixels  # the values the product gives, without a float64 copy of the slice
        else:
            array[k] = pixels.astype(np.float64) * s.slope + s.intercept
    volume = Volume(
        array=array,
        origin=ordered[0].position.copy(),
        row_direction=row,
        column_direction=col,
        slice_direction=normal,
        spacing=(slice_spacing, ordered[0].pixel_spacing[0], ordered[0].pixel_spacing[1]),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")) or None,
        series_instance_uid=uids[0] or None,
        study_instance_uid=str(first.get("StudyInstanceUID", "")) or None,
        sop_instance_uids=[s.sop_uid for s in ordered],
        modality_hint=str(first.get("SeriesDescription", "")),
    )
    logger.debug("%s: %d slices, spacing %s", series, len(ordered), volume.spacing)
    return volume


def load_series_folder(folder: Path) -> Volume:
    """:func:`load_series` on every file of ``folder`` except a DICOMDIR."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != "DICOMDIR")
    if not files:
        raise InvalidSeriesError(f"{folder}: no files")
    return load_series(files)
