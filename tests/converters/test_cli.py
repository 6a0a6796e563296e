"""``segnode convert``: the real entry point in a subprocess (exit codes, one-line errors)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from converters.dicom_series import load_series_folder
from converters.nifti import list_cases
from converters.reorient import volume_to_ras
from tests.helpers.cli import segnode_process


def test_synthetic_then_nifti_to_dicom_then_back(tmp_path: Path) -> None:
    task = tmp_path / "Task01"
    done = segnode_process(
        "convert", "synthetic", str(task), "--cases", "2", "--seed", "4", "--shape", "24,20,12"
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 2 synthetic cases of 24x20x12 (seed 4)" in done.stdout
    case = list_cases(task, require_labels=True)[1].load()

    study = tmp_path / "study"
    image = task / "imagesTr" / "BRATS_002.nii.gz"
    done = segnode_process("convert", "nifti-to-dicom", str(image), str(study), "--modalities", "flair,t2")
    assert done.returncode == 0, done.stderr
    assert "StudyInstanceUID 1." in done.stdout
    assert "2 series, 24 files in" in done.stdout
    assert sorted(p.name for p in study.iterdir()) == ["01_FLAIR", "04_T2"]
    array, affine = volume_to_ras(load_series_folder(study / "04_T2"))
    np.testing.assert_array_equal(array, case.images["T2"])
    np.testing.assert_allclose(affine, case.affine, atol=1e-4)

    out = tmp_path / "t2.nii.gz"
    done = segnode_process("convert", "dicom-to-nifti", str(study / "04_T2"), str(out))
    assert done.returncode == 0, done.stderr
    img = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(img.dataobj), case.images["T2"])
    np.testing.assert_allclose(img.affine, case.affine, atol=1e-4)


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    done = segnode_process("convert", "nifti-to-dicom", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {tmp_path / 'missing'}: not a case folder nor a .nii/.nii.gz Task01 image"
    )
    assert "Traceback" not in done.stderr

    empty = tmp_path / "empty_case"
    empty.mkdir()
    done = segnode_process("convert", "nifti-to-dicom", str(empty), str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {empty}: no BraTS images found")

    done = segnode_process("convert", "synthetic", str(tmp_path / "s"), "--shape", "4,4")
    assert done.returncode == 2
    assert "error: --shape '4,4': expected three integers of at least 8" in done.stderr

    done = segnode_process("convert", "dicom-to-nifti", str(empty), str(tmp_path / "x.nii.gz"))
    assert done.returncode == 2
    assert f"error: {empty}: no files" in done.stderr
