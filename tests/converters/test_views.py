"""Multi-view prediction (converters/prediction.py ``predict_views``): the window rebuilt from the
prepared slices, each view's probabilities put back on the right voxels, the average, and when the
other views are left out."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from converters.exceptions import PredictionError
from converters.prediction import (
    MIN_VIEW_EXTENT_FRACTION,
    SlicePredictor,
    predict_slices,
    predict_views,
    view_axes,
    window_channels,
)
from converters.preprocess import Prepared, PreprocessError, PreprocessSpec, prepare_volume

SIGMOID = {"activation": "sigmoid", "threshold": 0.5}
SOFTMAX = {"activation": "softmax"}
CROP = (32, 32)


def _card(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, Any]:
    return {"spacing_mm": list(spacing), "crop_size": list(CROP), "normalization": "zscore_nonzero",
            "slice_axis": 2}  # fmt: skip


def _prepared(shape: tuple[int, int, int] = (40, 36, 30), seed: int = 0) -> Prepared:
    """A random, lopsided 'brain' (an off-centre ellipsoid of noise) on a 1 mm grid, prepared."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = np.array(shape) * np.array([0.45, 0.55, 0.5])
    radii = np.array(shape) * np.array([0.35, 0.3, 0.4])
    inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(axis=0) <= 1
    image = np.where(inside, rng.uniform(1.0, 3.0, shape), 0.0).astype(np.float32)
    return prepare_volume({"FLAIR": image}, np.eye(4), _card(), ["FLAIR"], inside)


