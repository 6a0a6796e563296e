"""The numpy pieces of converters/brain_mask.py against their textbook forms (no network needed)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage

from converters.brain_mask import (
    BrainExtractionSettings,
    BrainMasker,
    NoBrainFoundError,
    add_stripped_brain,
    near_mask,
    normalize,
    resize,
)
from converters.masks import bounding_box, fill_holes, surface
from converters.network_buffers import network_buffer

SHAPES = [
    ((240, 240, 31), (256, 256, 256)),
    ((171, 203, 29), (128, 128, 128)),
    ((256, 256, 256), (100, 77, 55)),
    ((100, 77, 55), (64, 200, 17)),
]


@pytest.mark.parametrize(("shape", "out"), SHAPES)
def test_nearest_resize_picks_the_voxels_ndimage_zoom_picks(
    shape: tuple[int, int, int], out: tuple[int, int, int]
) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    expected = ndimage.zoom(
        image,
        [o / i for o, i in zip(out, shape, strict=True)],
        order=0,
        mode="nearest",
        grid_mode=True,
        prefilter=False,
    )
    np.testing.assert_array_equal(resize(image, out, 0), expected)
    target = network_buffer(out)  # as the brain network's input is made
    assert resize(image, out, 0, out=target) is target
    np.testing.assert_array_equal(target, expected)


@pytest.mark.parametrize(("shape", "out"), SHAPES[:2])
def test_trilinear_resize_into_an_array_equals_a_new_one(
    shape: tuple[int, int, int], out: tuple[int, int, int]
) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    target = np.full(out, np.nan, np.float32)
    assert resize(image, out, 1, out=target) is target
    np.testing.assert_array_equal(target, resize(image, out, 1))
    same = np.zeros(shape, np.float32)
    np.testing.assert_array_equal(resize(image, shape, 1, out=same), image)


def test_normalize_equals_the_textbook_form() -> None:
    s = BrainExtractionSettings()
    image = np.random.default_rng(1).gamma(2.0, 100.0, (64, 80, 48)).astype(np.float32)
    low, high = (float(v) for v in np.percentile(image, s.percentiles))
    x = np.clip((image.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    expected = s.scale_std * (x - x.mean()) / x.std() + s.scale_mean
    got = normalize(image, low, high, s)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.shares_memory(got, image)
    in_place = image.copy()
    assert normalize(in_place, low, high, s, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, got)


def _ball(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    return ((grid - centre[:, None, None, None]) ** 2).sum(axis=0) <= radius**2


def test_stripped_image_joins_the_mask_and_a_head_does_not() -> None:
    s = BrainExtractionSettings()
    affine = np.eye(4)
    shape = (64, 64, 64)
    brain = _ball(shape, 20)
    tight = _ball(shape, 17)  # the network's mask: a few mm inside the stripped brain
    stripped = np.where(brain, 100.0, 0.0)
    mask, was_stripped = add_stripped_brain(stripped, tight, affine, s)
    assert was_stripped and np.array_equal(mask, brain)
    # The same brain in a head whose background is noise (never exactly zero): left as it is.
    head = stripped + np.random.default_rng(2).random(shape) + 0.01
    mask, was_stripped = add_stripped_brain(head, tight, affine, s)
    assert not was_stripped and np.array_equal(mask, tight)
    # A skull ring just outside the margin but inside the box's corners: decided by the distance.
    ring = _ball(shape, 26) & ~_ball(shape, 24)
    skull = np.where(brain | ring, 100.0, 0.0)
    mask, was_stripped = add_stripped_brain(skull, tight, affine, s)
    assert not was_stripped and np.array_equal(mask, tight)



def _ball_network(radius_fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    """A stand-in network: a ball of ``radius_fraction`` of its grid, centred, whatever it is shown."""

    def run(x: np.ndarray) -> np.ndarray:
        return _ball(x.shape, radius_fraction * x.shape[0]).astype(np.float32)

    return run


def _synthetic_head(fat: float, shape: tuple[int, int, int] = (72, 72, 72)) -> np.ndarray:
    """A head on 3 mm voxels: a textured brain (median 100, radius 18 voxels) with a bright tumour,
    a dark band of CSF and skull (3 voxels), a ring of scalp fat of intensity ``fat`` (5 voxels), air;
    Rician-like noise. The box of the brain's mask reaches far into the fat at its corners."""
    rng = np.random.default_rng(7)
    grid = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    image = np.where(r <= 18, 100 + 40 * texture / texture.std(), 0.0)
    tumour_centre = centre + np.array([8.0, 0.0, 4.0])
    tumour = np.sqrt(((grid - tumour_centre[:, None, None, None]) ** 2).sum(axis=0)) <= 5
    image[tumour] = 1.9 * fat  # enhancing tumour: the brightest voxels of the image
    image[(r > 18) & (r <= 21)] = 15.0
    image[(r > 21) & (r <= 26)] = fat
    image = ndimage.gaussian_filter(image, 0.7)
    real, imaginary = image + rng.normal(0, 3.0, shape), rng.normal(0, 3.0, shape)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32)


