"""Whole-volume segmentation with any 2D slice predictor (numpy only: no torch, no OpenVINO).

The counterpart of :mod:`converters.preprocess`: the volume goes through
:func:`converters.preprocess.prepare_volume` as the model card says, the slices through a
:data:`SlicePredictor` in batches, the outputs through the card's ``output`` activation, and the
label planes back onto the input grid with :meth:`converters.preprocess.Prepared.restore` (or, when
the images were resampled, the probabilities with :meth:`~converters.preprocess.Prepared.restore_scores`
and then the threshold: see :data:`RESTORE_METHODS`). The node's
OpenVINO segmenter and the trainer's PyTorch, ONNX Runtime and OpenVINO predictors all go through
these functions, so every form of a model sees exactly the same pre- and post-processing.

Views: on an isotropic model grid, the window's sagittal and coronal slices are images of the same
kind at the same scale as its axial ones; a network trained with 90° rotations and flips of its slices
segments them too. :func:`predict_views` runs it along each axis asked for (a card's
``preprocessing.views`` 3, or the node's ``[inference] three_views``) and averages the probabilities,
a multi-view ensemble that gives a 2D network some 3D context
(docs/holdout_eval/views-2026-12-06.md); what it returns are raw outputs for the prepared slices
again, so thresholding and restoring onto the source grid are unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ModelCardError, PredictionError
from converters.preprocess import Prepared, PreprocessSpec, isotropic, prepare_volume

logger = logging.getLogger(__name__)

#: How a prediction goes back onto a resampled input grid: "nearest" resamples the label planes by
#: nearest neighbour; "linear" resamples the probabilities linearly and thresholds them there.
RESTORE_METHODS = ("nearest", "linear")
#: The default: chosen on BraTS training cases written sagittal, coronal, 20° oblique and as 5 mm
#: axial slices (node/README.md, "What the node does to an image").
DEFAULT_RESTORE = "linear"

#: A slice predictor: float32 (N, C, H, W) -> raw network outputs (logits) (N, K, H, W).
SlicePredictor = Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]]


def outputs_to_labels(outputs: npt.NDArray[Any], output_spec: Mapping[str, Any]) -> npt.NDArray[np.uint8]:
    """Network outputs (N, K, H, W) -> label planes (N, H, W) uint8.

    ``sigmoid``: K == 1, label 1 where sigmoid(logit) > threshold (default 0.5).
    ``softmax``: label = argmax over K classes (the class index is the Decathlon label).

    Raises
    ------
    PredictionError
        ``outputs`` is not 4-D.
    ModelCardError
        The card's ``output`` block names an unknown activation or a threshold outside (0, 1).
    """
    outputs = np.asarray(outputs)
    if outputs.ndim != 4:
        raise PredictionError(f"network output shape {outputs.shape} is not (N, K, H, W)")
    activation = output_spec.get("activation")
    if activation == "sigmoid":
        threshold = float(output_spec.get("threshold", 0.5))
        if not 0.0 < threshold < 1.0:
            raise ModelCardError(f"output.threshold {threshold!r} must lie strictly between 0 and 1")
        logit = np.log(threshold / (1.0 - threshold))
        return (outputs[:, 0] > logit).astype(np.uint8)
    if activation == "softmax":
        return np.argmax(outputs, axis=1).astype(np.uint8)
    raise ModelCardError(f"output.activation {activation!r} is not 'sigmoid' or 'softmax'")


def outputs_to_probabilities(
    outputs: npt.NDArray[Any], output_spec: Mapping[str, Any]
) -> tuple[npt.NDArray[np.float32], list[float]]:
    """Network outputs (N, K, H, W) -> probabilities (N, K, H, W) and each class's background value.

    ``sigmoid``: one tumour probability (background value 0); ``softmax``: K class probabilities
    (background 1 for class 0, 0 for the others).

    Raises
    ------
    PredictionError
        ``outputs`` is not 4-D.
    ModelCardError
        The card's ``output`` block names an unknown activation.
    """
    outputs = np.asarray(outputs, dtype=np.float32)
    if outputs.ndim != 4:
        raise PredictionError(f"network output shape {outputs.shape} is not (N, K, H, W)")
    activation = output_spec.get("activation")
    if activation == "sigmoid":
        logits = outputs[:, :1].astype(np.float64)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32), [0.0]
    if activation == "softmax":
        shifted = outputs.astype(np.float64) - outputs.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        probs = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
        return probs, [1.0] + [0.0] * (outputs.shape[1] - 1)
    raise ModelCardError(f"output.activation {activation!r} is not 'sigmoid' or 'softmax'")


#: Probabilities are clipped to [PROBABILITY_EPS, 1 - PROBABILITY_EPS] before they become logits again.
PROBABILITY_EPS = 1e-7


def probabilities_to_outputs(probs: npt.NDArray[Any], activation: str) -> npt.NDArray[np.float32]:
    """Probabilities (N, K, H, W) (an average of several predictions) back into raw outputs that
    :func:`outputs_to_labels` and :func:`restore_outputs` read the same way: the logit for a sigmoid,
    the log-probability for a softmax (whose softmax is the probability)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    if activation == "sigmoid":
        return (np.log(p) - np.log1p(-p)).astype(np.float32)
    return np.log(p).astype(np.float32)


