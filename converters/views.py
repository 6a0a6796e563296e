"""A 2D network run along more than one axis of the model's grid, its probabilities averaged.

:func:`converters.preprocess.prepare_volume` cuts the model's window into slices along the card's
``slice_axis`` (axial for the shipped models). On an isotropic model grid, the window's sagittal and
coronal slices are images of the same kind at the same scale; a network trained with 90° rotations
and flips of its slices (trainer/data.py ``augment``) segments them too. :func:`predict_views` runs
it along each axis asked for and averages the probabilities, a multi-view ensemble that gives a 2D
network some 3D context (docs/holdout_eval/views-2026-12-06.md). What it returns are raw outputs for
the prepared slices again, so thresholding and restoring onto the source grid are unchanged.

numpy only: the caller supplies the network as a slice predictor per axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import PredictionError
from converters.prediction import (
    SlicePredictor,
    outputs_to_probabilities,
    predict_slices,
    probabilities_to_outputs,
)
from converters.preprocess import Prepared, PreprocessSpec

__all__ = ["MIN_VIEW_EXTENT_FRACTION", "predict_views", "view_axes", "window_channels"]

#: The other axes are used only when the window spans at least this fraction of the crop along the
#: card's slice axis: on a slab through the brain (a targeted series) a sagittal or coronal slice is
#: a narrow band, an image the network never saw.
MIN_VIEW_EXTENT_FRACTION = 0.5


def view_axes(spec: PreprocessSpec, views: int) -> tuple[int, ...]:
    """The axes of the model's grid to cut slices along: the card's ``slice_axis`` first, then, for
    ``views`` 3, the other two in order. A grid that is not isotropic keeps the card's axis alone
    (its other slices would have another aspect than those the network was trained on).

    Raises
    ------
    PredictionError
        ``views`` is not 1 or 3.
    """
    if views not in (1, 3):
        raise PredictionError(f"views {views!r} must be 1 or 3")
    if views == 1 or not isotropic(spec):
        return (spec.slice_axis,)
    return (spec.slice_axis, *(a for a in (0, 1, 2) if a != spec.slice_axis))


def isotropic(spec: PreprocessSpec) -> bool:
    """Whether the model's grid has the same spacing along its three axes (within 1e-6 mm)."""
    return max(spec.spacing_mm) - min(spec.spacing_mm) <= 1e-6


def window_channels(prepared: Prepared) -> npt.NDArray[np.float32]:
    """The prepared window as a volume (C, X, Y, Z): the kept slices in place, zeros on the others
    (what the window holds outside the brain)."""
    _, c, h, w = prepared.slices.shape
    planes = np.zeros((prepared.window_shape[prepared.slice_axis], c, h, w), dtype=np.float32)
    planes[prepared.slice_indices] = prepared.slices
    # (S, C, H, W) -> (C, S, H, W) -> the slice axis back in its place; H and W keep their order.
    return np.moveaxis(planes.transpose(1, 0, 2, 3), 1, 1 + prepared.slice_axis)


def _fitted(
    predict: SlicePredictor, planes: npt.NDArray[np.float32], tile: tuple[int, int], batch_size: int
) -> npt.NDArray[np.float32]:
    """Outputs (N, K, P, Q) for planes of any size: a side shorter than ``tile`` is zero-padded to it
    (centred) first, a longer one is taken whole by :func:`predict_slices`."""
    p, q = int(planes.shape[2]), int(planes.shape[3])
    big_p, big_q = max(p, tile[0]), max(q, tile[1])
    top, left = (big_p - p) // 2, (big_q - q) // 2
    if (big_p, big_q) != (p, q):
        padded = np.zeros((*planes.shape[:2], big_p, big_q), dtype=np.float32)
        padded[:, :, top : top + p, left : left + q] = planes
        planes = padded
    out = predict_slices(predict, planes, batch_size, tile)
    return np.ascontiguousarray(out[:, :, top : top + p, left : left + q])


def _view_probabilities(
    predict: SlicePredictor,
    volume: npt.NDArray[np.float32],
    axis: int,
    prepared: Prepared,
    output_spec: Mapping[str, Any],
    tile: tuple[int, int],
    batch_size: int,
) -> npt.NDArray[np.float32]:
    """Probabilities (S, K, H, W) for ``prepared``'s slices from the network run along ``axis``."""
    planes = np.moveaxis(volume, 1 + axis, 0)  # (N, C, P, Q)
    keep = np.flatnonzero(np.abs(planes).reshape(len(planes), -1).max(axis=1) > 0)
    probs, background = outputs_to_probabilities(
        _fitted(predict, np.ascontiguousarray(planes[keep]), tile, batch_size), output_spec
    )
    full = np.empty((len(planes), probs.shape[1], *planes.shape[2:]), dtype=np.float32)
    full[:] = np.asarray(background, dtype=np.float32)[None, :, None, None]
    full[keep] = probs
    # (N, K, P, Q) -> (K, X, Y, Z) -> cut along the prepared slice axis: (S, K, H, W)
    grid = np.moveaxis(full.transpose(1, 0, 2, 3), 1, 1 + axis)
    return np.moveaxis(grid, 1 + prepared.slice_axis, 0)[prepared.slice_indices]


def predict_views(
    predict_along: Callable[[int], SlicePredictor],
    prepared: Prepared,
    output_spec: Mapping[str, Any],
    tile: tuple[int, int],
    axes: Sequence[int],
    batch_size: int = 16,
) -> npt.NDArray[np.float32]:
    """Raw outputs (S, K, H, W) for ``prepared``'s slices: the network's probabilities along each of
    ``axes`` of the window, averaged, turned back into logits (or log-probabilities).

    Parameters
    ----------
    predict_along:
        axis -> the slice predictor for slices cut along that axis of the model's grid (the node
        wraps test-time mirroring around the network per axis).
    prepared:
        The volume's slices along the card's slice axis (:func:`~converters.preprocess.prepare_volume`).
    output_spec:
        The card's ``output`` block.
    tile:
        The network's input (h, w), the card's crop.
    axes:
        Axes of the model's grid (:func:`view_axes`); the prepared slice axis must be one of them. With
        that axis alone, this is :func:`~converters.prediction.predict_slices` of the slices. The other
        axes are dropped when the window spans less than :data:`MIN_VIEW_EXTENT_FRACTION` of the crop
        along the slice axis.
    batch_size:
        Slices per network call.

    Raises
    ------
    PredictionError
        ``axes`` leaves out the prepared slice axis or names an axis twice or outside 0-2.
    """
    if prepared.slice_axis not in axes or len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
        raise PredictionError(f"view axes {tuple(axes)} must be distinct axes among 0-2 including the "
                              f"prepared slice axis {prepared.slice_axis}")
    own = predict_slices(predict_along(prepared.slice_axis), prepared.slices, batch_size, tile)
    others = [a for a in axes if a != prepared.slice_axis]
    extent = prepared.window_shape[prepared.slice_axis]
    if not others or not len(prepared.slices) or extent < MIN_VIEW_EXTENT_FRACTION * min(tile):
        return own
    total, _ = outputs_to_probabilities(own, output_spec)
    total = total.astype(np.float64)
    volume = window_channels(prepared)
    for axis in others:
        predict = predict_along(axis)
        total += _view_probabilities(predict, volume, axis, prepared, output_spec, tile, batch_size)
    return probabilities_to_outputs(total / (1 + len(others)), str(output_spec.get("activation")))
