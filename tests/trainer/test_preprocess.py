"""converters.preprocess: z-score, crop/pad about the brain, resampling, and the restore round trip."""

from __future__ import annotations

import numpy as np
import pytest

from converters.preprocess import PreprocessError, prepare_volume, zscore_nonzero
from trainer.metrics import dice

PRE = {
    "orientation": "RAS",
    "spacing_mm": [1.0, 1.0, 1.0],
    "crop_size": [48, 40],
    "normalization": "zscore_nonzero",
    "slice_axis": 2,
}


def _brain(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' of random intensities and a blob 'tumour' label inside it."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = [n / 2 for n in shape]
    brain = ((x - c[0]) / (shape[0] * 0.35)) ** 2 + ((y - c[1]) / (shape[1] * 0.3)) ** 2 + (
        (z - c[2]) / (shape[2] * 0.4)
    ) ** 2 < 1
    image = np.where(brain, rng.normal(300, 40, shape), 0).astype(np.float32)
    tumour = ((x - c[0] - 3) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < 36
    label = np.zeros(shape, np.uint8)
    label[tumour & brain] = 2
    label[((x - c[0] - 3) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < 9] = 3
    return image, label


def test_zscore_nonzero_keeps_background_zero() -> None:
    image, _ = _brain((30, 30, 20))
    out = zscore_nonzero(image)
    mask = image != 0
    assert np.all(out[~mask] == 0)
    assert abs(float(out[mask].mean())) < 1e-5
    assert abs(float(out[mask].std()) - 1.0) < 1e-4


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_round_trip_is_exact_on_the_original_grid(axis: int) -> None:
    image, label = _brain((60, 50, 30), seed=axis)
    pre = {**PRE, "slice_axis": axis}
    prep = prepare_volume({"FLAIR": image, "T2": image * 2}, np.eye(4), pre, ["FLAIR", "T2"])
    assert prep.slices.dtype == np.float32
    assert prep.slices.shape[1:] == (2, 48, 40)
    planes = prep.crop_label(label)
    assert planes.shape == (prep.slices.shape[0], 48, 40)
    assert planes.sum() > 0
    restored = prep.restore(planes)
    assert restored.dtype == np.uint8
    assert restored.shape == label.shape
    np.testing.assert_array_equal(restored, label)


def test_crop_is_centred_on_the_brain_box_and_pads_with_zero() -> None:
    image = np.zeros((100, 30, 10), np.float32)
    image[40:80, 5:25, 2:8] = 1.0 + np.arange(40)[:, None, None]  # box centre x=60, y=15
    prep = prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR"])
    assert prep.window_shape == (48, 40, 6)  # the brain's slices 2..7 only
    assert list(prep.slice_indices) == list(range(6))
    assert prep.shift == (60 - 24, 15 - 20, 2)
    sl = prep.slices[0, 0]
    assert np.all(sl[:, :10] == 0) and np.all(sl[:, 30:] == 0)  # brain y 5..25 at columns 10..30
    assert np.all(sl[4:44, 10:30] != 0)
    assert np.count_nonzero(sl) == 40 * 20


def test_resamples_in_plane_when_spacing_differs() -> None:
    image, label = _brain((80, 80, 12), seed=3)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    prep = prepare_volume({"FLAIR": image}, affine, PRE, ["FLAIR"])
    assert prep.resampled and prep.window_shape[:2] == (48, 40)
    restored = prep.restore(prep.crop_label(label))
    assert restored.shape == label.shape
    assert dice(restored > 0, label > 0) > 0.9


def test_spacing_within_one_percent_is_not_resampled() -> None:
    image, label = _brain((40, 40, 10), seed=4)
    prep = prepare_volume({"FLAIR": image}, np.diag([1.005, 0.995, 1.008, 1.0]), PRE, ["FLAIR"])
    assert not prep.resampled
    np.testing.assert_array_equal(prep.restore(prep.crop_label(label)), label)


def test_errors_name_the_problem() -> None:
    image, _ = _brain((20, 20, 10))
    with pytest.raises(PreprocessError, match="modality T1GD needed by the model is missing"):
        prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR", "T1GD"])
    with pytest.raises(PreprocessError, match=r"modality T2 image shape \(20, 20, 9\) differs"):
        prepare_volume({"FLAIR": image, "T2": image[:, :, :9]}, np.eye(4), PRE, ["FLAIR", "T2"])
    with pytest.raises(PreprocessError, match="no non-zero voxel"):
        prepare_volume({"FLAIR": np.zeros_like(image)}, np.eye(4), PRE, ["FLAIR"])
    with pytest.raises(PreprocessError, match=r"crop_size \[0, 4\]"):
        prepare_volume({"FLAIR": image}, np.eye(4), {**PRE, "crop_size": [0, 4]}, ["FLAIR"])
    with pytest.raises(PreprocessError, match="orientation 'LPS' is not supported"):
        prepare_volume({"FLAIR": image}, np.eye(4), {**PRE, "orientation": "LPS"}, ["FLAIR"])
    prep = prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR"])
    with pytest.raises(PreprocessError, match=r"prediction shape \(1, 48, 40\) differs"):
        prep.restore(np.zeros((1, 48, 40), np.uint8))