def probabilities_to_labels(probs: npt.NDArray[Any], output_spec: Mapping[str, Any]) -> npt.NDArray[np.uint8]:
    """Class probabilities (K, ...) -> labels (...) uint8: threshold (sigmoid) or argmax (softmax)."""
    if output_spec.get("activation") == "sigmoid":
        threshold = float(output_spec.get("threshold", 0.5))
        if not 0.0 < threshold < 1.0:
            raise ModelCardError(f"output.threshold {threshold!r} must lie strictly between 0 and 1")
        return (np.asarray(probs)[0] > threshold).astype(np.uint8)
    return np.argmax(np.asarray(probs), axis=0).astype(np.uint8)


def restore_outputs(
    prepared: Prepared, outputs: npt.NDArray[Any], card: Mapping[str, Any], method: str = DEFAULT_RESTORE
) -> npt.NDArray[np.uint8]:
    """Network outputs (N, K, H, W) of ``prepared``'s slices -> labels on the input grid.

    When the images were only cropped (not resampled) both methods are the same exact paste of the
    label planes; else ``method`` (one of :data:`RESTORE_METHODS`) says how the prediction is
    resampled back.

    Raises
    ------
    PredictionError
        ``method`` is unknown.
    """
    if method not in RESTORE_METHODS:
        raise PredictionError(f"restore method {method!r} is not one of {', '.join(RESTORE_METHODS)}")
    if method == "nearest" or not prepared.resampled:
        return prepared.restore(outputs_to_labels(outputs, card["output"]))
    probs, background = outputs_to_probabilities(outputs, card["output"])
    return prepared.restore_labels(probs, background, lambda p: probabilities_to_labels(p, card["output"]))


def input_stride(tile: tuple[int, int]) -> tuple[int, int]:
    """The multiple each in-plane side of a network's input must be, read from the input ``tile`` it
    was trained on (the card's crop): the largest power of two that divides each side.

    A network that halves its feature maps k times takes the sides that 2**k divides; the crop it was
    trained on is one of them, so 2**k divides the crop's power-of-two part, and so does every
    multiple of that part (176 -> 16: 192, 208... are taken too).
    """
    return tile[0] & -tile[0], tile[1] & -tile[1]


