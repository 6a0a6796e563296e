"""Model-input preprocessing shared by the trainer and the node (numpy and SciPy only, no torch).

The model card's ``preprocessing`` block (docs/model-card.md) says what the network expects:

* ``orientation`` — voxel axes of the model's grid; only ``"RAS"`` (the canonical grid of
  :class:`converters.case.Case`) is supported.
* ``spacing_mm`` — voxel size of the model's grid along R, A and S.
* ``crop_size`` — in-plane size fed to the network: a window of the model's grid centred on the
  brain (the brain mask's bounding box when one is given, else that of the non-zero voxels, union
  over channels), zero where it leaves the image.
* ``normalization`` — ``"zscore_nonzero"``: each channel z-scored over its non-zero voxels,
  background left at zero; with a brain mask, over the voxels inside the mask, zero outside it.
* ``slice_axis`` — 2D slices are taken along this axis of the model's grid (2: axial).
* ``views`` — optional, 1 (default) or 3: the 2D network is run along ``slice_axis`` only, or along the
  grid's three axes with the probabilities averaged (:func:`converters.prediction.predict_views`; a
  model trained on slices along the three axes, an isotropic grid).

Images may come on any grid: axial, sagittal, coronal or oblique, any voxel size. The window is
laid out on a RAS grid with the card's spacing, in world coordinates, and every image is resampled
into it from its own full affine (rotation and obliquity included) by :mod:`converters.resample`:
trilinear for images, nearest neighbour for label maps, linear-then-0.5 for the brain mask. An image
already on such a grid (axes R, A, S, spacing within 1 % of the card's, e.g. BraTS at 1 mm) is
cropped, never interpolated, so it gives exactly the slices it gave before world-space resampling.

:func:`prepare_volume` turns images into network slices and remembers the geometry;
:meth:`Prepared.restore` puts a slice-wise label prediction back on the images' own grid (nearest
neighbour), :meth:`Prepared.restore_scores` does the same for per-class probabilities (linear), and
:meth:`Prepared.crop_label` applies the forward geometry to a label map (training, evaluation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ConverterError
from converters.resample import extreme_voxels, grid_shift, resample_to_grid, world_points

logger = logging.getLogger(__name__)

#: Relative spacing difference above which a RAS-aligned volume is resampled rather than cropped.
SPACING_TOLERANCE = 0.01
#: Voxels of the input grid per slab when a prediction goes back onto it (:meth:`Prepared.restore_labels`):
#: 4 M voxels are 16 MiB of float32 per class.
RESTORE_SLAB_VOXELS = 4_000_000
#: Largest direction-cosine deviation (off-diagonal share of a voxel axis) still counted as RAS-aligned.
ALIGNMENT_TOLERANCE = 1e-4

SUPPORTED_NORMALIZATIONS = ("zscore_nonzero",)
#: The most neighbouring slices on each side a card's ``preprocessing.context_slices`` may ask for.
MAX_CONTEXT_SLICES = 3


class PreprocessError(ConverterError):
    """Images or a preprocessing block cannot be turned into network input."""


@dataclass(frozen=True)
class PreprocessSpec:
    """The card's ``preprocessing`` block, validated.

    Attributes
    ----------
    spacing_mm:
        Voxel size (mm) of the model's grid along the three RAS axes.
    crop_size:
        (H, W): in-plane size of a network slice.
    normalization:
        One of :data:`SUPPORTED_NORMALIZATIONS`.
    slice_axis:
        Axis along which 2D slices are taken.
    views:
        1: the network runs on those slices; 3: along the grid's three axes, averaged.
    context_slices:
        Neighbouring slices given to the network on each side of the one it segments (2.5D input):
        0, the slice alone; k, each modality's slices at offsets -k..k along the slice axis as
        ``2k + 1`` channels (:func:`with_context`). Only with ``views`` 1.
    """

    spacing_mm: tuple[float, float, float]
    crop_size: tuple[int, int]
    normalization: str = "zscore_nonzero"
    slice_axis: int = 2
    views: int = 1
    context_slices: int = 0

    def channels(self, modalities: int) -> int:
        """The network's input channels for ``modalities`` modalities: ``2k + 1`` each."""
        return modalities * channels_per_modality(self.context_slices)

    def channels_mismatch(self, modalities: int, taken: int, model: object) -> str | None:
        """None when a network ``model`` whose input takes ``taken`` channels fits ``modalities``
        modalities; otherwise what is wrong, in words (the node's and the trainer's refusal)."""
        channels = self.channels(modalities)
        if taken == channels:
            return None
        return (
            f"model {model} takes {taken} channels but the card lists {modalities} modalities "
            f"({channels} channels with {self.context_slices} context slices on each side)"
        )

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
        views = block.get("views", 1)
        if isinstance(views, bool) or views not in (1, 3):
            raise PreprocessError(f"preprocessing.views {views!r} must be 1 or 3")
        if views == 3 and not isotropic(spacing):
            raise PreprocessError(
                f"preprocessing.views 3 needs an isotropic spacing_mm, not {list(spacing)!r}"
            )
        context = block.get("context_slices", 0)
        if type(context) is not int or not 0 <= context <= MAX_CONTEXT_SLICES:  # bool is no count
            raise PreprocessError(
                f"preprocessing.context_slices {context!r} must be an integer from 0 to {MAX_CONTEXT_SLICES}"
            )
        if context and views != 1:
            raise PreprocessError(f"preprocessing.context_slices {context} needs views 1, not {views}")
        return cls((spacing[0], spacing[1], spacing[2]), (crop[0], crop[1]), norm, int(axis), int(views),
                   context)


