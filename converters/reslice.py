"""A case re-acquired as a scanner would: another slice orientation, slice thickness, pixel size, bias.

Test data for the node's world-space front end, made from real cases (BraTS 1 mm RAS volumes): the
same head written as a sagittal, coronal, oblique or thick-slice axial series. Every image is
resampled in world space from the case's affine (:func:`converters.resample.resample_to_grid`),
never by permuting axes:

* a slice thicker than the source voxels averages the source over the slab (box profile, one
  sample per source millimetre), as a 2D acquisition's partial-volume effect does;
* the label map goes along by nearest neighbour at each voxel centre: the ground truth on the new
  series' own grid, for scoring what the node sends back;
* an optional bias field multiplies the image by a smooth, seeded field (a random quadratic in
  world coordinates whose log spans ``±bias_field`` over the head).

Orientations (patient LPS directions, PS3.3 C.7.6.2.1.1), the series centred on the head:

=========  ==============================  =========================
name       ImageOrientationPatient         slices run towards
=========  ==============================  =========================
axial      1 0 0 / 0 1 0                    head (S)
sagittal   0 1 0 / 0 0 -1                   right (R)
coronal    1 0 0 / 0 0 -1                   back (P)
oblique    axial tilted by ``tilt_degrees`` about the left-right axis
=========  ==============================  =========================

:func:`reslice_case` gives volumes that :func:`converters.dicom_writer.write_volumes` writes as a study.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.case import MODALITIES, Case
from converters.exceptions import ConverterError
from converters.reorient import LPS_TO_RAS
from converters.resample import extreme_voxels, resample_to_grid, rotation, world_points
from converters.volume import Volume

logger = logging.getLogger(__name__)

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")

#: (row direction, column direction) in LPS for each orientation before any tilt.
_DIRECTIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "oblique": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

_PREFIX = {"axial": "AX", "oblique": "OBL AX", "sagittal": "SAG", "coronal": "COR"}


@dataclass(frozen=True)
class SeriesPlan:
    """How to re-acquire a case.

    Attributes
    ----------
    orientation:
        One of :data:`ORIENTATIONS`.
    pixel_spacing_mm:
        In-plane pixel size (square pixels).
    slice_thickness_mm:
        Slice thickness, also the spacing between slices (contiguous slices).
    tilt_degrees:
        Tilt of an ``oblique`` series about the patient's left-right axis (ignored otherwise).
    fov_mm:
        In-plane field of view (square).
    bias_field:
        Half the span of the log of the multiplicative bias field over the head (0: none; 0.3 gives
        a field from about 0.74 to 1.35).
    seed:
        Seed of the bias field.
    """

    orientation: str = "axial"
    pixel_spacing_mm: float = 1.0
    slice_thickness_mm: float = 1.0
    tilt_degrees: float = 20.0
    fov_mm: float = 240.0
    bias_field: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise ConverterError(f"orientation {self.orientation!r} is not one of {', '.join(ORIENTATIONS)}")
        if self.pixel_spacing_mm <= 0 or self.slice_thickness_mm <= 0 or self.fov_mm <= 0:
            raise ConverterError(
                f"pixel spacing {self.pixel_spacing_mm}, slice thickness {self.slice_thickness_mm} and "
                f"field of view {self.fov_mm} (mm) must be positive"
            )

    @property
    def description(self) -> str:
        """A SeriesDescription prefix, e.g. ``"SAG"`` or ``"OBL AX"``."""
        return _PREFIX[self.orientation]


@dataclass
class ReslicedCase:
    """A case on a new series geometry.

    Attributes
    ----------
    volumes:
        Modality -> image on the new geometry (``array[slice, row, column]``, LPS geometry).
    label:
        Decathlon labels on the same grid (slice, row, column), or None for an unlabelled case.
    plan:
        How it was made.
    """

    volumes: dict[str, Volume]
    label: npt.NDArray[np.uint8] | None
    plan: SeriesPlan

    @property
    def reference(self) -> Volume:
        """The first volume (all share one geometry)."""
        return next(iter(self.volumes.values()))


def series_directions(plan: SeriesPlan) -> tuple[npt.NDArray[np.float64], ...]:
    """Row, column and slice directions (LPS unit vectors) of ``plan``'s orientation."""
    row, col = (np.asarray(v, dtype=np.float64) for v in _DIRECTIONS[plan.orientation])
    if plan.orientation == "oblique":
        tilt = rotation("x", plan.tilt_degrees)
        row, col = tilt @ row, tilt @ col
    return row, col, np.cross(row, col)


