"""Resampling between voxel grids in world (patient) coordinates.

A grid is a 4x4 affine mapping voxel indices (i, j, k) to millimetres (RAS+ throughout this module)
and a shape. :func:`resample_to_grid` fills a target grid from a source grid through the full
affine of each, rotations and obliquity included (not by axis permutation): each target voxel
centre is mapped into the source's voxel coordinates and interpolated there with
``scipy.ndimage.affine_transform`` (linear for images, nearest neighbour for label maps), zero
outside the source; a voxel covers half a voxel either side of its centre, so the edge value holds
up to half a voxel past the outermost voxel centres. When the two grids differ only by a whole-voxel
shift the values are copied exactly, so a volume already on the target grid goes through untouched.

:func:`grid_shift` tells whether two grids are such shifted copies of each other.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from converters.exceptions import ConverterError

logger = logging.getLogger(__name__)

#: Largest deviation (in source voxels) of a grid mapping from a whole-voxel shift still copied exactly.
SHIFT_TOLERANCE = 1e-4


#: Blocks of whole voxels about this wide (mm) stand in for a grid finer than the models need
#: (:func:`reduction_factors`): brain masks (converters/brain_mask.py) and the four-series path
#: (node/pipeline.py) of a series reconstructed at 0.4-0.6 mm work on them.
BLOCK_MM = 1.0


def _check_grid(affine: npt.NDArray[Any], what: str) -> npt.NDArray[np.float64]:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ConverterError(f"{what} affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise ConverterError(f"{what} affine is singular (a zero-length or degenerate axis)")
    return affine


def source_from_target(
    source_affine: npt.NDArray[Any], target_affine: npt.NDArray[Any]
) -> npt.NDArray[np.float64]:
    """4x4 matrix taking target voxel indices to (continuous) source voxel indices."""
    source = _check_grid(source_affine, "source")
    target = _check_grid(target_affine, "target")
    return np.asarray(np.linalg.inv(source) @ target, dtype=np.float64)


def grid_shift(
    source_affine: npt.NDArray[Any], target_affine: npt.NDArray[Any]
) -> tuple[int, int, int] | None:
    """The whole-voxel offset ``s`` with ``source index = target index + s``, or None.

    None when the grids differ by anything else than such a shift (spacing, rotation, a fraction
    of a voxel) by more than :data:`SHIFT_TOLERANCE` source voxels.
    """
    matrix = source_from_target(source_affine, target_affine)
    offset = matrix[:3, 3]
    rounded = np.rint(offset)
    if np.max(np.abs(matrix[:3, :3] - np.eye(3))) > SHIFT_TOLERANCE:
        return None
    if np.max(np.abs(offset - rounded)) > SHIFT_TOLERANCE:
        return None
    return (int(rounded[0]), int(rounded[1]), int(rounded[2]))


def _span(start: int, size: int, extent: int) -> tuple[slice, slice]:
    """Source and destination slices of the window [start, start+size) over [0, extent)."""
    lo, hi = max(start, 0), min(start + size, extent)
    if hi <= lo:
        return slice(0, 0), slice(0, 0)
    return slice(lo, hi), slice(lo - start, hi - start)


def shifted_copy(
    array: npt.NDArray[Any], shift: tuple[int, int, int], shape: tuple[int, int, int], cval: float = 0
) -> npt.NDArray[Any]:
    """``out[t] = array[t + shift]`` for a target of ``shape``, ``cval`` where that leaves ``array``.

    Values are copied exactly, in ``array``'s dtype.
    """
    out = np.full(shape, cval, dtype=array.dtype)
    spans = [_span(shift[a], shape[a], array.shape[a]) for a in range(3)]
    out[tuple(d for _, d in spans)] = array[tuple(s for s, _ in spans)]
    return out


def resample_to_grid(
    array: npt.NDArray[Any],
    source_affine: npt.NDArray[Any],
    target_affine: npt.NDArray[Any],
    target_shape: tuple[int, int, int],
    *,
    order: int = 1,
    cval: float = 0.0,
) -> npt.NDArray[Any]:
    """Resample a 3D ``array`` from its grid onto a target grid in world coordinates.

    Parameters
    ----------
    array:
        Values on the source grid (i, j, k).
    source_affine, target_affine:
        4x4 voxel-to-world matrices (any rotation, obliquity or spacing).
    target_shape:
        Shape of the output.
    order:
        Interpolation order: 1 (trilinear, images; float32 out) or 0 (nearest neighbour, label
        maps; ``array``'s dtype out).
    cval:
        Value where a target voxel falls outside the source.

    Returns
    -------
    numpy.ndarray
        The values on the target grid; an exact copy when the grids differ by a whole-voxel shift.

    Raises
    ------
    ConverterError
        The array is not 3D, an affine is not an invertible 4x4 matrix, or ``order`` is not 0 or 1.
    """
    if array.ndim != 3:
        raise ConverterError(f"resampling needs a 3D array, got shape {array.shape}")
    if order not in (0, 1):
        raise ConverterError(f"interpolation order {order} is not 0 (nearest) or 1 (linear)")
    shape = (int(target_shape[0]), int(target_shape[1]), int(target_shape[2]))
    shift = grid_shift(source_affine, target_affine)
    out_dtype = np.float32 if order == 1 else np.asarray(array).dtype
    if shift is not None:
        return shifted_copy(np.asarray(array).astype(out_dtype, copy=False), shift, shape, cval)
    matrix = source_from_target(source_affine, target_affine)
    source = np.asarray(array)
    if order == 1 and source.dtype == np.bool_:
        # ndimage interpolates 0/1 bytes into float32 output as it would 0.0/1.0 floats: a mask needs no
        # float copy of itself (4 bytes a voxel: 480 MiB for a 0.4 mm series).
        source = source.view(np.uint8)
    elif order == 1:
        source = source.astype(np.float32, copy=False)
    within = _within_source(matrix, source.shape, shape)
    out = np.asarray(
        ndimage.affine_transform(
            source,
            matrix[:3, :3],
            offset=matrix[:3, 3],
            output_shape=shape,
            output=out_dtype,
            order=order,
            # Within half a voxel of the outermost voxel centres the edge value holds (see
            # _within_source); "constant" would give cval just past the centres.
            mode="constant" if within is None else "nearest",
            cval=cval,
            prefilter=False,
        )
    )
    if within is not None:
        out[~within] = cval
    return out


def _within_source(
    matrix: npt.NDArray[np.float64], source_shape: tuple[int, ...], target_shape: tuple[int, int, int]
) -> npt.NDArray[np.bool_] | None:
    """Which target voxels lie on the source: within half a voxel of its outermost voxel centres.

    A voxel covers half a voxel either side of its centre; a 5.5 mm slice covers 2.75 mm past it.
    scipy's "constant" mode ends the source at the outermost centres instead, so the model's plane
    just past a series' last slice read zero (image and brain mask), and tumour on that slice was
    lost when the prediction went back. None when every target voxel maps inside the outermost
    centres (no edge to treat; the common case of a window inside a whole head).
    """
    rotation, offset = matrix[:3, :3], matrix[:3, 3]
    upper = np.asarray(source_shape[:3], dtype=np.float64) - 1.0
    corners = np.array(
        [[i, j, k] for i in (0, target_shape[0] - 1) for j in (0, target_shape[1] - 1)
         for k in (0, target_shape[2] - 1)], dtype=np.float64,
    )  # fmt: skip
    mapped = corners @ rotation.T + offset
    if np.all(mapped >= -1e-9) and np.all(mapped <= upper + 1e-9):
        return None  # the target's box maps inside the source's centres: so does every voxel
    within = np.ones(target_shape, dtype=bool)
    j = np.arange(target_shape[1], dtype=np.float64)[:, None]
    k = np.arange(target_shape[2], dtype=np.float64)[None, :]
    for axis in range(3):
        plane = rotation[axis, 1] * j + rotation[axis, 2] * k + offset[axis]  # (ny, nz) at i = 0
        low, high = -0.5 - 1e-6, upper[axis] + 0.5 + 1e-6
        for i in range(target_shape[0]):
            coordinate = plane + rotation[axis, 0] * i
            within[i] &= (coordinate >= low) & (coordinate <= high)
    return within


def reduction_factors(
    affine: npt.NDArray[Any], shape: tuple[int, ...], finest_mm: float = BLOCK_MM
) -> tuple[int, int, int]:
    """Whole voxels per block along each axis, the block as near ``finest_mm`` wide as whole voxels
    make it (2 for 0.4-0.66 mm voxels, 3 for 0.29-0.4 mm; 1 from 0.67 mm up, and where fewer than two
    blocks would remain)."""
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    out = []
    for step, n in zip(spacing, shape, strict=True):
        k = max(1, round(finest_mm / step))
        out.append(k if n // k >= 2 else 1)
    return out[0], out[1], out[2]


def block_mean(
    image: npt.NDArray[Any], affine: npt.NDArray[Any], factors: tuple[int, int, int]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """``image`` averaged over blocks of ``factors`` voxels (the remainder at the far edges left out)
    and the voxel-to-world affine of the blocks (each block's centre). Sums strided views: no copy of
    the image is made, however it is laid out in memory."""
    n = [size // k for size, k in zip(image.shape, factors, strict=True)]
    small = np.zeros(n, dtype=np.float32)
    for a in range(factors[0]):
        for b in range(factors[1]):
            for c in range(factors[2]):
                small += image[a : n[0] * factors[0] : factors[0], b : n[1] * factors[1] : factors[1],
                               c : n[2] * factors[2] : factors[2]]  # fmt: skip
    small /= float(np.prod(factors))
    scale = np.diag([*map(float, factors), 1.0])
    scale[:3, 3] = [(k - 1) / 2.0 for k in factors]
    return small, np.asarray(affine, dtype=np.float64) @ scale


def expand_blocks(
    small: npt.NDArray[Any], factors: tuple[int, int, int], shape: tuple[int, ...]
) -> npt.NDArray[Any]:
    """Values on :func:`block_mean`'s blocks (a mask, labels) back on the full grid of ``shape``: each
    block's voxels take its value, the remainder planes at the far edges the value of the last block.
    Writes strided views of the output: no full-size copy besides it."""
    out = np.empty(shape, dtype=small.dtype)
    g0, g1, g2 = (n * k for n, k in zip(small.shape, factors, strict=True))
    for a in range(factors[0]):
        for b in range(factors[1]):
            for c in range(factors[2]):
                out[a : g0 : factors[0], b : g1 : factors[1], c : g2 : factors[2]] = small
    out[g0:, :g1, :g2] = out[g0 - 1 : g0, :g1, :g2]
    out[:, g1:, :g2] = out[:, g1 - 1 : g1, :g2]
    out[:, :, g2:] = out[:, :, g2 - 1 : g2]
    return out


def world_points(affine: npt.NDArray[Any], indices: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """World coordinates (N, 3) of voxel indices (N, 3) under ``affine``."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.asarray(np.asarray(indices, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3])


def rotation(axis: str, degrees: float) -> npt.NDArray[np.float64]:
    """3x3 right-handed rotation by ``degrees`` about the world axis ``"x"``, ``"y"`` or ``"z"``."""
    t = np.deg2rad(degrees)
    c, s = float(np.cos(t)), float(np.sin(t))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)
    raise ConverterError(f"rotation axis {axis!r} is not 'x', 'y' or 'z'")


def extreme_voxels(region: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Indices (N, 3) of the first and last ``True`` voxel on every line along axis 2.

    Any linear function of position (e.g. a world coordinate) takes its extremes over the region
    at these voxels, so they give the region's exact bounding box on any rotated grid.
    """
    present = region.any(axis=2)
    first = np.argmax(region, axis=2)
    last = region.shape[2] - 1 - np.argmax(region[:, :, ::-1], axis=2)
    i, j = np.nonzero(present)
    return np.concatenate(
        [np.stack([i, j, first[i, j]], axis=1), np.stack([i, j, last[i, j]], axis=1)]
    ).astype(np.int64)