def channels_per_modality(context_slices: int) -> int:
    """A modality's input channels with ``context_slices`` neighbours on each side: ``2k + 1``."""
    return 2 * context_slices + 1


#: Slices copied at a time by :func:`with_context` (bounds its temporary copy to a few MiB).
_CONTEXT_BLOCK = 16


def with_context(
    planes: npt.NDArray[np.float32], context: int, rows: npt.NDArray[np.int64] | None = None
) -> npt.NDArray[np.float32]:
    """Slices (S, C, H, W) as (R, C * (2k + 1), H, W), k = ``context``: for each channel, the slices at
    offsets -k..k along S, in that order, for the slices ``rows`` (default: all S); beyond the first
    and last slice, zeros.

    The planes are the whole window along the slice axis, which spans the brain, so what lies beyond
    it is outside the brain, where the z-scored image is zero too.
    """
    rows = np.arange(planes.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    if context == 0:
        return planes[rows]
    count, channels = planes.shape[:2]
    out = np.zeros((len(rows), channels, 2 * context + 1, *planes.shape[2:]), dtype=np.float32)
    # Filled in place, a block of slices at a time: stacking shifted copies held about 8 times the
    # planes at once (150 slices of 4 sequences, 176²: 470 MiB against 210 MiB), 0.6 s of page faults.
    for position, offset in enumerate(range(-context, context + 1)):
        source = rows + offset
        present = np.flatnonzero((source >= 0) & (source < count))
        for start in range(0, len(present), _CONTEXT_BLOCK):
            block = present[start : start + _CONTEXT_BLOCK]
            out[block, :, position] = planes[source[block]]
    return out.reshape(len(rows), channels * (2 * context + 1), *planes.shape[2:])


def isotropic(spacing_mm: Sequence[float]) -> bool:
    """Whether a grid has the same spacing along its three axes (within 1e-6 mm): only then is a slice
    along any of them an image of the same scale (``preprocessing.views`` 3, ``--slice-axes 0,1,2``)."""
    return max(spacing_mm) - min(spacing_mm) <= 1e-6


@dataclass
class Prepared:
    """Network slices of one volume and the geometry needed to map predictions back.

    The slices are cut from a *window*: a block of the model's grid (RAS axes, the card's spacing)
    whose in-plane size is the crop size and which spans the brain along the slice axis.

    Attributes
    ----------
    slices:
        float32 (N, C, crop H, crop W), the kept slices (those holding brain) in order.
    slice_indices:
        Index along the window's slice axis of each kept slice.
    original_shape:
        Shape of the input images (X, Y, Z).
    source_affine:
        4x4 voxel-to-RAS matrix of the input images.
    window_affine:
        4x4 voxel-to-RAS matrix of the window.
    window_shape:
        Shape of the window (the crop size along the two in-plane axes).
    slice_axis:
        Axis of the window that the slices are taken along.
    shift:
        When the window is a whole-voxel shift of the input grid (no interpolation): the offset
        ``input index = window index + shift``; None when the images were resampled.
    """

    slices: npt.NDArray[np.float32]
    slice_indices: npt.NDArray[np.int64]
    original_shape: tuple[int, int, int]
    source_affine: npt.NDArray[np.float64]
    window_affine: npt.NDArray[np.float64]
    window_shape: tuple[int, int, int]
    slice_axis: int
    shift: tuple[int, int, int] | None

    @property
    def crop_size(self) -> tuple[int, int]:
        """(H, W) of a network slice."""
        return (int(self.slices.shape[2]), int(self.slices.shape[3]))

    @property
    def resampled(self) -> bool:
        """Whether the images were interpolated onto the model's grid (rather than only cropped)."""
        return self.shift is None

    def to_window(self, volume: npt.NDArray[Any], *, order: int = 1, cval: float = 0.0) -> npt.NDArray[Any]:
        """A volume on the input grid resampled into the window (order 1: linear, 0: nearest)."""
        return resample_to_grid(
            volume, self.source_affine, self.window_affine, self.window_shape, order=order, cval=cval
        )

    def from_window(self, volume: npt.NDArray[Any], *, order: int = 1, cval: float = 0.0) -> npt.NDArray[Any]:
        """A volume on the window resampled back onto the input grid (``cval`` outside the window)."""
        return resample_to_grid(
            volume, self.window_affine, self.source_affine, self.original_shape, order=order, cval=cval
        )

    def _planes(self, window: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Window -> (slices, P0, P1) view with the slice axis first."""
        return np.moveaxis(window, self.slice_axis, 0)

    def crop_label(self, label: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """The label map on the network grid (nearest neighbour): (N, H, W) uint8, the kept slices.

        Raises
        ------
        PreprocessError
            The label's shape differs from the images'.
        """
        if tuple(label.shape) != self.original_shape:
            raise PreprocessError(
                f"label shape {tuple(label.shape)} differs from image shape {self.original_shape}"
            )
        window = self.to_window(np.asarray(label), order=0)
        return np.ascontiguousarray(self._planes(window)[self.slice_indices], dtype=np.uint8)

    def _check_planes(self, array: npt.NDArray[Any], what: str, extra: tuple[int, ...] = ()) -> None:
        n, (h, w) = len(self.slice_indices), self.crop_size
        expected = (n, *extra, h, w)
        if array.ndim != len(expected) or (array.shape[0], *array.shape[-2:]) != (n, h, w):
            raise PreprocessError(f"{what} shape {tuple(array.shape)} differs from {expected}")

    def restore(self, prediction: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """Put a slice-wise label prediction back on the input grid (nearest neighbour).

        Parameters
        ----------
        prediction:
            (N, H, W) integer labels, one plane per kept slice, in the order of :attr:`slices`.

        Returns
        -------
        numpy.ndarray
            uint8 (X, Y, Z) on the input grid; zero outside the window and on dropped slices.

        Raises
        ------
        PreprocessError
            The prediction's shape does not match the prepared slices.
        """
        self._check_planes(prediction, "prediction")
        window = np.zeros(self.window_shape, dtype=np.uint8)
        self._planes(window)[self.slice_indices] = prediction.astype(np.uint8)
        return np.ascontiguousarray(self.from_window(window, order=0), dtype=np.uint8)

    def restore_scores(
        self, scores: npt.NDArray[Any], background: Sequence[float]
    ) -> npt.NDArray[np.float32]:
        """Put slice-wise per-class scores (e.g. probabilities) back on the input grid, linearly.

        Parameters
        ----------
        scores:
            (N, K, H, W), one plane per kept slice and class.
        background:
            K values: each class's score outside the window and on dropped slices (e.g. 0 for a
            tumour probability, 1 for a softmax background class).

        Returns
        -------
        numpy.ndarray
            float32 (K, X, Y, Z) on the input grid.

        Raises
        ------
        PreprocessError
            The scores' shape does not match the prepared slices, or ``background`` has not K values.
        """
        windows = self._score_windows(scores, background)
        out = np.empty((len(windows), *self.original_shape), dtype=np.float32)
        for k, (window, fill) in enumerate(zip(windows, background, strict=True)):
            out[k] = self.from_window(window, order=1, cval=float(fill))
        return out

    def _score_windows(
        self, scores: npt.NDArray[Any], background: Sequence[float]
    ) -> list[npt.NDArray[np.float32]]:
        """Each class's scores (N, K, H, W) on the window, ``background`` on the dropped slices."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 4:
            raise PreprocessError(f"scores shape {tuple(scores.shape)} is not (N, K, H, W)")
        self._check_planes(scores, "scores", (scores.shape[1],))
        if len(background) != scores.shape[1]:
            raise PreprocessError(f"{len(background)} background values for {scores.shape[1]} classes")
        windows = []
        for k, fill in enumerate(background):
            window = np.full(self.window_shape, fill, dtype=np.float32)
            self._planes(window)[self.slice_indices] = scores[:, k]
            windows.append(window)
        return windows

    def restore_labels(
        self,
        scores: npt.NDArray[Any],
        background: Sequence[float],
        to_labels: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.uint8]],
        slab_voxels: int = RESTORE_SLAB_VOXELS,
    ) -> npt.NDArray[np.uint8]:
        """``to_labels`` of :meth:`restore_scores`, computed a slab of the input grid at a time.

        The same values as ``to_labels(self.restore_scores(scores, background))`` (each slab is
        resampled onto its own part of the input grid), but the per-class scores on the input grid
        are never held whole: K float32 copies of a 0.4 mm series (60 M voxels or more) would be a
        gigabyte per class and a half. ``slab_voxels``: voxels per slab (whole planes along the first
        axis, at least one plane).
        """
        windows = self._score_windows(scores, background)
        nx, ny, nz = self.original_shape
        step = max(1, slab_voxels // max(1, ny * nz))
        out = np.empty(self.original_shape, dtype=np.uint8)
        for start in range(0, nx, step):
            stop = min(nx, start + step)
            offset = np.eye(4)
            offset[0, 3] = start
            slab_affine = np.asarray(self.source_affine, dtype=np.float64) @ offset
            probs = np.stack([
                resample_to_grid(window, self.window_affine, slab_affine, (stop - start, ny, nz), order=1,
                                 cval=float(fill))
                for window, fill in zip(windows, background, strict=True)
            ])  # fmt: skip
            out[start:stop] = to_labels(probs)
        return out


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
    mean, std = _moments(image[mask])
    out[mask] = ((image[mask].astype(np.float64) - mean) / std).astype(np.float32)
    return out


def _moments(values: npt.NDArray[Any]) -> tuple[float, float]:
    """Mean and standard deviation (floored at 1e-8) of ``values``, in float64."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 0.0, 1.0
    return float(values.mean()), max(float(values.std()), 1e-8)


def ras_aligned(affine: npt.NDArray[Any], spacing_mm: Sequence[float]) -> bool:
    """Whether a grid's axes run along R, A and S with voxel sizes within 1 % of ``spacing_mm``.

    Such a grid is the model's grid up to a shift: images on it are cropped, not interpolated.
    """
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    diagonal = np.diag(axes)
    off = axes - np.diag(diagonal)
    if np.any(diagonal <= 0) or float(np.max(np.abs(off))) > ALIGNMENT_TOLERANCE * float(diagonal.min()):
        return False
    target = np.asarray(spacing_mm, dtype=np.float64)
    return bool(np.all(np.abs(diagonal - target) <= SPACING_TOLERANCE * target))


def model_grid(affine: npt.NDArray[Any], spacing_mm: Sequence[float]) -> npt.NDArray[np.float64]:
    """4x4 voxel-to-RAS matrix of the model's grid for images on ``affine``.

    The images' own grid when it is :func:`ras_aligned`; else RAS axes with ``spacing_mm``
    voxels through the images' first voxel centre.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if ras_aligned(affine, spacing_mm):
        return affine
    grid = np.eye(4)
    grid[:3, :3] = np.diag(np.asarray(spacing_mm, dtype=np.float64))
    grid[:3, 3] = affine[:3, 3]
    return grid


def brain_window(
    affine: npt.NDArray[Any],
    region: npt.NDArray[np.bool_],
    spec: PreprocessSpec,
    fit_region: bool = False,
) -> tuple[npt.NDArray[np.float64], tuple[int, int, int]]:
    """The window of the model's grid that the slices are cut from.

    In-plane it is ``spec.crop_size`` voxels centred on the bounding-box centre of ``region``
    (computed in world space); along the slice axis it spans the region. ``fit_region``: an in-plane
    side where the region is longer than the crop spans the whole region instead (a large brain,
    a generous mask), so that no voxel of it is cut off; the slices are then larger than the
    network's input and are predicted whole, zero-padded to a size the network takes
    (:func:`converters.prediction.predict_padded`).

    Returns
    -------
    tuple[ndarray, tuple[int, int, int]]
        The window's 4x4 voxel-to-RAS matrix and its shape.
    """
    grid = model_grid(affine, spec.spacing_mm)
    points = world_points(np.linalg.inv(grid) @ affine, extreme_voxels(region))  # model-grid indices
    lo = np.floor(points.min(axis=0) + 1e-6).astype(np.int64)
    hi = np.ceil(points.max(axis=0) - 1e-6).astype(np.int64) + 1
    in_plane = [a for a in range(3) if a != spec.slice_axis]
    start = lo.copy()
    shape = [int(hi[spec.slice_axis] - lo[spec.slice_axis])] * 3
    for axis, size in zip(in_plane, spec.crop_size, strict=True):
        size = max(size, int(hi[axis] - lo[axis])) if fit_region else size
        start[axis] = (lo[axis] + hi[axis]) // 2 - size // 2
        shape[axis] = size
    shift = np.eye(4)
    shift[:3, 3] = start
    return np.asarray(grid @ shift, dtype=np.float64), (shape[0], shape[1], shape[2])


def prepare_volume(
    images: Mapping[str, npt.NDArray[Any]],
    affine: npt.NDArray[Any],
    preprocessing: Mapping[str, Any],
    modalities: Sequence[str],
    brain_mask: npt.NDArray[Any] | None = None,
    fit_region: bool = False,
) -> Prepared:
    """Turn co-registered images on any grid into network slices as the model card says.

    Parameters
    ----------
    images:
        Modality name -> 3D array (X, Y, Z); all the same shape, on the grid of ``affine``.
    affine:
        4x4 voxel-to-RAS matrix of the images (any orientation, obliquity or voxel size).
    preprocessing:
        The card's ``preprocessing`` block (see :class:`PreprocessSpec`).
    modalities:
        Channel order; every name must be a key of ``images``.
    brain_mask:
        Optional boolean brain mask on the images' grid. When given, the window is centred on it,
        each channel is z-scored over its non-zero voxels inside it and set to zero elsewhere, and
        the slices kept are those it reaches. When None, the non-zero voxels play its part. A voxel
        that is exactly zero stays zero inside the mask too: the background of an image that was
        skull-stripped before it came (the mask reaches a little beyond its brain), which the model
        saw as zero in training (``zscore_nonzero``) and would see as a band of very dark tissue.
    fit_region:
        Widen the window beyond the card's crop where the brain mask is longer than it (see
        :func:`brain_window`; without a mask the card's crop is kept): what segments a whole volume
        sets it; what stacks slices of many cases into one array (training) keeps the card's crop.

    Returns
    -------
    Prepared
        The slices holding brain and the geometry to map predictions back.

    Raises
    ------
    PreprocessError
        A modality is missing, shapes differ, the images are not 3D, the affine is not an
        invertible 4x4 matrix, the mask is empty or of another shape, or no voxel is non-zero.
    """
    spec = PreprocessSpec.from_card(preprocessing)
    volumes = _channels(images, modalities)
    shape = (int(volumes[0].shape[0]), int(volumes[0].shape[1]), int(volumes[0].shape[2]))
    affine = _affine(affine)
    mask = _mask(brain_mask, shape)
    region = mask if mask is not None else np.logical_or.reduce([v != 0 for v in volumes])
    if not region.any():
        what = "brain mask is empty" if mask is not None else "have no non-zero voxel"
        raise PreprocessError(f"images {', '.join(modalities)} of shape {shape} {what}")
    # Widened only to a brain mask: without one the region is every non-zero voxel, in a clinical
    # image the whole field of view (scalp, neck, noise), which the network never saw in training.
    window_affine, window_shape = brain_window(affine, region, spec, fit_region and mask is not None)
    shift = grid_shift(affine, window_affine)
    if shift is None:
        logger.debug("resampling %s onto the model grid (window %s)", shape, window_shape)
    inside = None
    if mask is not None:
        inside = resample_to_grid(mask, affine, window_affine, window_shape) >= 0.5
    channels = []
    for volume in volumes:
        nonzero = volume != 0
        stats = _moments(volume[mask & nonzero] if mask is not None else volume[nonzero])
        window = resample_to_grid(volume, affine, window_affine, window_shape, order=1)
        channels.append(_zscore(window, window != 0 if inside is None else inside & (window != 0), stats))
    planes = np.stack([np.moveaxis(c, spec.slice_axis, 0) for c in channels], axis=1)  # (S, C, H, W)
    keep = _kept_slices(planes, None if inside is None else np.moveaxis(inside, spec.slice_axis, 0))
    return Prepared(
        slices=np.ascontiguousarray(with_context(planes, spec.context_slices, keep), dtype=np.float32),
        slice_indices=keep.astype(np.int64),
        original_shape=shape,
        source_affine=affine,
        window_affine=window_affine,
        window_shape=window_shape,
        slice_axis=spec.slice_axis,
        shift=shift,
    )


def _zscore(
    window: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_], stats: tuple[float, float]
) -> npt.NDArray[np.float32]:
    """(value - mean) / std inside, zero elsewhere."""
    out = np.zeros(window.shape, dtype=np.float32)
    out[inside] = ((window[inside].astype(np.float64) - stats[0]) / stats[1]).astype(np.float32)
    return out


