"""converters.reslice + dicom_writer: a case re-acquired sagittal, coronal, oblique or thick is written
with the right Image Plane attributes and read back on the same geometry, its tumour in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from converters.dicom_series import load_series
from converters.dicom_writer import write_volumes
from converters.reorient import LPS_TO_RAS
from converters.resample import rotation, world_points
from converters.reslice import SeriesPlan, reslice_case
from converters.synthetic import make_synthetic_case

PLANS = {
    "sagittal": SeriesPlan("sagittal", pixel_spacing_mm=0.9, slice_thickness_mm=1.5, fov_mm=200),
    "coronal": SeriesPlan("coronal", pixel_spacing_mm=1.2, slice_thickness_mm=3.0, fov_mm=200),
    "oblique": SeriesPlan(
        "oblique", pixel_spacing_mm=0.8, slice_thickness_mm=4.0, tilt_degrees=20, fov_mm=200
    ),
    "axial5": SeriesPlan("axial", slice_thickness_mm=5.0, fov_mm=200, bias_field=0.3, seed=3),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_resliced_series_round_trips_through_dicom(name: str, tmp_path: Path, strict_pydicom: None) -> None:
    case = make_synthetic_case(5, (64, 64, 40))
    plan = PLANS[name]
    resliced = reslice_case(case, plan, ["FLAIR"])
    volume = resliced.reference
    info = write_volumes(resliced.volumes, tmp_path, descriptions={"FLAIR": f"{plan.description} FLAIR"})
    files = info.files["FLAIR"]
    first, second = (pydicom.dcmread(p) for p in files[:2])
    row, col = np.asarray(first.ImageOrientationPatient[:3]), np.asarray(first.ImageOrientationPatient[3:])
    if name == "oblique":  # axial tilted 20° about the left-right axis
        np.testing.assert_allclose(row, [1, 0, 0], atol=1e-9)
        np.testing.assert_allclose(col, rotation("x", 20.0) @ [0, 1, 0], atol=1e-9)
    np.testing.assert_allclose(
        np.asarray(second.ImagePositionPatient) - np.asarray(first.ImagePositionPatient),
        np.cross(row, col) * plan.slice_thickness_mm,
        atol=1e-6,
    )
    assert [float(v) for v in first.PixelSpacing] == [plan.pixel_spacing_mm] * 2
    assert float(first.SliceThickness) == plan.slice_thickness_mm
    assert first.SeriesDescription == f"{plan.description} FLAIR"
    back = load_series(files)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-5)
    np.testing.assert_array_equal(back.array, volume.array)
    # The tumour sits where it was in the case, in patient coordinates (within a voxel).
    assert resliced.label is not None
    moved = world_points(volume.affine, np.argwhere(resliced.label > 0)[:, ::-1]).mean(axis=0)
    original = world_points(LPS_TO_RAS @ case.affine, np.argwhere(case.label > 0)).mean(axis=0)
    np.testing.assert_allclose(moved, original, atol=1.0)
    ratio = (
        (resliced.label > 0).sum()
        * np.prod(volume.spacing)
        / ((case.label > 0).sum() * np.prod(case.spacing))
    )
    assert ratio == pytest.approx(1.0, abs=0.1)


def test_bias_field_is_seeded_and_within_its_span() -> None:
    case = make_synthetic_case(5, (64, 64, 40))
    plain = reslice_case(case, SeriesPlan("axial", fov_mm=200), ["FLAIR"]).reference.array
    biased = reslice_case(case, SeriesPlan("axial", fov_mm=200, bias_field=0.3, seed=2), ["FLAIR"])
    again = reslice_case(case, SeriesPlan("axial", fov_mm=200, bias_field=0.3, seed=2), ["FLAIR"])
    np.testing.assert_array_equal(biased.reference.array, again.reference.array)
    head = plain > 50
    ratio = biased.reference.array[head] / plain[head]
    assert ratio.min() < 0.85 and ratio.max() > 1.2
    assert ratio.min() > np.exp(-0.3) - 0.05 and ratio.max() < np.exp(0.3) + 0.05


def test_ds_strings_of_oblique_positions_fit_16_characters() -> None:
    from converters.dicom_writer import _ds

    assert _ds(-9.999999999999996) == "-10.0"
    assert len(_ds(0.9396926207859084)) <= 16


def test_a_z_scored_case_keeps_its_values_when_resliced() -> None:
    """The BraTS 2013 cases are z-scored (about half the brain below 0): rounding and clipping at 0,
    meant for a scanner's whole numbers, left ten values and most of the brain at 0. A whole-number
    case is still rounded as before."""
    case = make_synthetic_case(5, (64, 64, 40))
    flair = case.images["FLAIR"]
    inside = flair > 0
    zscored = np.where(inside, (flair - flair[inside].mean()) / flair[inside].std(), 0).astype(np.float32)
    plan = SeriesPlan("axial", fov_mm=200)
    scored = reslice_case(case.__class__(**{**case.__dict__, "images": {"FLAIR": zscored}}), plan)
    plain = reslice_case(case, plan, ["FLAIR"])
    from scipy import ndimage

    brain = ndimage.binary_erosion(plain.reference.array > 0, iterations=2)  # off the partial edge
    values = scored.reference.array[brain]
    assert (values < 0).mean() > 0.2 and np.unique(values).size > 100
    expected = (plain.reference.array[brain] - flair[inside].mean()) / flair[inside].std()
    assert np.corrcoef(values, expected)[0, 1] > 0.95
    np.testing.assert_array_equal(plain.reference.array, np.rint(plain.reference.array))  # still whole


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal"])
def test_a_re_acquisition_on_the_cases_spacing_puts_its_voxel_centres_on_the_cases(orientation: str) -> None:
    """A field of view centred on the head put the new voxel centres half a voxel off the case's along
    some axes: each label voxel was then a tie between two of the case's, always broken the same way,
    and the truth moved half a voxel from its image. On the case's grid the label is the case's own,
    at the same place."""
    from converters.reslice import plan_geometry

    case = make_synthetic_case(5, (96, 96, 75))  # 2 mm voxels
    plan = SeriesPlan(orientation, pixel_spacing_mm=2.0, slice_thickness_mm=2.0, fov_mm=200)
    geometry = plan_geometry(case, plan)
    source = LPS_TO_RAS @ case.affine
    index = np.linalg.solve(source[:3, :3], geometry.origin - source[:3, 3])
    np.testing.assert_allclose(index, np.round(index), atol=1e-9)
    resliced = reslice_case(case, plan, ["FLAIR"])
    assert resliced.label is not None and case.label is not None
    assert (resliced.label > 0).sum() == (case.label > 0).sum()
    volume = resliced.reference
    moved = world_points(volume.affine, np.argwhere(resliced.label > 0)[:, ::-1]).mean(axis=0)
    original = world_points(source, np.argwhere(case.label > 0)).mean(axis=0)
    np.testing.assert_allclose(moved, original, atol=0.01)
