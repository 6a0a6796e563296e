"""Brain extraction: deepbet's algorithm around its two networks, in numpy and scipy.

The algorithm is deepbet's (Fisch et al. 2024, ``deepbet`` 1.0.2 on PyPI, MIT; the IR and its NOTICE
are in ``models/brain_extraction``):

1. the whole RAS volume, resized by index to the box network's grid (128³), its intensities clipped
   to the 0.5 / 99.5 percentiles of that small volume, scaled to [0, 1], z-scored over the grid and
   mapped to ``z * 0.226 + 0.449``;
2. the largest connected component of (p > 0.5) of the box network; its bounding box (planes where
   more than 2 % of the voxels are foreground) grown by 10 % on each side, scaled to the full grid;
3. that crop, resized to the brain network's grid, normalised as above (same percentiles, z-score
   over the crop), through the brain network; its probabilities resized back onto the crop;
4. threshold 0.5, the largest connected component, enclosed holes filled.

Before step 1 a volume that ends inside the head (a face brighter than air over 5 % of it: a series
that does not reach the vertex or the skull base) is continued 20 mm past that face, its edge plane
repeated, and the mask is cropped back to the volume (:func:`continue_cut_faces`); deepbet's
networks, which saw whole heads, otherwise drew the brain's edge inside the cut face.

What differs from deepbet, and why (measured in ``benchmarks/brain_extraction.py`` and
``trainer/brain_extractor_export.py``): the resizing of steps 1 and 3 can be linear instead of
nearest (``preprocessing.interpolation``: a 5 mm series resized by nearest-neighbour is a staircase);
the brain network's grid is the card's ``preprocessing.brain_grid`` (the networks are fully
convolutional; a smaller grid is faster); connected components and hole filling are
:func:`scipy.ndimage.label` (26-connectivity, as ``cc3d``'s default) and
:func:`scipy.ndimage.binary_fill_holes` (what ``fill_voids.fill`` computes).

A volume in which the box network finds no brain, whose mask is smaller than
``preprocessing.min_brain_ml``, whose voxels inside the mask are noise (:func:`structure`), or whose
mask does not stand out from its surroundings (:func:`contrast`), raises
:class:`NoBrainFoundError`. On an image already skull-stripped, its non-zero voxels near the mask join
the mask (:func:`add_stripped_brain`).

The networks are callables (:class:`BrainMasker`): the node runs them with OpenVINO
(:mod:`node.brain_extraction`), the trainer's export check runs the same code around its own IR.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from converters.exceptions import ConverterError, ModelCardError
from converters.masks import bounding_box, fill_holes, surface
from converters.network_buffers import network_buffer
from converters.resample import block_mean, expand_blocks, reduction_factors

logger = logging.getLogger(__name__)

#: The card's ``networks`` keys: the box network and the brain network.
NETWORKS = ("bbox", "brain")
_CONNECT26 = np.ones((3, 3, 3), dtype=bool)

#: A network run: its input grid (X, Y, Z) -> the foreground probability on that grid.
Network = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


class NoBrainFoundError(ConverterError):
    """Brain extraction found no brain in the image (noise, a localizer, a non-head series)."""


@dataclass(frozen=True)
class BrainExtractionSettings:
    """The pre/post-processing of the card's ``preprocessing`` block (docs/model-card.md)."""

    bbox_grid: tuple[int, int, int] = (128, 128, 128)
    brain_grid: tuple[int, int, int] = (256, 256, 256)
    bbox_margin: float = 0.1
    bbox_plane_fraction: float = 0.02
    percentiles: tuple[float, float] = (0.5, 99.5)
    scale_mean: float = 0.449
    scale_std: float = 0.226
    threshold: float = 0.5
    interpolation: str = "nearest"
    min_brain_ml: float = 100.0
    min_structure: float = 0.5
    min_contrast: float = 0.15
    stripped_margin_mm: float = 5.0
    stripped_outside_fraction: float = 0.01

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> BrainExtractionSettings:
        """Settings from ``card["preprocessing"]``; missing keys take deepbet's values."""
        pre = dict(card.get("preprocessing") or {})
        norm = dict(pre.get("normalization") or {})
        default = cls()
        settings = cls(
            bbox_grid=_grid(pre.get("bbox_grid", default.bbox_grid), "bbox_grid"),
            brain_grid=_grid(pre.get("brain_grid", default.brain_grid), "brain_grid"),
            bbox_margin=float(pre.get("bbox_margin", default.bbox_margin)),
            bbox_plane_fraction=float(pre.get("bbox_plane_fraction", default.bbox_plane_fraction)),
            percentiles=_pair(norm.get("percentiles", default.percentiles)),
            scale_mean=float(norm.get("scale_mean", default.scale_mean)),
            scale_std=float(norm.get("scale_std", default.scale_std)),
            threshold=float(card.get("output", {}).get("threshold", default.threshold)),
            interpolation=str(pre.get("interpolation", default.interpolation)),
            min_brain_ml=float(pre.get("min_brain_ml", default.min_brain_ml)),
            min_structure=float(pre.get("min_structure", default.min_structure)),
            min_contrast=float(pre.get("min_contrast", default.min_contrast)),
            stripped_margin_mm=float(pre.get("stripped_margin_mm", default.stripped_margin_mm)),
            stripped_outside_fraction=float(
                pre.get("stripped_outside_fraction", default.stripped_outside_fraction)
            ),
        )
        if settings.interpolation not in ("linear", "nearest"):
            raise ModelCardError(
                f"brain extraction card: preprocessing.interpolation {settings.interpolation!r} is not "
                "'linear' or 'nearest'"
            )
        return settings

    @property
    def order(self) -> int:
        """Spline order of the resizing (0 nearest, 1 linear)."""
        return 1 if self.interpolation == "linear" else 0