def test_a_brain_stands_out_from_the_dark_band_around_it_whatever_the_fat_farther_out() -> None:
    """A whole-head FLAIR with bright scalp fat: the contrast check measures the brain against a shell
    just outside its mask (CSF and skull, dark), over the brain's own signal above air. Against the
    rest of its box over the image's percentile range it refused this correct brain mask: the fat in
    the box's corners raised the outside median, the fat and tumour widened the range (contrast 0.05
    on a real-head FLAIR phantom). A mask on a smooth stripe pattern that is no head is still refused."""
    s = BrainExtractionSettings(bbox_grid=(32, 32, 32), brain_grid=(64, 64, 64), min_brain_ml=100.0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    # The brain (radius 18 of 72 voxels) outlined by the box network; the brain network's crop is
    # that box grown by 10 % per side, so the brain is 18 / (36 * 1.2) of the crop.
    masker = BrainMasker(s, _ball_network(18.5 / 72), _ball_network(18.5 / 36 / 1.2))
    brain = _ball((72, 72, 72), 18)
    for fat in (180.0, 220.0, 300.0):  # scalp fat 1.8 to 3 times the brain's median
        head = _synthetic_head(fat)
        mask = masker.extract(head, affine)
        dice = 2 * np.count_nonzero(mask & brain) / (mask.sum() + brain.sum())
        assert dice > 0.95, f"fat {fat}: the stand-in mask is the brain (Dice {dice:.3f})"
    # A test pattern (smooth stripes, no head; the GE series in dicom/): the same mask is refused.
    stripes = np.indices((72, 72, 72))[0]
    pattern = (100 + 80 * np.sin(stripes * 2 * np.pi / 9)).astype(np.float32)
    with pytest.raises(NoBrainFoundError, match="does not stand out from its surroundings"):
        masker.extract(pattern, affine)


class _Followed(np.ndarray):
    """An array a weak reference can follow (a plain ndarray takes none)."""


def test_the_box_networks_output_is_gone_before_the_brain_network_runs() -> None:
    """The brain network is the job's memory peak: the box network's grids (its output and the mask
    made of it, 10 MiB on the node's 128³ box grid) are freed before it runs, not held beside it."""
    s = BrainExtractionSettings(bbox_grid=(32, 32, 32), brain_grid=(64, 64, 64), min_brain_ml=100.0)
    box_outputs: list[weakref.ref[_Followed]] = []
    alive_when_the_brain_network_runs: list[list[bool]] = []
    ball, brain = _ball_network(18.5 / 72), _ball_network(18.5 / 36 / 1.2)

    def box_network(x: np.ndarray) -> np.ndarray:
        out = ball(x).view(_Followed)
        box_outputs.append(weakref.ref(out))
        return out

    def brain_network(x: np.ndarray) -> np.ndarray:
        alive_when_the_brain_network_runs.append([ref() is not None for ref in box_outputs])
        return brain(x)

    masker = BrainMasker(s, box_network, brain_network)
    mask = masker.extract(_synthetic_head(180.0), np.diag([3.0, 3.0, 3.0, 1.0]))
    assert mask.any()
    assert alive_when_the_brain_network_runs == [[False]]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.94, 0.94, 5.5), (1.2, 0.5, 2.0)])