def padded_size(size: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    """The smallest (h, w) at least ``size`` whose sides are multiples of :func:`input_stride`."""
    stride = input_stride(tile)
    return -(-size[0] // stride[0]) * stride[0], -(-size[1] // stride[1]) * stride[1]


def predict_padded(
    predict: SlicePredictor, slices: npt.NDArray[np.float32], tile: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Outputs (N, K, H, W) for slices of another size than the network's input ``tile`` (h, w): each
    slice is zero-padded (what the window holds outside the brain) to :func:`padded_size` of its sides,
    each at least the tile's, centred, and ``predict`` sees it whole in one call; the outputs are cut
    back to the slices' size.

    One call over about the window's area, where crop-sized tiles (:func:`predict_tiled`) cost two or
    four crops for a window a few pixels longer than the crop. ``predict`` must take the padded
    shape (a convolutional network does; the node compiles it for that shape). A side that pads by
    an odd number of pixels gets the extra one at its end. A side shorter than the tile (a sagittal
    or coronal slice of a window that spans fewer slices than the crop: :func:`predict_views`) is
    padded to the tile's.
    """
    h, w = int(slices.shape[2]), int(slices.shape[3])
    big_h, big_w = padded_size((max(h, tile[0]), max(w, tile[1])), tile)
    top, left = (big_h - h) // 2, (big_w - w) // 2
    padded = np.zeros((*slices.shape[:2], big_h, big_w), dtype=np.float32)
    padded[:, :, top : top + h, left : left + w] = slices
    out = np.asarray(predict(padded), dtype=np.float32)
    return np.ascontiguousarray(out[:, :, top : top + h, left : left + w])


def tile_starts(size: int, tile: int) -> list[int]:
    """Start indices of the fewest ``tile``-long windows that cover ``size`` (>= ``tile``) with even
    overlaps: ``[0]`` when they are equal, else from 0 to ``size - tile``."""
    count = -(-size // tile)
    if count == 1:
        return [0]
    count = max(count, 2)
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def predict_tiled(
    predict: SlicePredictor, slices: npt.NDArray[np.float32], tile: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Outputs (N, K, H, W) for slices larger than the network's input ``tile`` (h, w): ``predict``
    on overlapping tiles that cover each slice (:func:`tile_starts`), the outputs averaged where the
    tiles overlap. For a network that takes no other shape than its own
    (:class:`node.segmenter.OpenVINOSegmenter` falls back to it); a slice side shorter than the tile
    is a caller's error."""
    h, w = int(slices.shape[2]), int(slices.shape[3])
    if h < tile[0] or w < tile[1]:
        raise PredictionError(f"slices of {h}x{w} are smaller than the network's input {tile[0]}x{tile[1]}")
    total: npt.NDArray[np.float32] | None = None
    count = np.zeros((h, w), dtype=np.float32)
    for y in tile_starts(h, tile[0]):
        for x in tile_starts(w, tile[1]):
            window = (slice(None), slice(None), slice(y, y + tile[0]), slice(x, x + tile[1]))
            out = np.asarray(predict(np.ascontiguousarray(slices[window])), dtype=np.float32)
            if total is None:
                total = np.zeros((len(slices), out.shape[1], h, w), dtype=np.float32)
            total[window] += out
            count[window[2:]] += 1.0
    assert total is not None
    return total / count


def predict_slices(
    predict: SlicePredictor,
    slices: npt.NDArray[np.float32],
    batch_size: int = 16,
    tile: tuple[int, int] | None = None,
) -> npt.NDArray[np.float32]:
    """Run ``predict`` over ``slices`` (N, C, H, W) in batches; returns the stacked outputs.

    ``tile``: the network's input (h, w), the card's ``crop_size``; slices larger than it (a window
    widened to a large brain, :func:`converters.preprocess.brain_window`) are zero-padded to a size
    the network takes and predicted whole (:func:`predict_padded`). None: every slice goes in as it is.

    Raises
    ------
    PredictionError
        ``batch_size`` is below 1.
    """
    if batch_size < 1:
        raise PredictionError(f"batch size {batch_size} must be at least 1")
    if tile is not None and tuple(slices.shape[2:]) != tuple(tile) and len(slices):
        def padded(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return predict_padded(predict, batch, tile)

        return predict_slices(padded, slices, batch_size)
    outs = [
        np.asarray(predict(np.ascontiguousarray(slices[i : i + batch_size])), dtype=np.float32)
        for i in range(0, len(slices), batch_size)
    ]
    if not outs:
        return np.zeros((0, 1, *slices.shape[2:]), dtype=np.float32)
    return np.concatenate(outs)


def segment_prepared(
    predict: SlicePredictor, prepared: Prepared, card: Mapping[str, Any], batch_size: int = 16
) -> npt.NDArray[np.uint8]:
    """Label planes (N, H, W) for already prepared slices (along the card's views)."""
    outputs = predict_card_views(predict, prepared, card, batch_size)
    return outputs_to_labels(outputs, card["output"])


def segment_to_grid(
    predict: SlicePredictor,
    prepared: Prepared,
    card: Mapping[str, Any],
    batch_size: int = 16,
    method: str = DEFAULT_RESTORE,
) -> npt.NDArray[np.uint8]:
    """Labels on the input grid for prepared slices (see :func:`restore_outputs`); a card with
    ``preprocessing.views`` 3 runs ``predict`` along the grid's three axes
    (:func:`converters.prediction.predict_views`)."""
    outputs = predict_card_views(predict, prepared, card, batch_size)
    return restore_outputs(prepared, outputs, card, method)


def predict_card_views(
    predict: SlicePredictor, prepared: Prepared, card: Mapping[str, Any], batch_size: int = 16
) -> npt.NDArray[np.float32]:
    """Raw outputs for ``prepared``'s slices, along the axes the card's ``preprocessing.views`` asks."""
    spec = PreprocessSpec.from_card(card["preprocessing"])
    axes = view_axes(spec, spec.views)
    return predict_views(lambda _axis: predict, prepared, card["output"], card_tile(card), axes, batch_size)


def card_tile(card: Mapping[str, Any]) -> tuple[int, int]:
    """The network's in-plane input (h, w): the card's ``preprocessing.crop_size``."""
    h, w = (int(v) for v in card["preprocessing"]["crop_size"])
    return h, w


def segment_volume(
    predict: SlicePredictor,
    card: Mapping[str, Any],
    images: Mapping[str, npt.NDArray[Any]],
    affine: npt.NDArray[Any],
    batch_size: int = 16,
    brain_mask: npt.NDArray[Any] | None = None,
    method: str = DEFAULT_RESTORE,
) -> npt.NDArray[np.uint8]:
    """Segment one volume with any slice predictor.

    Parameters
    ----------
    predict:
        float32 (N, C, H, W) -> logits (N, K, H, W).
    card:
        The model card (``modalities``, ``preprocessing``, ``output``).
    images, affine:
        Modality -> (X, Y, Z) arrays and their 4x4 voxel-to-RAS affine (any grid).
    batch_size:
        Slices per network call.
    brain_mask:
        Optional boolean brain mask on the images' grid (see :func:`prepare_volume`).
    method:
        How the prediction goes back onto a resampled grid (:data:`RESTORE_METHODS`).

    Returns
    -------
    numpy.ndarray
        uint8 (X, Y, Z) label map on the input grid.
    """
    prepared = prepare_volume(
        images, affine, card["preprocessing"], card["modalities"], brain_mask, fit_region=True
    )
    return segment_to_grid(predict, prepared, card, batch_size, method)


#: The other axes are used only when the window spans at least this fraction of the crop along the
#: card's slice axis: on a slab through the brain (a targeted series) a sagittal or coronal slice is
#: a narrow band, an image the network never saw.
MIN_VIEW_EXTENT_FRACTION = 0.5


def view_axes(spec: PreprocessSpec, views: int) -> tuple[int, ...]:
    """The axes of the model's grid to cut slices along: the card's ``slice_axis`` first, then, for
    ``views`` 3, the other two in order. A grid that is not isotropic keeps the card's axis alone
    (its other slices would have another aspect than those the network was trained on), and so does a
    card with ``context_slices`` (its channels are neighbours along the card's axis).

    Raises
    ------
    PredictionError
        ``views`` is not 1 or 3.
    """
    if views not in (1, 3):
        raise PredictionError(f"views {views!r} must be 1 or 3")
    if views == 1 or not isotropic(spec.spacing_mm) or spec.context_slices:
        return (spec.slice_axis,)
    return (spec.slice_axis, *(a for a in (0, 1, 2) if a != spec.slice_axis))


def window_channels(prepared: Prepared) -> npt.NDArray[np.float32]:
    """The prepared window as a volume (C, X, Y, Z): the kept slices in place, zeros on the others
    (what the window holds outside the brain)."""
    _, c, h, w = prepared.slices.shape
    planes = np.zeros((prepared.window_shape[prepared.slice_axis], c, h, w), dtype=np.float32)
    planes[prepared.slice_indices] = prepared.slices
    # (S, C, H, W) -> (C, S, H, W) -> the slice axis back in its place; H and W keep their order.
    return np.moveaxis(planes.transpose(1, 0, 2, 3), 1, 1 + prepared.slice_axis)


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
        predict_slices(predict, np.ascontiguousarray(planes[keep]), batch_size, tile), output_spec
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
