"""Model-input preprocessing shared by the trainer and the node (numpy and SciPy only, no torch).

The model card's ``preprocessing`` block (docs/model-card.md) says what the network expects:

* ``orientation`` — voxel axes of the input grid; only ``"RAS"`` (the canonical grid of
  :class:`converters.case.Case`) is supported.
* ``spacing_mm`` — when the in-plane voxel size differs from it by more than 1 %, the volume is
  resampled in-plane (linear for images; the label map goes back with nearest neighbour).
* ``crop_size`` — in-plane size fed to the network: the volume is cropped / zero-padded about the
  centre of the brain bounding box (non-zero voxels, union over channels).
* ``normalization`` — ``"zscore_nonzero"``: each channel z-scored over its non-zero voxels,
  background left at zero.
* ``slice_axis`` — 2D slices are taken along this axis (2: axial).

:func:`prepare_volume` turns images into network slices and remembers the geometry;
:meth:`Prepared.restore` puts a slice-wise prediction back on the original grid, and
:meth:`Prepared.crop_label` applies the same geometry to a label map (training, evaluation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ConverterError

logger = logging.getLogger(__name__)

#: Relative in-plane spacing difference above which the volume is resampled.
SPACING_TOLERANCE = 0.01

SUPPORTED_NORMALIZATIONS = ("zscore_nonzero",)


class PreprocessError(ConverterError):
    """Images or a preprocessing block cannot be turned into network input."""


@dataclass(frozen=True)
class PreprocessSpec:
    """The card's ``preprocessing`` block, validated.

    Attributes
    ----------
    spacing_mm:
        Target voxel size (mm) along the three RAS axes; only the two in-plane ones are used.
    crop_size:
        (H, W): in-plane size of a network slice.
    normalization:
        One of :data:`SUPPORTED_NORMALIZATIONS`.
    slice_axis:
        Axis along which 2D slices are taken.
    """

    spacing_mm: tuple[float, float, float]
    crop_size: tuple[int, int]
    normalization: str = "zscore_nonzero"
    slice_axis: int = 2

    @classmethod
    def from_card(cls, block: Mapping[str, Any]) -> PreprocessSpec:
        """Validate a card's ``preprocessing`` block.

        Raises
        ------
        PreprocessError
            A key is missing or has a bad value; the message names the key and the value.
        """
        orientation = block.get("orientation", "RAS")
        if orientation != "RAS":
            raise PreprocessError(f"preprocessing.orientation {orientation!r} is not supported (only 'RAS')")
        try:
            spacing = tuple(float(v) for v in block["spacing_mm"])
            crop = tuple(int(v) for v in block["crop_size"])
        except KeyError as exc:
            raise PreprocessError(f"preprocessing block lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError):
            raise PreprocessError(
                f"preprocessing spacing_mm {block.get('spacing_mm')!r} / crop_size "
                f"{block.get('crop_size')!r} must be lists of numbers"
            ) from None
        if len(spacing) != 3 or min(spacing) <= 0:
            raise PreprocessError(f"preprocessing.spacing_mm {list(spacing)!r} must be 3 positive numbers")
        if len(crop) != 2 or min(crop) < 1:
            raise PreprocessError(f"preprocessing.crop_size {list(crop)!r} must be 2 positive integers")
        norm = str(block.get("normalization", "zscore_nonzero"))
        if norm not in SUPPORTED_NORMALIZATIONS:
            raise PreprocessError(
                f"preprocessing.normalization {norm!r} is not supported "
                f"({', '.join(SUPPORTED_NORMALIZATIONS)})"
            )
        axis = block.get("slice_axis", 2)
        if axis not in (0, 1, 2):
            raise PreprocessError(f"preprocessing.slice_axis {axis!r} must be 0, 1 or 2")
        return cls((spacing[0], spacing[1], spacing[2]), (crop[0], crop[1]), norm, int(axis))


@dataclass
class Prepared:
    """Network slices of one volume and the geometry needed to map predictions back.

    Attributes
    ----------
    slices:
        float32 (N, C, crop H, crop W), the kept slices (those holding brain) in order.
    slice_indices:
        Index along the slice axis of each kept slice.
    original_shape:
        Shape of the input images (X, Y, Z).
    plane_shape:
        In-plane shape after resampling (before crop/pad).
    zoom:
        In-plane factors original spacing / target spacing (1.0 when not resampled).
    crop_origin:
        Position in the resampled plane of the crop's first pixel (negative: padding).
    slice_axis:
        Axis of the original grid that the slices are taken along.
    """

    slices: npt.NDArray[np.float32]
    slice_indices: npt.NDArray[np.int64]
    original_shape: tuple[int, int, int]
    plane_shape: tuple[int, int]
    zoom: tuple[float, float]
    crop_origin: tuple[int, int]
    slice_axis: int

    @property
    def crop_size(self) -> tuple[int, int]:
        """(H, W) of a network slice."""
        return (int(self.slices.shape[2]), int(self.slices.shape[3]))

    @property
    def resampled(self) -> bool:
        """Whether the plane was resampled to the card's spacing."""
        return self.zoom != (1.0, 1.0)

    def _to_planes(self, volume: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """(X, Y, Z) -> (slices, P0, P1) with the slice axis first."""
        return np.moveaxis(volume, self.slice_axis, 0)

    def crop_label(self, label: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """The label map on the network grid: (N, H, W) uint8, same slices as :attr:`slices`.

        Raises
        ------
        PreprocessError
            The label's shape differs from the images'.
        """
        if tuple(label.shape) != self.original_shape:
            raise PreprocessError(
                f"label shape {tuple(label.shape)} differs from image shape {self.original_shape}"
            )
        planes = self._to_planes(np.asarray(label))[self.slice_indices]
        if self.resampled:
            planes = _resample_nearest(planes, self.plane_shape, self.zoom)
        return _crop_or_pad(planes.astype(np.uint8), self.crop_origin, self.crop_size)

    def restore(self, prediction: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """Put a slice-wise label prediction back on the original grid.

        Parameters
        ----------
        prediction:
            (N, H, W) integer labels, one plane per kept slice, in the order of :attr:`slices`.

        Returns
        -------
        numpy.ndarray
            uint8 (X, Y, Z) on the input grid; zero outside the crop and on dropped slices.

        Raises
        ------
        PreprocessError
            The prediction's shape does not match the prepared slices.
        """
        expected = (len(self.slice_indices), *self.crop_size)
        if tuple(prediction.shape) != expected:
            raise PreprocessError(f"prediction shape {tuple(prediction.shape)} differs from {expected}")
        plane = np.zeros((len(self.slice_indices), *self.plane_shape), dtype=np.uint8)
        _paste(plane, prediction.astype(np.uint8), self.crop_origin)
        axes = [self.original_shape[a] for a in range(3) if a != self.slice_axis]
        if self.resampled:
            plane = _unresample_nearest(plane, (axes[0], axes[1]), self.zoom)
        out = np.zeros((self.original_shape[self.slice_axis], axes[0], axes[1]), dtype=np.uint8)
        out[self.slice_indices] = plane
        return np.ascontiguousarray(np.moveaxis(out, 0, self.slice_axis))


def zscore_nonzero(image: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Z-score ``image`` over its non-zero voxels; zero voxels stay zero.

    A channel with no non-zero voxel, or a constant one, comes back as zeros / centred values
    (the standard deviation is floored at 1e-8).
    """
    image = np.asarray(image, dtype=np.float32)
    mask = image != 0
    out = np.zeros_like(image, dtype=np.float32)
    if not mask.any():
        return out
    values = image[mask].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    out[mask] = ((values - mean) / max(std, 1e-8)).astype(np.float32)
    return out


def brain_box(mask_planes: npt.NDArray[np.bool_]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """In-plane bounding box ((lo0, hi0), (lo1, hi1)), hi exclusive, of a (slices, P0, P1) mask."""
    proj = np.any(mask_planes, axis=0)
    rows = np.flatnonzero(np.any(proj, axis=1))
    cols = np.flatnonzero(np.any(proj, axis=0))
    if rows.size == 0:
        return None
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def prepare_volume(
    images: Mapping[str, npt.NDArray[Any]],
    affine: npt.NDArray[Any],
    preprocessing: Mapping[str, Any],
    modalities: Sequence[str],
) -> Prepared:
    """Turn co-registered RAS images into network slices as the model card says.

    Parameters
    ----------
    images:
        Modality name -> 3D array (X, Y, Z) on the canonical RAS grid; all the same shape.
    affine:
        4x4 voxel-to-RAS matrix of the grid (only the column norms, i.e. spacing, are used).
    preprocessing:
        The card's ``preprocessing`` block (see :class:`PreprocessSpec`).
    modalities:
        Channel order; every name must be a key of ``images``.

    Returns
    -------
    Prepared
        The slices holding brain (any channel non-zero inside the crop) and the geometry.

    Raises
    ------
    PreprocessError
        A modality is missing, shapes differ, the images are not 3D, or no voxel is non-zero.
    """
    spec = PreprocessSpec.from_card(preprocessing)
    volumes = _channels(images, modalities)
    shape = volumes[0].shape
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise PreprocessError(f"affine shape {affine.shape} is not (4, 4)")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    in_plane = [a for a in range(3) if a != spec.slice_axis]
    zoom = _zoom_factors(
        (float(spacing[in_plane[0]]), float(spacing[in_plane[1]])),
        (spec.spacing_mm[in_plane[0]], spec.spacing_mm[in_plane[1]]),
    )
    planes = np.stack([np.moveaxis(v, spec.slice_axis, 0) for v in volumes])  # (C, S, P0, P1)
    if zoom != (1.0, 1.0):
        planes = np.stack([_resample_linear(p, zoom) for p in planes])
        logger.debug("resampled plane %s -> %s (zoom %s)", shape, planes.shape, zoom)
    nonzero = planes != 0
    box = brain_box(nonzero.any(axis=0))
    if box is None:
        raise PreprocessError(f"images {', '.join(modalities)} of shape {shape} have no non-zero voxel")
    crop = spec.crop_size
    origin = (
        (box[0][0] + box[0][1]) // 2 - crop[0] // 2,
        (box[1][0] + box[1][1]) // 2 - crop[1] // 2,
    )
    normalized = np.stack([zscore_nonzero(p) for p in planes])
    cropped = np.stack([_crop_or_pad(p, origin, crop) for p in normalized], axis=1)  # (S, C, H, W)
    keep = np.flatnonzero(np.abs(cropped).reshape(cropped.shape[0], -1).max(axis=1) > 0)
    if keep.size == 0:  # brain present but the normalised values are all zero: keep the brain slices
        keep = np.flatnonzero(nonzero.any(axis=(0, 2, 3)))
    return Prepared(
        slices=np.ascontiguousarray(cropped[keep], dtype=np.float32),
        slice_indices=keep.astype(np.int64),
        original_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        plane_shape=(int(planes.shape[2]), int(planes.shape[3])),
        zoom=zoom,
        crop_origin=(int(origin[0]), int(origin[1])),
        slice_axis=spec.slice_axis,
    )


def _channels(images: Mapping[str, npt.NDArray[Any]], modalities: Sequence[str]) -> list[npt.NDArray[Any]]:
    if not modalities:
        raise PreprocessError("no input modality given")
    missing = [m for m in modalities if m not in images]
    if missing:
        raise PreprocessError(
            f"modality {missing[0]} needed by the model is missing "
            f"(have: {', '.join(sorted(images)) or 'none'})"
        )
    volumes = [np.asarray(images[m]) for m in modalities]
    for name, vol in zip(modalities, volumes, strict=True):
        if vol.ndim != 3:
            raise PreprocessError(f"modality {name} image has shape {vol.shape}, expected 3D (X, Y, Z)")
        if vol.shape != volumes[0].shape:
            raise PreprocessError(
                f"modality {name} image shape {vol.shape} differs from "
                f"{modalities[0]} shape {volumes[0].shape}"
            )
    return volumes


def _zoom_factors(spacing: tuple[float, float], target: tuple[float, float]) -> tuple[float, float]:
    out = []
    for have, want in zip(spacing, target, strict=True):
        if have <= 0 or not np.isfinite(have):
            raise PreprocessError(f"voxel spacing {have!r} mm from the affine is not positive")
        out.append(1.0 if abs(have - want) <= SPACING_TOLERANCE * want else have / want)
    return (out[0], out[1])


def _resampled_size(n: int, zoom: float) -> int:
    return max(1, round(n * zoom))


def _linear_axis(array: npt.NDArray[Any], axis: int, zoom: float) -> npt.NDArray[np.float32]:
    """Linear interpolation along ``axis``: new voxel j sits at old coordinate j / zoom."""
    n = array.shape[axis]
    coords = np.arange(_resampled_size(n, zoom)) / zoom
    lo = np.clip(np.floor(coords).astype(np.int64), 0, n - 1)
    hi = np.clip(lo + 1, 0, n - 1)
    w = np.clip(coords - lo, 0.0, 1.0).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    a = np.take(array, lo, axis=axis).astype(np.float32)
    b = np.take(array, hi, axis=axis).astype(np.float32)
    return a * (1 - w) + b * w


def _resample_linear(planes: npt.NDArray[Any], zoom: tuple[float, float]) -> npt.NDArray[np.float32]:
    """(S, P0, P1) -> (S, P0', P1') linear in-plane resampling (separable)."""
    out = planes.astype(np.float32)
    if zoom[0] != 1.0:
        out = _linear_axis(out, 1, zoom[0])
    if zoom[1] != 1.0:
        out = _linear_axis(out, 2, zoom[1])
    return out


def _nearest_index(n_out: int, n_in: int, scale: float) -> npt.NDArray[np.int64]:
    return np.clip(np.rint(np.arange(n_out) * scale), 0, n_in - 1).astype(np.int64)


def _resample_nearest(
    planes: npt.NDArray[Any], plane_shape: tuple[int, int], zoom: tuple[float, float]
) -> npt.NDArray[Any]:
    """Original plane -> resampled plane, nearest neighbour."""
    i0 = _nearest_index(plane_shape[0], planes.shape[1], 1.0 / zoom[0])
    i1 = _nearest_index(plane_shape[1], planes.shape[2], 1.0 / zoom[1])
    return planes[:, i0][:, :, i1]


def _unresample_nearest(
    planes: npt.NDArray[Any], original: tuple[int, int], zoom: tuple[float, float]
) -> npt.NDArray[Any]:
    """Resampled plane -> original plane, nearest neighbour (voxel i sits at i * zoom)."""
    i0 = _nearest_index(original[0], planes.shape[1], zoom[0])
    i1 = _nearest_index(original[1], planes.shape[2], zoom[1])
    return planes[:, i0][:, :, i1]


def _window(origin: int, size: int, extent: int) -> tuple[slice, slice]:
    """Source and destination slices of a crop window [origin, origin+size) over [0, extent)."""
    src_lo, src_hi = max(origin, 0), min(origin + size, extent)
    if src_hi <= src_lo:
        return slice(0, 0), slice(0, 0)
    return slice(src_lo, src_hi), slice(src_lo - origin, src_hi - origin)


def _crop_or_pad(
    planes: npt.NDArray[Any], origin: tuple[int, int], size: tuple[int, int]
) -> npt.NDArray[Any]:
    """(S, P0, P1) -> (S, H, W): the window at ``origin``, zero where it leaves the plane."""
    out = np.zeros((planes.shape[0], size[0], size[1]), dtype=planes.dtype)
    s0, d0 = _window(origin[0], size[0], planes.shape[1])
    s1, d1 = _window(origin[1], size[1], planes.shape[2])
    out[:, d0, d1] = planes[:, s0, s1]
    return out


def _paste(plane: npt.NDArray[Any], crop: npt.NDArray[Any], origin: tuple[int, int]) -> None:
    """Inverse of :func:`_crop_or_pad`: write ``crop`` (S, H, W) into ``plane`` at ``origin``."""
    s0, d0 = _window(origin[0], crop.shape[1], plane.shape[1])
    s1, d1 = _window(origin[1], crop.shape[2], plane.shape[2])
    plane[:, s0, s1] = crop[:, d0, d1]