def test_near_mask_is_the_distance_transform_within_the_margin(spacing: tuple[float, float, float]) -> None:
    """Against ``distance_transform_edt`` on a lumpy mask (holes, two parts), anisotropic voxels,
    candidates everywhere outside it, and a margin that falls exactly on voxel distances."""
    rng = np.random.default_rng(3)
    lumps = ndimage.gaussian_filter(rng.random((60, 70, 40)), 3.0)
    mask = lumps > np.percentile(lumps, 70)
    candidates = ~mask & (rng.random(mask.shape) < 0.8)
    step = np.asarray(spacing)
    for margin in (5.0, 2 * spacing[2], 1.0):
        expected = (ndimage.distance_transform_edt(~mask, sampling=step) <= margin) & candidates
        got = near_mask(mask, candidates, step, margin)
        assert expected.any() and not expected.all()
        np.testing.assert_array_equal(got, expected)
    assert not near_mask(np.zeros_like(mask), candidates, step, 5.0).any()


def _masks() -> list[np.ndarray]:
    """Empty, full, a block with a closed cavity that touches the array's border, and random blobs."""
    rng = np.random.default_rng(1)
    shell = np.zeros((9, 10, 11), dtype=bool)
    shell[:, 2:8, 2:9] = True
    shell[2:7, 4:6, 4:7] = False  # a closed cavity; the mask itself touches the border on axis 0
    masks = [np.zeros((5, 6, 7), dtype=bool), np.ones((5, 6, 7), dtype=bool), shell]
    for density in (0.2, 0.5, 0.8):
        blob = ndimage.binary_dilation(rng.random((17, 13, 15)) < density / 4)
        masks += [blob, rng.random((17, 13, 15)) < density, blob[:, :, 7]]  # 3D and one 2D slice
    return masks


@pytest.mark.parametrize("mask", _masks())
def test_fill_holes_surface_and_box_equal_scipy(mask: np.ndarray) -> None:
    np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    np.testing.assert_array_equal(surface(mask), mask & ~ndimage.binary_erosion(mask))
    idx = np.argwhere(mask)
    expected = (
        tuple(slice(int(a), int(b) + 1) for a, b in zip(idx.min(axis=0), idx.max(axis=0), strict=True))
        if len(idx)
        else None
    )
    assert bounding_box(mask) == expected


def test_block_mean_and_expand_blocks_keep_world_positions_and_the_far_edges() -> None:
    from converters.resample import block_mean, expand_blocks, reduction_factors, world_points

    rng = np.random.default_rng(5)
    image = rng.random((7, 9, 5)).astype(np.float32)
    affine = np.array([[0.4, 0, 0, -10.0], [0, 0.33, 0, 4.0], [0, 0, 0.5, 2.0], [0, 0, 0, 1]])
    factors = reduction_factors(affine, image.shape)
    assert factors == (2, 3, 2)
    # A non-contiguous view (as the RAS arrays are) is read without a copy of its own.
    small, small_affine = block_mean(np.asfortranarray(image), affine, factors)
    assert small.shape == (3, 3, 2)
    np.testing.assert_allclose(small[1, 2, 0], image[2:4, 6:9, 0:2].mean(), rtol=1e-6)
    # Each block sits at the centre of its voxels in world space.
    centre = world_points(affine, np.array([[2.5, 7.0, 0.5]]))
    np.testing.assert_allclose(world_points(small_affine, np.array([[1, 2, 0]])), centre)
    # Back on the full grid: each block's voxels take its value, the far remainder the last block's.
    blocks = small > 0.5
    mask = expand_blocks(blocks, factors, image.shape)
    assert mask.shape == image.shape
    assert mask[2, 7, 1] == blocks[1, 2, 0] and mask[6, 8, 4] == blocks[2, 2, 1]
    assert mask[6, 0, 0] == blocks[2, 0, 0] and mask[0, 0, 4] == blocks[0, 0, 1]
    # One-voxel-thick axes and coarse ones are left alone.
    assert reduction_factors(affine, (7, 9, 3)) == (2, 3, 1)
    assert reduction_factors(np.diag([0.94, 1.0, 5.0, 1.0]), (200, 200, 30)) == (1, 1, 1)