def _grid(value: Any, key: str) -> tuple[int, int, int]:
    if not isinstance(value, list | tuple) or len(value) != 3 or not all(int(v) >= 16 for v in value):
        raise ModelCardError(f"brain extraction card: preprocessing.{key} {value!r} must be 3 sizes >= 16")
    a, b, c = (int(v) for v in value)
    return a, b, c


def _pair(value: Any) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    return low, high


def resize(
    array: npt.NDArray[np.float32],
    shape: tuple[int, ...],
    order: int,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Resize ``array`` to ``shape`` by index, voxel edges aligned (PyTorch's ``align_corners=False``).

    ``order`` 0 is PyTorch's ``nearest-exact``, 1 its ``trilinear``. ``out``: a float32 array of
    ``shape`` to write into (and return) instead of a new array.
    """
    if tuple(array.shape) == tuple(shape):
        if out is None:
            return np.asarray(array, dtype=np.float32)
        out[...] = array
        return out
    if order == 0:
        return _nearest(np.asarray(array, dtype=np.float32), shape, out)
    zoom = [n / o for n, o in zip(shape, array.shape, strict=True)]
    zoomed = ndimage.zoom(
        np.asarray(array, dtype=np.float32),
        zoom,
        output=np.float32 if out is None else out,
        order=order,
        mode="nearest",
        grid_mode=True,
        prefilter=False,
    )
    return out if out is not None else np.asarray(zoomed, dtype=np.float32)


#: Output bytes per step of a growing nearest-neighbour resize.
NEAREST_CHUNK_BYTES = 4 * 1024 * 1024


def _nearest(
    source: npt.NDArray[np.float32], shape: tuple[int, ...], out: npt.NDArray[np.float32] | None
) -> npt.NDArray[np.float32]:
    """:func:`resize` with ``order`` 0: the same voxels as ndimage.zoom(order=0, grid_mode=True), 2-3x
    faster."""
    index = [_nearest_index(n_in, n_out) for n_in, n_out in zip(source.shape, shape, strict=True)]
    if np.prod(shape) <= source.size:  # shrinking: one 3D gather
        result = np.asarray(source[np.ix_(*index)])
        if out is None:
            return result
        out[...] = result
        return out
    # Growing: one axis at a time copies whole rows (~3x faster than the 3D gather on 256³), a few MiB
    # of output planes at a time (no grown copy of the whole image beside the result), the last axis
    # straight into the result (mode "clip": the indices are in range; "raise" would fill a temporary).
    result = np.empty(shape, np.float32) if out is None else out
    plane = int(np.prod(shape[1:], dtype=np.int64)) * 4
    step = max(1, NEAREST_CHUNK_BYTES // max(plane, 1))
    for first in range(0, shape[0], step):
        part = source[index[0][first : first + step]]
        for axis in range(1, len(index) - 1):
            part = np.take(part, index[axis], axis=axis)
        np.take(part, index[-1], axis=len(index) - 1, out=result[first : first + step], mode="clip")
    return result


def _nearest_index(n_in: int, n_out: int) -> npt.NDArray[np.intp]:
    """Source index of each of ``n_out`` voxels resized from ``n_in``, centres aligned (nearest-exact)."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)


def normalize(
    x: npt.NDArray[np.float32],
    low: float,
    high: float,
    s: BrainExtractionSettings,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """deepbet's ``normalize``: clip to [low, high] scaled to [0, 1], z-score, ``* 0.226 + 0.449``.

    In place on one float32 copy (``out`` when given, which may be ``x`` itself), mean and variance
    accumulated in float64 (the brain grid is 256³: the textbook form's float64 temporaries cost
    ~0.1 s per call).
    """
    y = np.subtract(x, np.float32(low), out=out, dtype=np.float32)
    y *= np.float32(1.0 / max(high - low, 1e-6))
    np.clip(y, 0.0, 1.0, out=y)
    flat = y.reshape(-1)
    mean = float(flat.sum(dtype=np.float64)) / flat.size
    var = max(float(np.einsum("i,i->", flat, flat, dtype=np.float64)) / flat.size - mean * mean, 0.0)
    std = var**0.5 if var > 0 else 1.0
    y *= np.float32(s.scale_std / std)
    y += np.float32(s.scale_mean - mean * s.scale_std / std)
    return y


def largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The largest 26-connected component of ``mask`` (empty stays empty)."""
    labels, count = ndimage.label(mask, structure=_CONNECT26)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(sizes.argmax()), dtype=bool)


def bbox_with_margin(
    small: npt.NDArray[np.bool_], shape: tuple[int, ...], s: BrainExtractionSettings
) -> tuple[slice, slice, slice] | None:
    """deepbet's box: planes of ``small`` more than ``bbox_plane_fraction`` foreground, grown by
    ``bbox_margin`` per side, scaled to ``shape``; None when no plane qualifies."""
    centres, sizes = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        rows = np.flatnonzero(small.mean(axis=others) > s.bbox_plane_fraction)
        if rows.size == 0:
            return None
        centres.append((rows.max() + 1 + rows.min()) / 2)
        sizes.append((rows.max() + 1) - rows.min())
    out = []
    for centre, size, n, m in zip(centres, sizes, shape, small.shape, strict=True):
        scale = n / m
        c = round(centre * scale)
        z = round(size * scale * (1 + 2 * s.bbox_margin))
        out.append(slice(max(0, int(c - z / 2)), min(n, int(c + z / 2))))
    return out[0], out[1], out[2]


def structure(image: npt.NDArray[Any], mask: npt.NDArray[np.bool_], affine: npt.NDArray[Any]) -> float:
    """Correlation of neighbouring voxels inside ``mask`` along the finest axis of ``affine``.

    An MR image of a head is smooth at the voxel scale (about 0.9 on the series at hand); noise is
    not (about 0). Computed on the pairs of voxels both inside the mask.
    """
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    axis = int(np.argmin(spacing))
    a = np.moveaxis(np.asarray(image, dtype=np.float32), axis, 0)
    m = np.moveaxis(mask, axis, 0)
    both = m[1:] & m[:-1]
    if np.count_nonzero(both) < 100:
        return 0.0
    x, y = a[1:][both].astype(np.float64), a[:-1][both].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


#: Thickness (mm, at least one voxel along each axis) of the shell just outside the mask that
#: :func:`contrast` compares the mask with.
CONTRAST_SHELL_MM = 2.0


def contrast(
    image: npt.NDArray[Any], mask: npt.NDArray[np.bool_], affine: npt.NDArray[Any], low: float
) -> float:
    """How far the mask stands out from what lies just outside it: the median inside ``mask`` minus
    the median of a shell :data:`CONTRAST_SHELL_MM` thick around it, over the median inside minus
    ``low`` (the image's low percentile: air).

    Just outside a brain lie CSF, meninges and skull, dark on FLAIR, T1, T1GD and T2 alike (zero on
    a skull-stripped image): 0.45 and 0.64 on the real T1 heads with skull in ``dicom/``, 1.0 on every
    BraTS FLAIR, T1 and T1GD at hand, 0.40 to 0.74 on whole-head FLAIR phantoms (a BraTS brain in a
    real head, 1 to 6 mm slices; the 99th percentile outside the brain 2.2 to 3.7 times the brain's
    median); about 0 on noise, and 0 on the test pattern that the networks nevertheless outline (the
    GE series in ``dicom/``: at least half its mask is at the image's floor). Neither the scalp,
    marrow and orbital fat farther out nor the brightest voxels of the image (fat, enhancing tumour)
    enter the figure: the former measure (median of the rest of the mask's box over the 0.5-99.5
    percentile range: 0.40 to 0.81 on BraTS, 0.19 to 0.29 on the heads and phantoms above) fell to
    0.05 on a correctly masked whole-head FLAIR with bright fat.

    The shell is the mask grown by a box of :data:`CONTRAST_SHELL_MM` (rounded to whole voxels,
    at least one) along each axis of ``affine``, less the mask; a mask with nothing around it
    (filling the image) counts as standing out (1.0).
    """
    box = bounding_box(mask)
    assert box is not None, "contrast of an empty mask"
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    radii = [max(1, round(CONTRAST_SHELL_MM / float(step))) for step in spacing]
    grown_box = tuple(
        slice(max(b.start - r, 0), min(b.stop + r, n)) for b, r, n in zip(box, radii, mask.shape, strict=True)
    )
    region, values = mask[grown_box], np.asarray(image)[grown_box]
    grown = region.view(np.uint8)
    for axis, r in enumerate(radii):
        grown = ndimage.maximum_filter1d(grown, 2 * r + 1, axis=axis)
    shell = (grown > 0) & ~region
    if not shell.any():
        return 1.0
    inside = float(np.median(values[region]))
    if not inside > low:  # the mask holds the image's floor: nothing in it stands out
        return 0.0
    return (inside - float(np.median(values[shell]))) / (inside - low)


def add_stripped_brain(
    image: npt.NDArray[Any], mask: npt.NDArray[np.bool_], affine: npt.NDArray[Any], s: BrainExtractionSettings
) -> tuple[npt.NDArray[np.bool_], bool]:
    """On an image already skull-stripped, the non-zero voxels near the mask join it; else unchanged.

    An image is taken as skull-stripped when fewer than ``stripped_outside_fraction`` of its non-zero
    voxels lie farther than ``stripped_margin_mm`` from the mask (a head with skull and scalp has
    far more). The network's mask is a few millimetres tighter than what BraTS-style stripping keeps;
    without this it would cut up to 3 % of the brain such images hold (measured on the BraTS training
    cases, docs/model-card.md).
    """
    nonzero = np.asarray(image) != 0
    total = np.count_nonzero(nonzero)
    if total == 0:
        return mask, False
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    pad = [int(np.ceil(s.stripped_margin_mm / sp)) + 1 for sp in spacing]
    tight = bounding_box(mask)
    if tight is None:
        return mask, False
    box = tuple(
        slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(tight, pad, mask.shape, strict=True)
    )
    # A head with skull, scalp or background noise has non-zero voxels beyond the mask's box grown
    # by the margin: decided without looking for the voxels near the mask.
    if total - np.count_nonzero(nonzero[box]) > s.stripped_outside_fraction * total:
        return mask, False
    inside = mask[box]
    joining = near_mask(inside, nonzero[box] & ~inside, spacing, s.stripped_margin_mm)
    outside = total - np.count_nonzero(nonzero[box] & inside) - np.count_nonzero(joining)
    if outside > s.stripped_outside_fraction * total:
        return mask, False
    # The box's border is at least one voxel beyond anything that joins (or the image's own border),
    # so filling holes inside it is filling them in the whole image.
    out = np.zeros_like(mask)
    out[box] = fill_holes(inside | joining)
    return out, True


def near_mask(
    mask: npt.NDArray[np.bool_],
    candidates: npt.NDArray[np.bool_],
    spacing: npt.NDArray[Any],
    margin_mm: float,
) -> npt.NDArray[np.bool_]:
    """The voxels of ``candidates`` (outside ``mask``) at most ``margin_mm`` from a voxel of ``mask``.

    Euclidean distance in mm on a grid of ``spacing`` (mm per axis): the voxels where
    ``ndimage.distance_transform_edt(~mask, sampling=spacing) <= margin_mm``, found at a fraction of
    its cost (~0.1 s against ~0.7 s for a 1 mm brain). Only candidates within the mask grown by a cube
    of the margin can qualify (a separable maximum filter); their distances come from a k-d tree of
    the mask's surface, which holds the nearest mask voxel of every voxel outside the mask.
    """
    from scipy.spatial import cKDTree

    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any() or not candidates.any():
        return out
    grown = mask.view(np.uint8)
    for axis, step in enumerate(spacing):
        grown = ndimage.maximum_filter1d(grown, 2 * int(margin_mm // step) + 1, axis=axis)
    near = np.argwhere(candidates & (grown > 0))
    if len(near) == 0:
        return out
    tree = cKDTree(np.argwhere(surface(mask)) * spacing)
    # The bound is exclusive; the margin itself counts as near.
    distance, _ = tree.query(near * spacing, distance_upper_bound=margin_mm * (1 + 1e-9), workers=-1)
    out[tuple(near[distance <= margin_mm].T)] = True
    return out


#: How far (mm) the image is continued past a face that cuts through the head, its edge plane
#: repeated, before the networks run (:func:`continue_cut_faces`).
CUT_FACE_PAD_MM = 20.0
#: A face of the volume cuts through the head when at least this share of its voxels is brighter than
#: a tenth of the way from the low to the high percentile (air is darker; a brain or scalp is not).
CUT_FACE_SHARE = 0.05
#: Switch for measurements (benchmarks): False runs the networks on the image as it is.
CONTINUE_CUT_FACES = True


def cut_faces(image: npt.NDArray[Any], low: float, high: float) -> list[tuple[int, int]]:
    """(axis, 0 for the first plane or 1 for the last) of each face of ``image`` that cuts through
    the head: a series that covers part of the brain (vertex or skull base missing)."""
    level = low + 0.1 * (high - low)
    faces = []
    for axis in range(3):
        for end, index in ((0, 0), (1, image.shape[axis] - 1)):
            if float(np.mean(np.take(image, index, axis=axis) > level)) >= CUT_FACE_SHARE:
                faces.append((axis, end))
    return faces


def continue_cut_faces(
    image: npt.NDArray[Any], affine: npt.NDArray[Any], low: float, high: float
) -> tuple[npt.NDArray[Any], tuple[slice, slice, slice]]:
    """``image`` continued by :data:`CUT_FACE_PAD_MM` past each face that cuts through the head (its
    edge plane repeated), and the slices that give the original voxels back.

    The networks saw a brain ending at such a face and drew the mask's edge some millimetres inside
    it: tumour there was then "outside the brain" and removed (10-19 % of the tumour of BraTS cases
    cut through the brain). The image is returned as it is when no face cuts through the head.
    """
    pads = [[0, 0], [0, 0], [0, 0]]
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    for axis, end in cut_faces(image, low, high):
        pads[axis][end] = int(np.ceil(CUT_FACE_PAD_MM / max(float(spacing[axis]), 1e-3)))
    crop = (
        slice(pads[0][0], pads[0][0] + image.shape[0]),
        slice(pads[1][0], pads[1][0] + image.shape[1]),
        slice(pads[2][0], pads[2][0] + image.shape[2]),
    )
    if not any(any(p) for p in pads):
        return image, crop
    return np.pad(image, [tuple(p) for p in pads], mode="edge"), crop


def voxel_ml(affine: npt.NDArray[np.floating[Any]]) -> float:
    """Volume of one voxel in mL from a voxel-to-world affine (mm)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def brain_volume_ml(mask: npt.NDArray[np.bool_], affine: npt.NDArray[np.floating[Any]]) -> float:
    """Volume of ``mask`` in mL on the grid of ``affine``."""
    return float(np.count_nonzero(mask)) * voxel_ml(affine)


class BrainMasker:
    """deepbet's brain extraction around two network callables.

    Parameters
    ----------
    settings:
        The card's pre/post-processing (:meth:`BrainExtractionSettings.from_card`).
    bbox_net, brain_net:
        Each takes the normalised grid (``settings.bbox_grid`` / ``settings.brain_grid``) and returns
        the brain probability on it.
    """

    def __init__(self, settings: BrainExtractionSettings, bbox_net: Network, brain_net: Network) -> None:
        self.settings = settings
        self.bbox_net = bbox_net
        self.brain_net = brain_net

    def probabilities(
        self, image: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[np.float32], tuple[slice, slice, slice]]:
        """The brain network's probabilities on the crop, and the crop (before thresholding).

        Raises
        ------
        NoBrainFoundError
            The box network finds no brain.
        """
        s = self.settings
        if image.ndim != 3 or min(image.shape) < 2:
            raise NoBrainFoundError(f"brain extraction needs a 3D volume, got shape {image.shape}")
        x = np.asarray(image, dtype=np.float32)
        if not np.isfinite(x).all():  # a copy only then: the image is read, never written (35 MiB on 1 mm)
            x = np.nan_to_num(x)
        box, low, high = self._box(x)
        crop = x[box]
        # Resized and normalised in one network buffer, which the brain network consumes as it reads it.
        grid = resize(crop, s.brain_grid, s.order, out=network_buffer(s.brain_grid))
        p = self.brain_net(normalize(grid, low, high, s, out=grid))
        return resize(p, crop.shape, s.order), box

    def _box(self, x: npt.NDArray[np.float32]) -> tuple[tuple[slice, slice, slice], float, float]:
        """The box network's crop of ``x`` (finite, float32) and the intensity window (low, high) both
        networks normalise with. A method of its own so that the box network's grids (its input, output
        and mask, ~18 MiB) are gone before the brain network runs, at the job's memory peak.

        Raises
        ------
        NoBrainFoundError
            A uniform image, or the box network finds no head.
        """
        s = self.settings
        small = resize(x, s.bbox_grid, s.order)
        low, high = (float(v) for v in np.percentile(small, s.percentiles))
        if not high > low:
            raise NoBrainFoundError("brain extraction: the image is uniform (no contrast)")
        p_small = self.bbox_net(normalize(small, low, high, s))
        box_mask = largest_component(p_small > s.threshold)
        box = bbox_with_margin(box_mask, x.shape, s) if box_mask.any() else None
        if box is None or any(b.stop - b.start < 2 for b in box):
            raise NoBrainFoundError("brain extraction found no brain (the box network found no head)")
        return box, low, high

    def network_mask(self, image: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """deepbet's mask (threshold, largest component, holes filled), before the node's checks."""
        p, box = self.probabilities(image)
        return self.mask_of(p, box, image.shape)

    def mask_of(
        self, p: npt.NDArray[np.float32], box: tuple[slice, slice, slice], shape: tuple[int, ...]
    ) -> npt.NDArray[np.bool_]:
        """:meth:`network_mask` from :meth:`probabilities`' output ``(p, box)`` on an image of ``shape``."""
        crop = fill_holes(largest_component(p > self.settings.threshold))
        mask = np.zeros(shape, dtype=bool)
        mask[box] = crop
        return mask

    def _network_mask_continued(
        self, image: npt.NDArray[Any], affine: npt.NDArray[Any]
    ) -> npt.NDArray[np.bool_]:
        """:meth:`network_mask` of ``image`` continued past the faces that cut through the head
        (:func:`continue_cut_faces`), given back on ``image``'s grid."""
        if not CONTINUE_CUT_FACES or image.ndim != 3 or min(image.shape) < 2:
            return self.network_mask(image)  # which refuses what is no volume
        finite = np.asarray(image) if np.isfinite(image).all() else np.nan_to_num(np.asarray(image))
        low, high = (float(v) for v in np.percentile(finite[::2, ::2, ::2], self.settings.percentiles))
        padded, crop = continue_cut_faces(finite, affine, low, high)
        if padded is finite:
            return self.network_mask(finite)  # NaN already replaced: no second copy in probabilities()
        return self.network_mask(padded)[crop]

    def extract(self, image: npt.NDArray[Any], affine: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """The brain mask of ``image``, on its grid.

        An image finer than about 2/3 of :data:`~converters.resample.BLOCK_MM` along an axis (a 3D
        series reconstructed at 0.4-0.6 mm) is averaged over blocks of whole voxels about that wide
        first (:func:`~converters.resample.block_mean`), and the mask computed on those blocks is
        given back on the image's own grid (:func:`~converters.resample.expand_blocks`). The networks
        see their own grids whatever the series; the rest (components, holes, the checks) costs time
        and memory in proportion to the voxels, eight times as many at 0.5 mm as at 1 mm.

        Parameters
        ----------
        image:
            (X, Y, Z) voxels in RAS order (:func:`node.pipeline.assemble_coregistered`), any spacing.
        affine:
            Voxel-to-RAS-mm affine of ``image`` (for the minimum brain volume).

        Raises
        ------
        NoBrainFoundError
            No brain, or a mask below ``min_brain_ml``.
        """
        factors = reduction_factors(affine, image.shape) if image.ndim == 3 else (1, 1, 1)
        if factors == (1, 1, 1):
            return self._extract(image, affine)
        small, small_affine = block_mean(image, affine, factors)
        return expand_blocks(self._extract(small, small_affine), factors, image.shape)

    def _extract(self, image: npt.NDArray[Any], affine: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        s = self.settings
        mask = self._network_mask_continued(image, affine)
        volume = brain_volume_ml(mask, affine)
        if volume < s.min_brain_ml:
            raise NoBrainFoundError(
                f"brain extraction found no brain: {volume:.0f} mL below the minimum {s.min_brain_ml:.0f} mL"
            )
        r = structure(image, mask, affine)
        if r < s.min_structure:
            raise NoBrainFoundError(
                f"brain extraction found no brain: the image inside the {volume:.0f} mL mask is noise "
                f"(neighbour correlation {r:.2f} < {s.min_structure})"
            )
        low = float(np.percentile(image, s.percentiles[0]))
        c = contrast(image, mask, affine, low)
        if c < s.min_contrast:
            raise NoBrainFoundError(
                f"brain extraction found no brain: the {volume:.0f} mL mask does not stand out from its "
                f"surroundings (contrast {c:.2f} < {s.min_contrast})"
            )
        mask, stripped = add_stripped_brain(image, mask, affine, s)
        if stripped:
            logger.info("brain extraction: the image is already skull-stripped; its non-zero voxels kept")
        return mask