def plan_geometry(case: Case, plan: SeriesPlan) -> Volume:
    """An empty volume with ``plan``'s geometry centred on the head of ``case``.

    In-plane the field of view is ``plan.fov_mm``; the slices cover the head (the non-zero voxels
    of every image) along the slice direction with one slice to spare at each end. The first voxel's
    centre lies on a voxel centre of the case (moved by at most half a voxel).
    """
    region = np.logical_or.reduce([np.asarray(v) != 0 for v in case.images.values()])
    if not region.any():
        raise ConverterError(f"case {case.case_id}: every image is zero; nothing to re-acquire")
    lps = world_points(LPS_TO_RAS @ case.affine, extreme_voxels(region))
    row, col, normal = series_directions(plan)
    centre = (lps.min(axis=0) + lps.max(axis=0)) / 2.0
    depth = lps @ normal
    thick = plan.slice_thickness_mm
    n_slices = int(np.ceil((depth.max() - depth.min()) / thick)) + 3
    n_pixels = max(1, round(plan.fov_mm / plan.pixel_spacing_mm))
    ps = plan.pixel_spacing_mm
    origin = centre - (n_pixels - 1) / 2.0 * ps * (row + col) - (n_slices - 1) / 2.0 * thick * normal
    # The first voxel centre on a voxel centre of the case: where the new grid runs along the case's
    # axes at a multiple of its spacing every voxel centre then falls on one, and the nearest-neighbour
    # label samples the very voxel the image's slab is centred on. Off the grid by half a voxel (a
    # field of view centred on the head) each label voxel was a tie between two of the case's voxels,
    # always broken the same way: the truth moved half a voxel from its image.
    source = np.asarray(LPS_TO_RAS @ case.affine, dtype=np.float64)
    index = np.linalg.solve(source[:3, :3], origin - source[:3, 3])
    origin = origin + source[:3, :3] @ (np.round(index) - index)
    return Volume(
        array=np.zeros((n_slices, n_pixels, n_pixels), dtype=np.float32),
        origin=origin,
        row_direction=row,
        column_direction=col,
        slice_direction=normal,
        spacing=(thick, ps, ps),
    )


def _target_ras(volume: Volume) -> tuple[npt.NDArray[np.float64], tuple[int, int, int]]:
    """RAS affine and shape of ``volume``'s (column, row, slice) index grid."""
    n_slices, n_rows, n_cols = volume.array.shape
    return np.asarray(LPS_TO_RAS @ volume.affine, dtype=np.float64), (n_cols, n_rows, n_slices)


