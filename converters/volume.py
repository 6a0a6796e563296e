"""The :class:`Volume` type: a 3D image on a DICOM patient-coordinate (LPS) grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass
class Volume:
    """A scalar 3D image with its DICOM geometry.

    The array is indexed ``array[slice, row, column]`` and its geometry follows the DICOM
    Image Plane module (PS3.3 C.7.6.2): ``origin`` is the ImagePositionPatient of the first
    slice (centre of its first voxel, LPS mm), ``row_direction`` and ``column_direction`` are
    the two ImageOrientationPatient cosines (direction of increasing column index, and of
    increasing row index), ``spacing`` is (slice, row, column) spacing in mm, the slice
    spacing measured from positions, and ``slice_direction`` is the unit vector from the
    first slice to the next.

    Attributes
    ----------
    array:
        float32 voxel values after RescaleSlope/Intercept, shape (slices, rows, columns).
    origin, row_direction, column_direction, slice_direction:
        Geometry, each a length-3 float64 array in LPS.
    spacing:
        (slice spacing, row spacing, column spacing) in mm; the latter two are PixelSpacing.
    frame_of_reference_uid, series_instance_uid, study_instance_uid:
        UIDs of the source, when it came from DICOM.
    sop_instance_uids:
        Source instance UIDs in slice order (for a multi-frame source: one UID repeated).
    modality_hint:
        Free text about what the volume shows (e.g. SeriesDescription), never patient data.
    """

    array: npt.NDArray[np.float32]
    origin: npt.NDArray[np.float64]
    row_direction: npt.NDArray[np.float64]
    column_direction: npt.NDArray[np.float64]
    slice_direction: npt.NDArray[np.float64]
    spacing: tuple[float, float, float]
    frame_of_reference_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    sop_instance_uids: list[str] = field(default_factory=list)
    modality_hint: str = ""

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping (column, row, slice, 1) indices to LPS millimetres."""
        slice_sp, row_sp, col_sp = self.spacing
        out = np.eye(4)
        # Column index i moves along the row direction by the column spacing (PS3.3 C.7.6.2.1.1).
        out[:3, 0] = self.row_direction * col_sp
        out[:3, 1] = self.column_direction * row_sp
        out[:3, 2] = self.slice_direction * slice_sp
        out[:3, 3] = self.origin
        return out