def _kept_slices(
    planes: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_] | None
) -> npt.NDArray[np.int64]:
    """Slices the mask reaches; without a mask, those with a non-zero value (else every slice)."""
    if inside is not None:
        return np.flatnonzero(inside.reshape(inside.shape[0], -1).any(axis=1)).astype(np.int64)
    keep = np.flatnonzero(np.abs(planes).reshape(planes.shape[0], -1).max(axis=1) > 0)
    if keep.size == 0:  # brain present but its z-scored values are all zero (a constant image)
        keep = np.arange(planes.shape[0])
    return keep.astype(np.int64)


def _affine(affine: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise PreprocessError(f"affine shape {affine.shape} is not (4, 4)")
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise PreprocessError("affine is not an invertible matrix of finite numbers")
    for have in np.linalg.norm(affine[:3, :3], axis=0):
        if have <= 0:
            raise PreprocessError(f"voxel spacing {have!r} mm from the affine is not positive")
    return affine


def _mask(mask: npt.NDArray[Any] | None, shape: tuple[int, int, int]) -> npt.NDArray[np.bool_] | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if tuple(mask.shape) != shape:
        raise PreprocessError(f"brain mask shape {tuple(mask.shape)} differs from image shape {shape}")
    return mask.astype(bool, copy=False)


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