def _to_slices(xyz: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    return np.ascontiguousarray(np.transpose(xyz, (2, 1, 0)))


def slab_average(
    image: npt.NDArray[np.floating], affine: npt.NDArray[np.float64], geometry: Volume
) -> npt.NDArray[np.float32]:
    """``image`` (on ``affine``, RAS) averaged over each slice's slab of ``geometry`` (slice, row, col)."""
    target, shape = _target_ras(geometry)
    source_step = float(np.min(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))
    thick = geometry.spacing[0]
    n = max(1, round(thick / source_step))
    offsets = (np.arange(n) + 0.5) / n * thick - thick / 2.0
    normal_ras = (LPS_TO_RAS[:3, :3] @ geometry.slice_direction).astype(np.float64)
    total = np.zeros(shape, dtype=np.float32)
    for offset in offsets:
        moved = target.copy()
        moved[:3, 3] += offset * normal_ras
        total += resample_to_grid(image, affine, moved, shape, order=1)
    return np.asarray(_to_slices(total / n), dtype=np.float32)


def bias_field(
    geometry: Volume, strength: float, seed: int, head: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float32]:
    """A smooth multiplicative field on ``geometry``'s grid (slice, row, col): exp of a random quadratic.

    The quadratic is in world coordinates (decimetres, centred on ``head``, a mask on the same grid)
    and scaled so that its span over ``head`` is ``[-strength, strength]``.
    """
    rng = np.random.default_rng(seed)
    n_slices, n_rows, n_cols = geometry.array.shape
    step = geometry.affine[:3, :3] / 100.0  # columns: mm per column, row, slice index, in dm
    k = np.arange(n_slices, dtype=np.float32)[:, None, None]
    r = np.arange(n_rows, dtype=np.float32)[None, :, None]
    c = np.arange(n_cols, dtype=np.float32)[None, None, :]
    coords = [
        np.float32(geometry.origin[a] / 100.0)
        + c * np.float32(step[a, 0])
        + r * np.float32(step[a, 1])
        + k * np.float32(step[a, 2])
        for a in range(3)
    ]
    coords = [x - np.float32(x[head].mean() if head.any() else x.mean()) for x in coords]
    linear = rng.normal(size=3)
    quadratic = rng.normal(size=(3, 3)) * 0.5
    log_field = np.zeros(head.shape, dtype=np.float32)
    for a in range(3):
        log_field += np.float32(linear[a]) * coords[a]
        for b in range(3):
            log_field += np.float32(quadratic[a, b]) * coords[a] * coords[b]
    inside = log_field[head] if head.any() else log_field
    lo, hi = float(inside.min()), float(inside.max())
    scaled = (log_field - np.float32((lo + hi) / 2.0)) * np.float32(strength / max((hi - lo) / 2.0, 1e-9))
    return np.exp(scaled).astype(np.float32)


def _scanner_like(image: npt.NDArray[Any]) -> bool:
    """Whether ``image`` holds non-negative whole numbers, as a scanner's (and BraTS 2021's) do."""
    values = np.asarray(image)
    return bool(values.min() >= 0) and bool(np.all(np.mod(values, 1) == 0))


def reslice_case(case: Case, plan: SeriesPlan, modalities: Sequence[str] | None = None) -> ReslicedCase:
    """``case`` re-acquired on ``plan``'s geometry (see the module notes).

    Parameters
    ----------
    case:
        A case (images and label on one RAS grid).
    plan:
        Orientation, pixel size, slice thickness, tilt, field of view, bias field.
    modalities:
        Which images to take (default: every one, in :data:`MODALITIES` order).

    Returns
    -------
    ReslicedCase
        Volumes ready for :func:`converters.dicom_writer.write_volumes`, and the label on their grid.
    """
    chosen = list(modalities) if modalities is not None else [m for m in MODALITIES if m in case.images]
    missing = [m for m in chosen if m not in case.images]
    if missing or not chosen:
        raise ConverterError(
            f"case {case.case_id}: modalities {missing or chosen} not in {sorted(case.images)}"
        )
    geometry = plan_geometry(case, plan)
    target, shape = _target_ras(geometry)
    volumes: dict[str, Volume] = {}
    field = None
    for modality in chosen:
        source = case.images[modality]
        image = slab_average(source, case.affine, geometry)
        if plan.bias_field > 0:
            if field is None:
                field = bias_field(geometry, plan.bias_field, plan.seed, image > 0)
            image = image * field
        if _scanner_like(source):
            # Integer-valued like the scanner's and the source's pixels (stored exactly by the writer).
            image = np.rint(np.clip(image, 0, None)).astype(np.float32)
        # else a z-scored or float source (the BraTS 2013 cases): rounding and clipping at 0 left
        # 10 values and 71 % of the brain at 0; the writer stores floats with a RescaleSlope.
        volumes[modality] = Volume(
            array=image,
            origin=geometry.origin.copy(),
            row_direction=geometry.row_direction.copy(),
            column_direction=geometry.column_direction.copy(),
            slice_direction=geometry.slice_direction.copy(),
            spacing=geometry.spacing,
            modality_hint=f"{plan.description} {modality}",
        )
    label = None
    if case.label is not None:
        label = _to_slices(resample_to_grid(case.label.astype(np.uint8), case.affine, target, shape, order=0))
    logger.info(
        "case %s re-acquired %s: %d slices of %d x %d, %.2g mm pixels, %.2g mm slices",
        case.case_id, plan.orientation, *geometry.array.shape, plan.pixel_spacing_mm, plan.slice_thickness_mm,
    )  # fmt: skip
    return ReslicedCase(volumes, None if label is None else np.asarray(label, dtype=np.uint8), plan)
