"""Exact reorientation between RAS arrays and DICOM volumes, and the 16-bit pixel encoding."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from converters.dicom_writer import PixelEncoding, encode_pixels, write_volume_series
from converters.exceptions import ConverterError
from converters.reorient import (
    array_to_volume,
    case_to_volume,
    ras_to_volume,
    share_ras_pixels,
    volume_to_ras,
)
from converters.synthetic import make_synthetic_case


def _random_grid(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An array and an oblique, axis-permuted, possibly flipped affine."""
    rng = np.random.default_rng(seed)
    rotation = Rotation.random(random_state=seed).as_matrix()
    axes = rotation[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    affine = np.eye(4)
    affine[:3, :3] = axes * rng.uniform(0.4, 3.0, 3)
    affine[:3, 3] = rng.normal(0.0, 60.0, 3)
    array = rng.normal(size=tuple(int(n) for n in rng.integers(2, 9, 3))).astype(np.float32)
    return array, affine


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_ras_volume_round_trip_is_exact(seed: int) -> None:
    array, affine = _random_grid(seed)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    ras, ras_affine = np.asarray(canonical.dataobj), canonical.affine
    volume = array_to_volume(ras, ras_affine)
    # Right-handed DICOM grid: slices ascend along row x column, as a reader sorts them.
    np.testing.assert_allclose(
        np.cross(volume.row_direction, volume.column_direction), volume.slice_direction, atol=1e-9
    )
    back, back_affine = volume_to_ras(volume)
    np.testing.assert_array_equal(back, ras)
    np.testing.assert_allclose(back_affine, ras_affine, atol=1e-9)
    mask = (ras > 0).astype(np.uint8)
    np.testing.assert_array_equal(ras_to_volume(mask, volume), (volume.array > 0).astype(np.uint8))
    np.testing.assert_array_equal(ras_to_volume(back, volume), volume.array)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_a_volume_can_share_its_pixels_with_its_ras_array(seed: int) -> None:
    array, affine = _random_grid(seed)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    volume = array_to_volume(np.asarray(canonical.dataobj), canonical.affine)
    ras, _ = volume_to_ras(volume)
    shared = share_ras_pixels(volume, ras)
    np.testing.assert_array_equal(shared.array, volume.array)  # the same values, in the volume's order
    assert np.shares_memory(shared.array, ras) and not np.shares_memory(shared.array, volume.array)
    assert not ras.flags.writeable and not shared.array.flags.writeable
    assert shared.series_instance_uid == volume.series_instance_uid
    np.testing.assert_array_equal(shared.origin, volume.origin)
    with pytest.raises(ConverterError, match="does not match the canonical grid"):
        share_ras_pixels(volume, np.zeros((ras.shape[0] + 1, *ras.shape[1:]), np.float32))


def test_axis_aligned_case_becomes_standard_axial() -> None:
    case = make_synthetic_case(0, (16, 12, 8))
    volume = case_to_volume(case, "T2")
    np.testing.assert_array_equal(volume.row_direction, [1, 0, 0])
    np.testing.assert_array_equal(volume.column_direction, [0, 1, 0])
    np.testing.assert_array_equal(volume.slice_direction, [0, 0, 1])
    assert volume.array.shape == (8, 12, 16)
    # Column 0 is the patient's rightmost voxel column, i.e. the last RAS x index.
    np.testing.assert_array_equal(volume.array[3, 5, 0], case.images["T2"][15, 11 - 5, 3])
    assert volume.spacing == pytest.approx((case.spacing[2], case.spacing[1], case.spacing[0]))


def test_bad_geometry_is_refused() -> None:
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ConverterError, match=r"sheared: affine axes are not orthogonal"):
        array_to_volume(np.zeros((3, 3, 3), np.float32), sheared, what="sheared")
    with pytest.raises(ConverterError, match=r"flat: expected a 3D array"):
        array_to_volume(np.zeros((3, 3), np.float32), np.eye(4), what="flat")
    volume = array_to_volume(np.zeros((4, 5, 6), np.float32), np.eye(4))
    with pytest.raises(
        ConverterError, match=r"array shape \(5, 4, 6\) does not match the canonical grid \(4, 5, 6\)"
    ):
        ras_to_volume(np.zeros((5, 4, 6), np.uint8), volume)
    with pytest.raises(ConverterError, match=r"case synthetic_0: no DWI image"):
        case_to_volume(make_synthetic_case(0, (8, 8, 8)), "DWI")


def _decode(encoding: PixelEncoding) -> np.ndarray:
    return encoding.stored.astype(np.float64) * encoding.slope + encoding.intercept


def test_pixel_encoding_choices() -> None:
    unsigned = encode_pixels(np.array([0.0, 17.0, 65535.0], np.float32))
    assert unsigned.exact and not unsigned.signed and unsigned.stored.dtype == np.uint16
    signed = encode_pixels(np.array([-1000.0, 0.0, 3000.0], np.float32))
    assert signed.exact and signed.signed and signed.stored.dtype == np.int16
    np.testing.assert_array_equal(_decode(signed), [-1000, 0, 3000])
    values = np.array([-2.5, 0.0, 0.123456, 7.75], np.float32)
    quantised = encode_pixels(values)
    assert not quantised.exact and quantised.intercept == 0.0
    assert quantised.slope == pytest.approx(7.75 / 32767, rel=1e-9)
    assert _decode(quantised)[1] == 0.0
    assert np.max(np.abs(_decode(quantised) - values)) <= quantised.slope / 2 + 1e-7
    too_big = encode_pixels(np.array([0.0, 70000.0], np.float32))  # integer, but beyond uint16
    assert not too_big.exact and abs(_decode(too_big)[1] - 70000.0) <= too_big.slope / 2
    with pytest.raises(ConverterError, match=r"T1 image: image holds NaN"):
        encode_pixels(np.array([np.nan], np.float32), what="T1 image")


def test_write_volume_series_refuses_unknown_protocol(tmp_path: Path) -> None:
    volume = array_to_volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ConverterError, match=r"modality 'DWI' has no MR protocol"):
        write_volume_series(volume, tmp_path, modality="DWI")
