"""Exact (no resampling) reorientation between DICOM volumes and canonical RAS+ arrays.

A :class:`~converters.volume.Volume` is indexed ``[slice, row, column]`` on a DICOM LPS grid; a
:class:`~converters.case.Case` image is indexed ``[x, y, z]`` in the closest canonical RAS+ voxel order
(``nibabel.as_closest_canonical``). These functions only permute and flip axes, so values are carried
over exactly and :func:`ras_to_volume` is the exact inverse of :func:`volume_to_ras`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
from nibabel import orientations

from converters.case import Case
from converters.exceptions import ConverterError
from converters.volume import Volume

#: LPS <-> RAS: negate x and y (PS3.3 C.7.6.2.1.1 defines the patient coordinates as LPS).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Axes whose cosines have a dot product above this are not orthogonal.
ORTHOGONALITY_TOLERANCE = 1e-4

_RAS = orientations.axcodes2ornt(("R", "A", "S"))
_LPS = orientations.axcodes2ornt(("L", "P", "S"))


def _reorient(
    array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], target: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """Permute/flip the first three axes of ``array`` to ``target``; return it and its new affine."""
    start = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(start, target)
    out = orientations.apply_orientation(array, transform)
    new_affine = affine @ orientations.inv_ornt_aff(transform, array.shape[:3])
    return np.ascontiguousarray(out), np.asarray(new_affine, dtype=np.float64)


def volume_ras_affine(volume: Volume) -> npt.NDArray[np.float64]:
    """4x4 affine mapping (column, row, slice) indices of ``volume`` to RAS+ millimetres."""
    return np.asarray(LPS_TO_RAS @ volume.affine, dtype=np.float64)


def volume_to_ras(volume: Volume) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """The volume's array in closest canonical RAS+ voxel order, and its RAS affine.

    Parameters
    ----------
    volume:
        A volume read from DICOM (``array[slice, row, column]``).

    Returns
    -------
    tuple[ndarray, ndarray]
        Array of shape (X, Y, Z) (a permutation/flip of ``volume.array``, values untouched) and the
        4x4 affine mapping its indices to RAS+ mm, as ``nibabel.as_closest_canonical`` would give.
    """
    xyz = np.transpose(volume.array, (2, 1, 0))
    out, affine = _reorient(xyz, volume_ras_affine(volume), _RAS)
    return out.astype(np.float32, copy=False), affine


def ras_to_volume(array_xyz: npt.NDArray[np.generic], volume: Volume) -> npt.NDArray[np.generic]:
    """Exact inverse of :func:`volume_to_ras`: an (X, Y, Z) array back to ``volume``'s (slice, row, col).

    Parameters
    ----------
    array_xyz:
        Array on the canonical grid of ``volume_to_ras(volume)`` (any dtype, e.g. a uint8 mask).
    volume:
        The source volume that defines the target grid.

    Returns
    -------
    ndarray
        Same dtype, shape ``volume.array.shape``.
    """
    return np.ascontiguousarray(_in_volume_order(array_xyz, volume))


def _in_volume_order(array_xyz: npt.NDArray[np.generic], volume: Volume) -> npt.NDArray[np.generic]:
    """``array_xyz`` (on ``volume``'s canonical RAS grid) seen in the volume's (slice, row, column)
    order: a view, axes permuted and flipped; raises ConverterError for an array of another shape."""
    start = orientations.io_orientation(volume_ras_affine(volume))
    expected = tuple(int(n) for n in np.asarray(volume.array.shape)[::-1][np.argsort(start[:, 0])])
    if tuple(array_xyz.shape) != expected:
        raise ConverterError(
            f"array shape {tuple(array_xyz.shape)} does not match the canonical grid {expected} "
            f"of series {volume.series_instance_uid}"
        )
    back = orientations.apply_orientation(array_xyz, orientations.ornt_transform(_RAS, start))
    return np.transpose(back, (2, 1, 0))


def share_ras_pixels(volume: Volume, array_xyz: npt.NDArray[np.float32]) -> Volume:
    """``volume`` whose ``array`` is a read-only view of ``array_xyz`` (``volume_to_ras(volume)``'s
    array) in the volume's own (slice, row, column) order: the same values, one copy of them in memory
    instead of two. ``array_xyz`` is made read-only too, so that neither can change behind the other.

    Raises
    ------
    ConverterError
        ``array_xyz`` is not on the volume's canonical grid.
    """
    view = np.asarray(_in_volume_order(array_xyz, volume), dtype=np.float32)  # a view: float32 already
    array_xyz.setflags(write=False)
    view.setflags(write=False)
    return dataclasses.replace(volume, array=view)


def _check_orthogonal(affine: npt.NDArray[np.float64], what: str) -> npt.NDArray[np.float64]:
    """Column norms of the affine's 3x3 part, after checking its axes are orthogonal."""
    axes = affine[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if np.any(norms <= 0):
        raise ConverterError(f"{what}: affine has a zero-length axis (voxel sizes {norms.tolist()})")
    unit = axes / norms
    gram = unit.T @ unit
    off = float(np.max(np.abs(gram - np.eye(3))))
    if off > ORTHOGONALITY_TOLERANCE:
        raise ConverterError(
            f"{what}: affine axes are not orthogonal (largest cosine {off:.2g}); DICOM needs orthogonal axes"
        )
    return np.asarray(norms, dtype=np.float64)


def array_to_volume(
    array_xyz: npt.NDArray[np.floating], ras_affine: npt.NDArray[np.float64], *, what: str = "array"
) -> Volume:
    """An (X, Y, Z) array with a RAS affine as a :class:`Volume` of axial-like slices.

    The axes are permuted/flipped (no resampling) so that columns run closest to patient left,
    rows closest to posterior and slices closest to superior: the usual axial DICOM order, with
    ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]`` for an axis-aligned grid.

    Parameters
    ----------
    array_xyz:
        Image indexed (i, j, k).
    ras_affine:
        4x4 affine mapping (i, j, k) to RAS+ mm; its axes must be orthogonal.
    what:
        Name of the source for error messages.

    Returns
    -------
    Volume
        float32 array ``[slice, row, column]`` and its LPS geometry; no UIDs.
    """
    if array_xyz.ndim != 3:
        raise ConverterError(f"{what}: expected a 3D array, got shape {array_xyz.shape}")
    _check_orthogonal(np.asarray(ras_affine, dtype=np.float64), what)
    lps_order, ras_aff = _reorient(array_xyz, np.asarray(ras_affine, dtype=np.float64), _LPS)
    lps_aff = LPS_TO_RAS @ ras_aff  # the same matrix converts RAS -> LPS
    norms = np.linalg.norm(lps_aff[:3, :3], axis=0)
    row_dir, col_dir, slice_dir = (lps_aff[:3, n] / norms[n] for n in range(3))
    return Volume(
        array=np.ascontiguousarray(np.transpose(lps_order, (2, 1, 0)), dtype=np.float32),
        origin=np.asarray(lps_aff[:3, 3], dtype=np.float64),
        row_direction=row_dir,
        column_direction=col_dir,
        slice_direction=slice_dir,
        spacing=(float(norms[2]), float(norms[1]), float(norms[0])),
    )


def case_to_volume(case: Case, modality: str) -> Volume:
    """One modality of ``case`` as an axial :class:`Volume` (see :func:`array_to_volume`)."""
    if modality not in case.images:
        raise ConverterError(f"case {case.case_id}: no {modality} image (has {sorted(case.images)})")
    volume = array_to_volume(case.images[modality], case.affine, what=f"case {case.case_id} {modality}")
    volume.modality_hint = modality
    return volume