def _pointwise(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A 'network' that looks at each pixel alone: every view gives each voxel the same logit, so only
    a voxel put back in the wrong place can change the average. Zero (outside the brain) is ~0."""
    return np.where(batch[:, :1] != 0, 3.0 * batch[:, :1], -30.0).astype(np.float32)


def _sigmoid(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_view_axes_start_with_the_slice_axis_and_need_an_isotropic_grid() -> None:
    spec = PreprocessSpec.from_card(_card())
    assert view_axes(spec, 1) == (2,)
    assert view_axes(spec, 3) == (2, 0, 1)
    assert view_axes(PreprocessSpec.from_card({**_card(), "slice_axis": 0}), 3) == (0, 1, 2)
    assert view_axes(PreprocessSpec.from_card(_card((1.0, 1.0, 3.0))), 3) == (2,)
    with pytest.raises(PredictionError, match="views 2 must be 1 or 3"):
        view_axes(spec, 2)


def test_window_channels_put_the_kept_slices_back_in_place() -> None:
    whole = _prepared()
    # Slices the brain mask does not reach are dropped (none here): drop the first and last two.
    prepared = replace(whole, slices=whole.slices[2:-2], slice_indices=whole.slice_indices[2:-2])
    volume = window_channels(prepared)
    assert volume.shape == (1, *prepared.window_shape)
    planes = np.moveaxis(volume[0], prepared.slice_axis, 0)
    np.testing.assert_array_equal(planes[prepared.slice_indices], prepared.slices[:, 0])
    dropped = np.setdiff1d(np.arange(len(planes)), prepared.slice_indices)
    assert len(dropped) == 4 and not planes[dropped].any()


def test_every_view_puts_its_probabilities_on_the_voxels_it_read() -> None:
    """A pointwise network gives the same probability from every view; a view transposed or shifted on
    its way back would not."""
    prepared = _prepared()
    calls: list[int] = []

    def along(axis: int) -> SlicePredictor:
        calls.append(axis)
        return _pointwise

    one = predict_slices(_pointwise, prepared.slices, 16, CROP)
    three = predict_views(along, prepared, SIGMOID, CROP, (2, 0, 1), batch_size=7)
    assert calls == [2, 0, 1] and three.shape == one.shape
    np.testing.assert_allclose(_sigmoid(three), _sigmoid(one), atol=1e-6)


def test_the_views_probabilities_are_averaged() -> None:
    """Each view answers a constant logit of its own: inside the brain the result is the mean of the
    three probabilities (0.2, 0.5, 0.8 -> 0.5), not of the logits."""
    prepared = _prepared()
    logits = {2: np.log(0.2 / 0.8), 0: 0.0, 1: np.log(0.8 / 0.2)}

    def along(axis: int) -> SlicePredictor:
        return lambda b: np.full((len(b), 1, *b.shape[2:]), logits[axis], dtype=np.float32)

    out = predict_views(along, prepared, SIGMOID, CROP, (2, 0, 1))
    inside = prepared.slices[:, 0] != 0
    np.testing.assert_allclose(_sigmoid(out[:, 0][inside]), 0.5, atol=1e-6)
    # Where another view's plane holds no brain at all it is not predicted: its probability is 0 there.
    assert _sigmoid(out[:, 0][~inside]).min() < 0.5


def test_softmax_views_average_class_probabilities() -> None:
    prepared = _prepared()
    per_axis = {2: [2.0, 0.0, 0.0], 0: [0.0, 2.0, 0.0], 1: [0.0, 0.0, 2.0]}

    def along(axis: int) -> SlicePredictor:
        values = np.asarray(per_axis[axis], dtype=np.float32)[None, :, None, None]
        return lambda b: np.broadcast_to(values, (len(b), 3, *b.shape[2:])).copy()

    out = predict_views(along, prepared, SOFTMAX, CROP, (2, 0, 1))
    e = np.exp(out.astype(np.float64))
    probs = e / e.sum(axis=1, keepdims=True)
    inside = prepared.slices[:, 0] != 0
    for k in range(3):
        np.testing.assert_allclose(probs[:, k][inside], 1 / 3, atol=1e-6)


def test_a_slab_keeps_its_own_slice_axis_alone() -> None:
    """A window spanning less than half the crop along the slice axis (a slab through the brain) is not
    cut along the other axes: their slices would be narrow bands the network never saw."""
    slab_slices = int(MIN_VIEW_EXTENT_FRACTION * min(CROP)) - 2
    prepared = _prepared((40, 36, slab_slices))
    assert prepared.window_shape[2] < MIN_VIEW_EXTENT_FRACTION * min(CROP)
    calls: list[int] = []

    def along(axis: int) -> SlicePredictor:
        calls.append(axis)
        return _pointwise

    out = predict_views(along, prepared, SIGMOID, CROP, (2, 0, 1))
    assert calls == [2]
    np.testing.assert_array_equal(out, predict_slices(_pointwise, prepared.slices, 16, CROP))


def test_a_window_longer_than_the_crop_is_taken_whole_in_the_other_views() -> None:
    """The window spans more slices than the 32 crop (the brain is 56 mm high): the sagittal and coronal
    slices are 32 wide and that long, padded to the network's stride, and every voxel still gets its
    own probability."""
    prepared = _prepared((40, 36, 70), seed=3)
    assert prepared.window_shape[2] > CROP[0]
    sizes: set[tuple[int, int]] = set()

    def pointwise_sized(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        sizes.add((int(batch.shape[2]), int(batch.shape[3])))
        return _pointwise(batch)

    out = predict_views(lambda axis: pointwise_sized, prepared, SIGMOID, CROP, (2, 0, 1))
    extent = prepared.window_shape[2]
    assert (32, -(-extent // 32) * 32) in sizes  # padded to a multiple of the crop's power-of-two part
    alone = predict_slices(_pointwise, prepared.slices)
    np.testing.assert_allclose(_sigmoid(out), _sigmoid(alone), atol=1e-6)


def test_bad_axes_are_refused() -> None:
    prepared = _prepared()
    with pytest.raises(PredictionError, match="including the prepared slice axis 2"):
        predict_views(lambda a: _pointwise, prepared, SIGMOID, CROP, (0, 1))
    with pytest.raises(PredictionError, match="distinct"):
        predict_views(lambda a: _pointwise, prepared, SIGMOID, CROP, (2, 2))


def test_a_card_may_ask_for_three_views_on_an_isotropic_grid_only() -> None:
    assert PreprocessSpec.from_card(_card()).views == 1
    assert PreprocessSpec.from_card({**_card(), "views": 3}).views == 3
    with pytest.raises(PreprocessError, match=r"preprocessing\.views 2 must be 1 or 3"):
        PreprocessSpec.from_card({**_card(), "views": 2})
    with pytest.raises(PreprocessError, match=r"views 3 needs an isotropic spacing_mm, not \[1.0, 1.0, 3"):
        PreprocessSpec.from_card({**_card((1.0, 1.0, 3.0)), "views": 3})


def test_segment_volume_runs_a_three_view_card_along_its_three_axes() -> None:
    """What the trainer's evaluation and export use (converters.prediction.segment_volume): a card whose
    ``preprocessing.views`` is 3 gets its network run along the three axes, planes of each."""
    from converters.prediction import segment_volume

    rng = np.random.default_rng(4)
    image = np.zeros((40, 36, 30), dtype=np.float32)
    image[8:32, 6:30, 4:26] = rng.uniform(0.0, 3.0, (24, 24, 22))
    sizes: list[tuple[int, ...]] = []

    def recording(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        sizes.append(tuple(batch.shape[2:]))
        return _pointwise(batch)

    card = {"modalities": ["FLAIR"], "preprocessing": {**_card(), "orientation": "RAS"}, "output": SIGMOID}
    one = segment_volume(recording, card, {"FLAIR": image}, np.eye(4))
    calls_one = len(sizes)
    three_card = {**card, "preprocessing": {**card["preprocessing"], "views": 3}}
    three = segment_volume(recording, three_card, {"FLAIR": image}, np.eye(4))
    assert len(sizes) - calls_one > calls_one  # the sagittal and coronal planes too
    np.testing.assert_array_equal(three, one)  # a pointwise network: every view agrees
