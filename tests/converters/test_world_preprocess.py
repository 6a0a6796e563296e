"""World-space preprocessing: the affine maths, resampling onto the model grid, the brain mask, and
that BraTS 1 mm RAS cases give the very slices the former (crop-only) preprocessing gave."""

from __future__ import annotations

import numpy as np
import pytest

from converters.nifti import list_cases, load_case
from converters.prediction import restore_outputs
from converters.preprocess import PreprocessError, prepare_volume, ras_aligned
from converters.resample import grid_shift, resample_to_grid, rotation, world_points
from tests.helpers.peers import missing, require_shared

PRE = {
    "orientation": "RAS",
    "spacing_mm": [1.0, 1.0, 1.0],
    "crop_size": [64, 56],
    "normalization": "zscore_nonzero",
    "slice_axis": 2,
}


def _affine(matrix: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, ...]) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = matrix @ np.diag(spacing)
    out[:3, 3] = origin
    return out


def _blob(shape: tuple[int, int, int], affine: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """A ball of ``radius`` mm around world point ``centre``, sampled on the grid of ``affine``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    dist = np.linalg.norm(world_points(affine, idx) - centre, axis=1)
    return (dist <= radius).reshape(shape)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return world_points(affine, np.argwhere(mask)).mean(axis=0)


def test_a_known_rotation_maps_a_point_where_it_should() -> None:
    # Source voxel (10, 20, 5) of a grid rotated 30° about S, 0.8 x 0.8 x 3 mm, offset (5, -7, 11).
    src = _affine(rotation("z", 30.0), (0.8, 0.8, 3.0), (5.0, -7.0, 11.0))
    expected = rotation("z", 30.0) @ (np.array([10, 20, 5]) * [0.8, 0.8, 3.0]) + [5.0, -7.0, 11.0]
    np.testing.assert_allclose(world_points(src, np.array([[10, 20, 5]]))[0], expected, atol=1e-12)
    # A ball around that point on the rotated grid lands, on a 1 mm RAS grid, around the same point.
    image = _blob((40, 50, 12), src, expected, 6.0).astype(np.float32)
    target = _affine(np.eye(3), (1.0, 1.0, 1.0), (-40.0, -20.0, -10.0))
    out = resample_to_grid(image, src, target, (80, 80, 60), order=1)
    weights = out / out.sum()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).reshape(-1, 3)
    centroid = (world_points(target, idx) * weights.reshape(-1, 1)).sum(axis=0)
    np.testing.assert_allclose(centroid, expected, atol=0.25)


def test_grid_shift_is_exact_only_for_whole_voxel_shifts() -> None:
    base = _affine(np.eye(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    moved = _affine(np.eye(3), (1.0, 1.0, 1.0), (3.0, -2.0, 7.0))
    assert grid_shift(base, moved) == (3, -2, 7)
    assert grid_shift(base, _affine(np.eye(3), (1.0, 1.0, 1.0), (0.5, 0.0, 0.0))) is None
    assert grid_shift(base, _affine(rotation("x", 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))) is None
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = resample_to_grid(array, base, moved, (2, 3, 4))
    assert out[0, 0, 0] == 0.0  # source (3, -2, 7) is outside
    np.testing.assert_array_equal(resample_to_grid(array, base, base, (2, 3, 4)), array)


@pytest.mark.parametrize(("thickness", "slices"), [(5.5, 20), (3.3, 30), (5.0, 20)])
def test_tumour_on_the_last_slice_of_a_series_that_ends_in_the_brain_comes_back(
    thickness: float, slices: int
) -> None:
    """A voxel covers half a voxel past its centre: a series whose last slice cuts through the brain
    and the tumour has both on the model's plane just past that slice, so the prediction put back on
    the last slice keeps its tumour (it came back empty when (slices - 1) x thickness was half a
    model voxel or more past a whole one)."""
    shape = (120, 120, slices)
    affine = _affine(np.eye(3), (1.5, 1.5, thickness), (-90.0, -90.0, 0.0))
    top = world_points(affine, np.array([[60, 60, slices - 1]]))[0]
    centre = top + np.array([10.0, 10.0, -3.0])
    head = _blob(shape, affine, top - np.array([0.0, 0.0, 30.0]), 70.0)  # it goes on past the last slice
    tumour = _blob(shape, affine, centre, 12.0)
    image = np.where(head, 300 + 300 * tumour, 0).astype(np.float32)
    prep = prepare_volume({"FLAIR": image}, affine, PRE | {"crop_size": [128, 128]}, ["FLAIR"], head)
    # A perfect network: the tumour ball on the window's planes, background where its input is 0.
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in prep.window_shape], indexing="ij"), -1).reshape(-1, 3)
    ball = (np.linalg.norm(world_points(prep.window_affine, idx) - centre, axis=1) <= 12.0)
    planes = np.moveaxis(ball.reshape(prep.window_shape), 2, 0)[prep.slice_indices]
    planes &= prep.slices[:, 0] != 0
    logits = np.where(planes, 10.0, -10.0)[:, None].astype(np.float32)
    card = {"output": {"activation": "sigmoid", "threshold": 0.5}}
    for method in ("linear", "nearest"):
        restored = restore_outputs(prep, logits, card, method).astype(bool)
        on_last = tumour[:, :, -1].sum()
        assert on_last > 100
        assert (restored[:, :, -1] & tumour[:, :, -1]).sum() >= 0.9 * on_last, method


def test_ras_aligned_needs_ras_axes_and_the_card_spacing() -> None:
    assert ras_aligned(np.diag([1.0, 1.0, 1.0, 1.0]), (1, 1, 1))
    assert ras_aligned(np.diag([1.005, 0.995, 1.008, 1.0]), (1, 1, 1))
    assert not ras_aligned(np.diag([1.0, 1.0, 5.0, 1.0]), (1, 1, 1))
    assert not ras_aligned(np.diag([-1.0, 1.0, 1.0, 1.0]), (1, 1, 1))
    assert not ras_aligned(_affine(rotation("x", 20.0), (1, 1, 1), (0, 0, 0)), (1, 1, 1))


@pytest.mark.parametrize(
    ("matrix", "spacing"),
    [
        (rotation("x", 20.0), (0.9, 0.9, 1.0)),  # 20° oblique axial
        (rotation("z", 90.0) @ rotation("y", 90.0), (1.2, 0.8, 0.8)),  # sagittal-like, thick
        (np.eye(3), (0.45, 0.45, 5.0)),  # 5 mm axial, fine pixels
    ],
)
def test_oblique_and_thick_grids_are_resampled_in_world_space(
    matrix: np.ndarray, spacing: tuple[float, float, float]
) -> None:
    shape = (round(110 / spacing[0]), round(110 / spacing[1]), round(110 / spacing[2]))
    affine = _affine(matrix, spacing, (0.0, 0.0, 0.0))
    centre = world_points(affine, np.array([[(n - 1) / 2 for n in shape]]))[0]
    head = _blob(shape, affine, centre, 40.0)
    tumour = _blob(shape, affine, centre + np.array([12.0, -6.0, 8.0]), 10.0)
    rng = np.random.default_rng(0)
    image = np.where(head, rng.normal(300, 20, shape) + 200 * tumour, 0).astype(np.float32)
    prep = prepare_volume({"FLAIR": image}, affine, PRE, ["FLAIR"])
    assert prep.resampled and prep.slices.shape[1:] == (1, 64, 56)
    # The model grid is RAS at 1 mm whatever the input grid.
    np.testing.assert_allclose(prep.window_affine[:3, :3], np.eye(3), atol=1e-12)
    # The tumour is where it was in world space, on the network slices as on the input grid.
    planes = prep.crop_label(tumour.astype(np.uint8))
    window = np.zeros(prep.window_shape, np.uint8)
    window[:, :, prep.slice_indices] = np.moveaxis(planes, 0, 2)
    np.testing.assert_allclose(
        _world_centroid(window > 0, prep.window_affine), _world_centroid(tumour, affine), atol=0.5
    )
    # Brighter tumour voxels are the z-scored outliers on the network slices, at the same place.
    bright = np.moveaxis(prep.slices[:, 0] > 2.5, 0, 2)
    window[:] = 0
    window[:, :, prep.slice_indices] = bright
    np.testing.assert_allclose(
        _world_centroid(window > 0, prep.window_affine), _world_centroid(tumour, affine), atol=1.0
    )
    # And back: labels (nearest) and probabilities (linear) both land on the tumour.
    restored = prep.restore(planes)
    dice = 2 * (restored.astype(bool) & tumour).sum() / (restored.astype(bool).sum() + tumour.sum())
    assert dice > 0.9
    card = {"output": {"activation": "sigmoid", "threshold": 0.5}}
    logits = (planes[:, None].astype(np.float32) - 0.5) * 20
    linear = restore_outputs(prep, logits, card, "linear")
    assert 2 * (linear.astype(bool) & tumour).sum() / (linear.astype(bool).sum() + tumour.sum()) > 0.9


def test_a_mask_resampled_linearly_without_a_float_copy_gives_what_its_float_copy_gives() -> None:
    rng = np.random.default_rng(4)
    mask = rng.random((40, 36, 12)) > 0.6
    affine = _affine(rotation("x", 17.0) @ rotation("z", -8.0), (0.6, 0.6, 2.5), (-20.0, -15.0, -25.0))
    target = _affine(np.eye(3), (1.0, 1.0, 1.0), (-25.0, -22.0, -30.0))
    as_bool = resample_to_grid(mask, affine, target, (30, 30, 30))
    assert as_bool.dtype == np.float32 and 0 < as_bool.max() <= 1
    as_float = resample_to_grid(mask.astype(np.float32), affine, target, (30, 30, 30))
    np.testing.assert_array_equal(as_bool, as_float)


@pytest.mark.parametrize("classes", [1, 4])
def test_labels_restored_a_slab_at_a_time_equal_those_of_the_whole_grid(classes: int) -> None:
    # An oblique 0.6 x 0.6 x 2.5 mm grid: every slab is resampled, none is a whole-voxel shift.
    rng = np.random.default_rng(3)
    shape = (70, 64, 20)
    affine = _affine(rotation("x", 17.0) @ rotation("z", -8.0), (0.6, 0.6, 2.5), (-20.0, -15.0, -25.0))
    prep = prepare_volume({"FLAIR": rng.normal(100, 20, shape).astype(np.float32)}, affine, PRE, ["FLAIR"])
    assert prep.resampled
    scores = rng.random((len(prep.slice_indices), classes, 64, 56)).astype(np.float32)
    background = [0.0] if classes == 1 else [1.0] + [0.0] * (classes - 1)

    def to_labels(probs: np.ndarray) -> np.ndarray:
        labels = probs[0] > 0.5 if classes == 1 else np.argmax(probs, axis=0)
        return labels.astype(np.uint8)

    whole = to_labels(prep.restore_scores(scores, background))
    assert whole.any() and not whole.all()
    for slab_voxels in (1, 64 * 20 * 7, 10**9):  # one plane, seven planes (70 = 10 x 7), everything at once
        np.testing.assert_array_equal(prep.restore_labels(scores, background, to_labels, slab_voxels), whole)


def test_brain_mask_centres_the_crop_and_normalises_inside_it() -> None:
    shape = (120, 120, 40)
    rng = np.random.default_rng(1)
    image = rng.normal(50, 10, shape).astype(np.float32)  # noisy background, nothing is exactly zero
    mask = np.zeros(shape, bool)
    mask[70:110, 60:100, 10:30] = True
    image[mask] = rng.normal(500, 50, int(mask.sum()))
    prep = prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR"], brain_mask=mask)
    assert prep.shift == (90 - 32, 80 - 28, 10)  # box centre (90, 80), the mask's slices only
    assert len(prep.slice_indices) == 20
    inside = prep.crop_label(mask.astype(np.uint8)).astype(bool)
    values = prep.slices[:, 0]
    assert np.all(values[~inside] == 0)
    assert abs(float(values[inside].mean())) < 0.02 and abs(float(values[inside].std()) - 1) < 0.02
    # Without the mask the noisy background counts as foreground: the crop sits at the image centre.
    plain = prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR"])
    assert plain.shift == (60 - 32, 60 - 28, 0)
    with pytest.raises(PreprocessError, match="brain mask is empty"):
        prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR"], brain_mask=np.zeros(shape, bool))
    with pytest.raises(PreprocessError, match=r"brain mask shape \(3, 3, 3\) differs"):
        prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR"], brain_mask=np.ones((3, 3, 3), bool))


def _former_preprocessing(image: np.ndarray, crop: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The preprocessing before world-space resampling, at 1 mm RAS (converters/preprocess.py at
    bd5e9df): z-score over the non-zero voxels of the whole volume, crop about the centre of the
    non-zero bounding box, keep the axial slices holding a non-zero value."""
    nonzero = image != 0
    out = np.zeros(image.shape, np.float32)
    values = image[nonzero].astype(np.float64)
    out[nonzero] = ((values - values.mean()) / max(values.std(), 1e-8)).astype(np.float32)
    proj = nonzero.any(axis=2)
    rows, cols = np.flatnonzero(proj.any(axis=1)), np.flatnonzero(proj.any(axis=0))
    o0 = (rows[0] + rows[-1] + 1) // 2 - crop[0] // 2
    o1 = (cols[0] + cols[-1] + 1) // 2 - crop[1] // 2
    padded = np.zeros((crop[0], crop[1], image.shape[2]), np.float32)
    s0, s1 = (
        slice(max(o0, 0), min(o0 + crop[0], image.shape[0])),
        slice(max(o1, 0), min(o1 + crop[1], image.shape[1])),
    )
    padded[s0.start - o0 : s0.stop - o0, s1.start - o1 : s1.stop - o1] = out[s0, s1]
    slices = np.moveaxis(padded, 2, 0)
    keep = np.flatnonzero(np.abs(slices).reshape(len(slices), -1).max(axis=1) > 0)
    return slices[keep], keep


def test_brats_1mm_ras_gives_the_former_slices_exactly() -> None:
    refs = list_cases(require_shared("train", "brats"), require_labels=True)
    if not refs:
        missing("no labelled BraTS training case under shared data train/brats")
    case = load_case(refs[0].path)
    pre = {**PRE, "crop_size": [176, 176]}
    prep = prepare_volume(case.images, case.affine, pre, ["FLAIR"])
    assert not prep.resampled
    slices, keep = _former_preprocessing(case.images["FLAIR"], (176, 176))
    np.testing.assert_array_equal(prep.slices[:, 0], slices)  # bit for bit, not only within tolerance
    assert prep.shift is not None
    np.testing.assert_array_equal(prep.slice_indices + prep.shift[2], keep)
    label = case.whole_tumor()
    np.testing.assert_array_equal(prep.restore(prep.crop_label(label)), label)


@pytest.mark.parametrize("oblique", [False, True])
def test_a_brain_longer_than_the_crop_is_segmented_to_its_edges(oblique: bool) -> None:
    """A brain mask 80 mm long against a 64 x 56 crop (an adult brain of 186 mm against the shipped
    176): the window spans it, the network sees it whole, zero-padded to a multiple of its stride
    (64 x 8 for this crop), and a lesion at each pole comes back whole; before df3e114 the window was
    cut to the crop."""
    from converters.prediction import segment_volume

    shape = (90, 100, 30)
    matrix = rotation("z", 20.0) if oblique else np.eye(3)
    affine = _affine(matrix, (1.0, 1.0, 1.0), (-45.0, -50.0, -15.0))
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    x, y, z = (world_points(affine, idx) - world_points(affine, np.array([[45, 50, 15]]))[0]).T
    brain = ((x / 30) ** 2 + (y / 40) ** 2 + (z / 12) ** 2 <= 1).reshape(shape)
    lesions = (((np.abs(y) >= 33) & (np.abs(x) < 5) & (np.abs(z) < 5)).reshape(shape)) & brain
    image = np.where(brain, 100.0, 0.0)
    image[lesions] = 1000.0
    card = {"modalities": ["FLAIR"], "preprocessing": PRE, "output": {"activation": "sigmoid"}}
    brain_values = image[brain]
    threshold = (550.0 - brain_values.mean()) / brain_values.std()

    sizes = set()

    def network(batch: np.ndarray) -> np.ndarray:
        sizes.add(batch.shape[2:])
        return (batch[:, :1] - threshold) * 20.0

    labels = segment_volume(network, card, {"FLAIR": image}, affine, batch_size=4, brain_mask=brain)
    assert len(sizes) == 1 and all(h % 64 == 0 and w % 8 == 0 and w > 56 for h, w in sizes), sizes
    found = (labels > 0) & lesions
    assert lesions.sum() > 100
    assert found.sum() >= 0.95 * lesions.sum(), (found.sum(), lesions.sum())
    if not oblique:  # resampled back, the edge of a lesion on the mask's edge may spill by a voxel
        assert not ((labels > 0) & ~brain).any()


def test_tiles_cover_a_slice_and_average_where_they_overlap() -> None:
    from converters.prediction import predict_tiled, tile_starts

    assert tile_starts(64, 64) == [0]
    assert tile_starts(65, 64) == [0, 1]
    assert tile_starts(200, 64) == [0, 45, 91, 136]
    slices = np.random.default_rng(0).normal(size=(5, 2, 100, 70)).astype(np.float32)
    calls = []

    def network(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return batch[:, :1] * 2.0 + 1.0

    out = predict_tiled(network, slices, tile=(64, 56))
    np.testing.assert_allclose(out, slices[:, :1] * 2.0 + 1.0, rtol=1e-6, atol=1e-6)
    assert {c[2:] for c in calls} == {(64, 56)} and len(calls) == 4


def test_the_input_stride_is_the_crops_power_of_two_part() -> None:
    from converters.prediction import input_stride, padded_size

    assert input_stride((176, 176)) == (16, 16)
    assert input_stride((64, 56)) == (64, 8)
    assert input_stride((175, 96)) == (1, 32)
    assert padded_size((177, 176), (176, 176)) == (192, 176)
    assert padded_size((193, 208), (176, 176)) == (208, 208)
    assert padded_size((100, 70), (64, 56)) == (128, 72)
    assert padded_size((175, 96), (175, 96)) == (175, 96)


def test_larger_slices_are_padded_to_the_stride_and_predicted_whole() -> None:
    """Slices longer than the crop go to the network in one call per batch, zero-padded (centred, the odd
    pixel at the end) to a multiple of the stride, and come back at their own size from the right
    place: the network here adds a ramp that depends on where a pixel lies in what it was given."""
    from converters.prediction import predict_slices

    slices = np.random.default_rng(0).normal(size=(5, 2, 100, 70)).astype(np.float32)
    calls = []

    def network(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        h, w = batch.shape[2:]
        ramp = np.arange(h)[:, None] + np.arange(w)[None, :] * 0.01
        return (batch[:, :1] + ramp).astype(np.float32)

    out = predict_slices(network, slices, batch_size=3, tile=(64, 56))
    assert calls == [(3, 2, 128, 72), (2, 2, 128, 72)]
    top, left = (128 - 100) // 2, (72 - 70) // 2
    ramp = np.arange(top, top + 100)[:, None] + np.arange(left, left + 70)[None, :] * 0.01
    np.testing.assert_allclose(out, slices[:, :1] + ramp, rtol=0, atol=1e-4)
    # What the network saw around the slices is zero, what the window holds outside the brain.
    seen = []
    predict_slices(lambda b: seen.append(b.copy()) or b[:, :1], slices[:1], tile=(64, 56))
    assert not seen[0][:, :, :top].any() and not seen[0][:, :, top + 100 :].any()
    assert not seen[0][..., :left].any() and not seen[0][..., left + 70 :].any()


def test_without_a_brain_mask_the_window_keeps_the_crop() -> None:
    """No brain mask: the region is every non-zero voxel, in a clinical head the whole field of view
    (noise included), so the window is not widened to it (4 tiles a slice of scalp and neck)."""
    noise = np.random.default_rng(1).uniform(1.0, 2.0, size=(100, 90, 12))
    affine = _affine(np.eye(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    prepared = prepare_volume({"FLAIR": noise}, affine, PRE, ["FLAIR"], fit_region=True)
    assert prepared.crop_size == (64, 56)
    mask = np.zeros(noise.shape, bool)
    mask[5:95, 5:85, 2:10] = True
    widened = prepare_volume({"FLAIR": noise}, affine, PRE, ["FLAIR"], mask, fit_region=True)
    assert widened.crop_size == (90, 80)


def test_a_mask_wider_than_a_skull_stripped_image_leaves_its_background_at_zero() -> None:
    """A study skull-stripped before it came (zero outside its brain) with the brain extractor's mask, which
    reaches a few millimetres beyond: each channel is z-scored over its non-zero voxels and the zeros inside
    the mask stay zero, as the model saw BraTS images in training (``zscore_nonzero``), instead of a band
    of dark 'tissue' around the brain. The slices equal those that the tight mask gives."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    shape = (70, 72, 24)
    idx = np.indices(shape, dtype=np.float64)
    brain = ((idx[0] - 35) / 25) ** 2 + ((idx[1] - 36) / 24) ** 2 + ((idx[2] - 12) / 8) ** 2 <= 1
    image = np.where(brain, rng.normal(300.0, 40.0, shape), 0.0).astype(np.float32)
    wide = ndimage.binary_dilation(brain, iterations=3)
    affine = _affine(np.eye(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    tight = prepare_volume({"FLAIR": image}, affine, PRE, ["FLAIR"], brain)
    loose = prepare_volume({"FLAIR": image}, affine, PRE, ["FLAIR"], wide)
    assert tight.shift is not None and loose.shift is not None  # cropped, not resampled
    assert tight.shift[:2] == loose.shift[:2]  # the same in-plane window
    tight_z, loose_z = tight.slice_indices + tight.shift[2], loose.slice_indices + loose.shift[2]
    common = np.isin(loose_z, tight_z)
    np.testing.assert_array_equal(loose.slices[common], tight.slices)
    assert not loose.slices[~common].any() and common.sum() < len(common)  # the mask's extra slices: zero
    assert abs(float(tight.slices[tight.slices != 0].mean())) < 0.05


def test_context_slices_stack_each_modalitys_neighbours_as_channels() -> None:
    from converters.preprocess import PreprocessSpec, with_context

    planes = np.arange(4 * 2, dtype=np.float32).reshape(4, 2, 1, 1) + 1  # S=4 slices, C=2 channels
    out = with_context(planes, 1)
    assert out.shape == (4, 6, 1, 1)
    # Per channel: slice before, the slice, slice after; zeros beyond the ends.
    assert out[0, :, 0, 0].tolist() == [0, 1, 3, 0, 2, 4]
    assert out[3, :, 0, 0].tolist() == [5, 7, 0, 6, 8, 0]
    assert with_context(planes, 2, np.array([1]))[0, :, 0, 0].tolist() == [0, 1, 3, 5, 7, 0, 2, 4, 6, 8]
    assert np.array_equal(with_context(planes, 0, np.array([2, 3])), planes[[2, 3]])

    assert PreprocessSpec.from_card({**PRE, "context_slices": 2}).channels(4) == 20
    assert PreprocessSpec.from_card(PRE).context_slices == 0
    for bad in (-1, 4, 1.5, True, "1"):
        with pytest.raises(PreprocessError, match=r"context_slices .* must be an integer from 0 to 3"):
            PreprocessSpec.from_card({**PRE, "context_slices": bad})
    with pytest.raises(PreprocessError, match="context_slices 1 needs views 1, not 3"):
        PreprocessSpec.from_card({**PRE, "spacing_mm": [1, 1, 1], "context_slices": 1, "views": 3})


def test_context_slices_of_a_long_window_match_their_definition_slice_by_slice() -> None:
    """More slices than with_context copies at a time, rows out of order and at both ends."""
    from converters.preprocess import with_context

    planes = np.random.default_rng(3).standard_normal((41, 3, 5, 4)).astype(np.float32)
    rows = np.array([40, 0, 1, 17, 16, 15, 33, 39, 2, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 38])
    for context in (1, 2):
        out = with_context(planes, context, rows)
        assert out.shape == (len(rows), 3 * (2 * context + 1), 5, 4)
        for i, row in enumerate(rows):
            for channel in range(3):
                for position, offset in enumerate(range(-context, context + 1)):
                    got = out[i, channel * (2 * context + 1) + position]
                    inside = 0 <= row + offset < len(planes)
                    expected = planes[row + offset, channel] if inside else np.zeros((5, 4), np.float32)
                    np.testing.assert_array_equal(got, expected)


def test_a_card_with_context_slices_gets_the_same_slices_and_their_neighbours() -> None:
    shape = (120, 120, 40)
    rng = np.random.default_rng(2)
    image = np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool)
    mask[30:90, 30:90, 8:32] = True
    image[mask] = rng.normal(500, 50, int(mask.sum()))
    plain = prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR"], brain_mask=mask)
    context = prepare_volume({"FLAIR": image}, np.eye(4), {**PRE, "context_slices": 1}, ["FLAIR"],
                             brain_mask=mask)
    assert np.array_equal(context.slice_indices, plain.slice_indices)
    assert context.slices.shape == (len(plain.slices), 3, *plain.slices.shape[2:])
    assert np.array_equal(context.slices[:, 1], plain.slices[:, 0])  # the slice itself in the middle
    assert np.array_equal(context.slices[1:, 0], plain.slices[:-1, 0])  # the one before it
    assert np.array_equal(context.slices[:-1, 2], plain.slices[1:, 0])  # the one after it
    assert not context.slices[0, 0].any() and not context.slices[-1, 2].any()  # beyond the brain
