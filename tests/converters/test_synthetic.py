"""Synthetic phantom cases: deterministic by seed, plausible contrasts, readable as a Task01 folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from converters.nifti import list_cases
from converters.synthetic import make_synthetic_case, write_synthetic_task01


def test_same_seed_same_case_other_seed_other_case() -> None:
    a, b, c = make_synthetic_case(7), make_synthetic_case(7), make_synthetic_case(8)
    for modality in a.images:
        np.testing.assert_array_equal(a.images[modality], b.images[modality])
        assert not np.array_equal(a.images[modality], c.images[modality])
    assert a.label is not None and b.label is not None and c.label is not None
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)


def test_case_structure_and_relative_intensities() -> None:
    case = make_synthetic_case(3, (64, 64, 40))
    assert case.shape == (64, 64, 40)
    assert set(case.images) == {"FLAIR", "T1", "T1GD", "T2"}
    assert case.label is not None and case.label.dtype == np.uint8
    counts = np.bincount(case.label.ravel(), minlength=4)
    assert counts.size == 4 and np.all(counts[1:] > 50), counts
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    brain = case.images["T1"] > 0
    for image in case.images.values():
        assert image.dtype == np.float32
        assert np.array_equal(image > 0, brain)  # skull-stripped: background exactly 0 everywhere
        np.testing.assert_array_equal(image, np.rint(image))  # integer-valued like BraTS

    def median(modality: str, label: int) -> float:
        return float(np.median(case.images[modality][case.label == label]))

    # Edema is bright on FLAIR and T2; the rim enhances on T1GD and not on T1.
    assert median("FLAIR", 1) > 1.5 * float(np.median(case.images["FLAIR"][brain & (case.label == 0)]))
    assert median("T1GD", 3) > 1.5 * median("T1", 3)
    assert median("T1GD", 3) > median("T1GD", 2)
    assert median("T2", 1) > median("T1", 1)


def test_write_synthetic_task01_layout(tmp_path: Path) -> None:
    out = write_synthetic_task01(tmp_path / "Task01", n_cases=3, seed=11, shape=(20, 18, 12))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 3
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["training"][0] == {
        "image": "./imagesTr/BRATS_001.nii.gz",
        "label": "./labelsTr/BRATS_001.nii.gz",
    }
    image = nib.load(str(out / "imagesTr" / "BRATS_002.nii.gz"))
    assert image.shape == (20, 18, 12, 4)
    assert nib.load(str(out / "labelsTr" / "BRATS_002.nii.gz")).get_data_dtype() == np.uint8
    refs = list_cases(out, require_labels=True)
    assert len(refs) == 3
    # Re-writing with the same seed gives identical files' contents.
    again = write_synthetic_task01(tmp_path / "again", n_cases=3, seed=11, shape=(20, 18, 12))
    first = refs[2].load()
    second = list_cases(again)[2].load()
    np.testing.assert_array_equal(first.images["T2"], second.images["T2"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"shape \(4, 64, 40\): need three sizes of at least 8"):
        make_synthetic_case(0, (4, 64, 40))
    with pytest.raises(ValueError, match="n_cases=0"):
        write_synthetic_task01(Path("/nonexistent"), 0, 0)
