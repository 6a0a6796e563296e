"""NIfTI readers: real BraTS cases in each naming, Decathlon folders, label mapping, bad input."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from converters.exceptions import HoldoutDataError, InvalidCaseError
from converters.nifti import (
    list_cases,
    load_case,
    load_decathlon_case,
    scanner_intensities,
    write_dataset_json,
)
from converters.synthetic import make_synthetic_case, write_synthetic_task01
from tests.helpers.peers import require_shared


def _raw_canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).get_fdata())


def _save(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _tiny_brats(folder: Path, case_id: str = "BraTS2021_99999", seg: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for tag in ("flair", "t1", "t1ce", "t2"):
        _save(rng.integers(0, 500, (6, 5, 4)).astype(np.int16), folder / f"{case_id}_{tag}.nii.gz")
    if seg is not None:
        _save(seg, folder / f"{case_id}_seg.nii.gz")
    return folder


def test_real_brats2021_case_maps_labels_and_keeps_values() -> None:
    folder = require_shared("train", "brats", "BraTS2021_00019")  # its seg is uint16
    case = load_case(folder)
    assert case.case_id == "BraTS2021_00019"
    assert list(case.images) == ["FLAIR", "T1", "T1GD", "T2"]
    assert case.shape == (240, 240, 155)
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    assert case.spacing == pytest.approx((1.0, 1.0, 1.0))
    flair = case.images["FLAIR"]
    assert flair.dtype == np.float32
    np.testing.assert_array_equal(flair, _raw_canonical(folder / "BraTS2021_00019_flair.nii.gz"))
    raw = _raw_canonical(folder / "BraTS2021_00019_seg.nii.gz")
    assert case.label is not None and case.label.dtype == np.uint8
    assert set(np.unique(raw)) == {0, 1, 2, 4}
    # BraTS 2021: 1 core -> 2, 2 edema -> 1, 4 enhancing -> 3.
    for src, dst in ((0, 0), (1, 2), (2, 1), (4, 3)):
        np.testing.assert_array_equal(case.label == dst, raw == src)
    assert case.extra["layout"] == "brats2021"


def test_real_brats2013_case_masks_background_and_maps_labels() -> None:
    folder = require_shared("train", "brats2013_flair_t1c", "brats_2013_pat0001_1")
    case = load_case(folder)
    assert list(case.images) == ["FLAIR", "T1GD"]
    assert case.extra["normalized"] == "zscore"
    mask = _raw_canonical(folder / "brainmask.nii.gz") > 0.5
    raw_flair = _raw_canonical(folder / "Flair_subtrMeanDivStd.nii.gz")
    assert np.all(raw_flair[~mask] != 0)  # the files hold the z-score of 0, not 0, outside the brain
    for image in case.images.values():
        assert np.all(image[~mask] == 0.0)
    np.testing.assert_array_equal(case.images["FLAIR"][mask], raw_flair[mask].astype(np.float32))
    raw = _raw_canonical(folder / "OTMultiClass.nii.gz")
    assert case.label is not None
    # BraTS 2013: 1 necrosis -> 2, 2 edema -> 1, 3 non-enhancing -> 2, 4 enhancing -> 3.
    np.testing.assert_array_equal(case.label == 1, raw == 2)
    np.testing.assert_array_equal(case.label == 2, (raw == 1) | (raw == 3))
    np.testing.assert_array_equal(case.label == 3, raw == 4)


def test_scanner_intensities_turn_a_z_scored_case_into_whole_numbers_with_the_same_z_scores() -> None:
    """A BraTS 2013 case (z-scored inside the brain) as a skull-stripped scanner image: whole numbers
    from 1 up inside the brain, 0 outside, and z-scoring the brain again gives back the stored values."""
    case = load_case(require_shared("train", "brats2013_flair_t1c", "brats_2013_pat0001_1"))
    shifted = scanner_intensities(case)
    assert "normalized" not in shifted.extra and shifted.label is case.label
    for modality, image in case.images.items():
        brain = image != 0
        out = shifted.images[modality]
        assert np.all(out[~brain] == 0) and out[brain].min() == 1.0 and out[brain].max() > 500
        assert np.all(np.mod(out, 1) == 0)
        again = (out[brain] - out[brain].mean()) / out[brain].std()
        stored = (image[brain] - image[brain].mean()) / image[brain].std()
        assert np.abs(again - stored).max() < 0.01  # rounding to whole numbers: 1/100 of an SD at most


def test_scanner_intensities_leave_a_case_with_scanner_values_alone() -> None:
    case = load_case(require_shared("train", "brats", "BraTS2021_00005"))
    assert scanner_intensities(case) is case


def test_real_brats2023_naming_case() -> None:
    # The only 2023-named case is in holdout; it is READ here to test the loader, nothing else.
    folder = require_shared("holdout", "BraTS-GLI-00000-000")
    case = load_case(folder)
    assert list(case.images) == ["FLAIR", "T1", "T1GD", "T2"]
    assert case.extra["layout"] == "brats2023"
    np.testing.assert_array_equal(
        case.images["FLAIR"], _raw_canonical(folder / "BraTS-GLI-00000-000-t2f.nii.gz")
    )
    raw = _raw_canonical(folder / "BraTS-GLI-00000-000-seg.nii.gz")
    assert case.label is not None
    for src, dst in ((0, 0), (1, 2), (2, 1), (3, 3)):
        np.testing.assert_array_equal(case.label == dst, raw == src)


def test_list_cases_on_the_shared_train_folder_finds_both_layouts() -> None:
    train = require_shared("train")
    refs = list_cases(train, require_labels=True)
    layouts = {ref.case_id: ref.layout for ref in refs}
    # ../shared/data grows: count the labelled case folders on disk, never a constant.
    label_names = ("_seg.nii.gz", "-seg.nii.gz", "OTMultiClass.nii.gz")
    labelled = [
        case
        for group in train.iterdir()
        if group.is_dir()
        for case in group.iterdir()
        if case.is_dir() and any(f.name.endswith(label_names) for f in case.iterdir())
    ]
    assert len(refs) == len(labelled) > 0
    assert {r.case_id for r in refs} == {c.name for c in labelled}
    assert layouts["BraTS2021_00002"] == "brats2021"
    assert layouts["brats_2013_pat0003_1"] == "brats2013"
    assert all(ref.has_label and ref.kind == "folder" for ref in refs)
    # Same cases when pointed at one sub-folder.
    assert [r.case_id for r in list_cases(train / "brats")] == sorted(
        p.name for p in (train / "brats").iterdir() if p.is_dir()
    )


def test_orientation_is_made_canonical(tmp_path: Path) -> None:
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps[:3, 3] = [10.0, 20.0, 30.0]
    folder = tmp_path / "case1"
    folder.mkdir()
    for tag in ("flair", "t1", "t1ce", "t2"):
        _save(data, folder / f"case1_{tag}.nii.gz", lps)
    seg = np.zeros((6, 5, 4), dtype=np.uint8)
    seg[0, 0, 0] = 4
    _save(seg, folder / "case1_seg.nii.gz", lps)
    case = load_case(folder)
    np.testing.assert_array_equal(case.images["T1"], data[::-1, ::-1, :])
    assert case.label is not None and case.label[5, 4, 0] == 3
    # Voxel (5, 4, 0) of the canonical grid is voxel (0, 0, 0) of the source: same world point.
    np.testing.assert_allclose(case.affine @ [5, 4, 0, 1], lps @ [0, 0, 0, 1])


def test_case_without_seg_loads_unlabelled_and_is_refused_when_labels_required(tmp_path: Path) -> None:
    folder = _tiny_brats(tmp_path / "data" / "BraTS2021_99999")
    assert load_case(folder).label is None
    assert not list_cases(tmp_path / "data")[0].has_label
    with pytest.raises(InvalidCaseError, match=r"BraTS2021_99999.*has no label file and labels are required"):
        list_cases(tmp_path / "data", require_labels=True)


def test_unknown_label_value_is_refused(tmp_path: Path) -> None:
    seg = np.zeros((6, 5, 4), dtype=np.int16)
    seg[1, 1, 1] = 3  # 3 is not a BraTS 2021 label
    folder = _tiny_brats(tmp_path / "c", seg=seg)
    with pytest.raises(
        InvalidCaseError, match=r"_seg\.nii\.gz: label values \[3\] are not in .*\[0, 1, 2, 4\]"
    ):
        load_case(folder)


def test_shape_mismatch_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _tiny_brats(tmp_path / "data" / "c", seg=np.zeros((6, 5, 3), dtype=np.uint8))
    with pytest.raises(InvalidCaseError, match=r"BraTS2021_99999_seg\.nii\.gz: shape \(6, 5, 3\) disagrees"):
        list_cases(tmp_path / "data")
    with pytest.raises(InvalidCaseError, match=r"BraTS2021_99999_seg\.nii\.gz: shape \(6, 5, 3\) disagrees"):
        load_case(folder)


def test_corrupt_nifti_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _tiny_brats(tmp_path / "c")
    target = folder / "BraTS2021_99999_t2.nii.gz"
    target.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(InvalidCaseError, match=r"BraTS2021_99999_t2\.nii\.gz: not a readable NIfTI"):
        load_case(folder)
    # A valid header with truncated voxel data.
    good = gzip.decompress((folder / "BraTS2021_99999_t1.nii.gz").read_bytes())
    target.write_bytes(gzip.compress(good[:-40]))
    with pytest.raises(InvalidCaseError, match=r"BraTS2021_99999_t2\.nii\.gz: cannot read voxel data"):
        load_case(folder)


def test_folder_in_no_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(InvalidCaseError, match=r"junk: no BraTS images found"):
        load_case(tmp_path / "junk")
    with pytest.raises(
        InvalidCaseError, match=r": neither a Decathlon Task01 folder .* nor a folder of BraTS"
    ):
        list_cases(tmp_path)
    with pytest.raises(InvalidCaseError, match=r"nowhere: data folder not found"):
        list_cases(tmp_path / "nowhere")


def test_duplicate_case_ids_are_refused(tmp_path: Path) -> None:
    _tiny_brats(tmp_path / "a" / "BraTS2021_99999")
    _tiny_brats(tmp_path / "b" / "BraTS2021_99999")
    with pytest.raises(InvalidCaseError, match=r"case id 'BraTS2021_99999' also used by"):
        list_cases(tmp_path)


def test_holdout_cases_are_refused_unless_allowed(tmp_path: Path) -> None:
    """A case under a folder named holdout, as given or once symlinks are resolved, is final-evaluation
    data: refused unless the caller allows it (segnode evaluate)."""
    seg = np.zeros((6, 5, 4), np.uint8)
    seg[2:4, 2:4, 1:3] = 1
    real = tmp_path / "real"
    for n in (1, 2):
        _tiny_brats(real / f"BraTS2021_0000{n}", f"BraTS2021_0000{n}", seg)
    held = _tiny_brats(tmp_path / "shared" / "holdout" / "BraTS2021_00003", "BraTS2021_00003", seg)

    # the path given: a holdout/ folder beside train/, its case a symlink to a case elsewhere
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "holdout").mkdir()
    (data / "train" / "BraTS2021_00001").symlink_to(real / "BraTS2021_00001")
    (data / "holdout" / "BraTS2021_00002").symlink_to(real / "BraTS2021_00002")
    refused = re.escape(f"'BraTS2021_00002' is holdout data (under {data / 'holdout'})")
    with pytest.raises(HoldoutDataError, match=refused):
        list_cases(data, require_labels=True)
    with pytest.raises(HoldoutDataError, match="BraTS2021_00002"):
        list_cases(data / "holdout" / "BraTS2021_00002")
    assert [r.case_id for r in list_cases(data, allow_holdout=True)] == ["BraTS2021_00002", "BraTS2021_00001"]
    # ".." is folded before looking: this is the train folder
    assert len(list_cases(data / "holdout" / ".." / "train")) == 1

    # the path resolved: a case folder, or each of a case's files, a symlink into a holdout folder
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "BraTS2021_00003").symlink_to(held)
    with pytest.raises(HoldoutDataError, match=re.escape(f"under {held.parent}")):
        list_cases(linked)
    files = tmp_path / "files" / "BraTS2021_00003"
    files.mkdir(parents=True)
    for f in held.iterdir():
        (files / f.name).symlink_to(f)
    with pytest.raises(HoldoutDataError, match=re.escape(f"under {held.parent}")):
        list_cases(files.parent)
    assert [r.case_id for r in list_cases(files.parent, allow_holdout=True)] == ["BraTS2021_00003"]


def test_decathlon_folder_round_trip(tmp_path: Path) -> None:
    task = write_synthetic_task01(tmp_path / "Task01_BrainTumour", n_cases=2, seed=5, shape=(16, 16, 10))
    refs = list_cases(task, require_labels=True)
    assert [r.case_id for r in refs] == ["BRATS_001", "BRATS_002"]
    case = refs[1].load()
    expected = make_synthetic_case(5 * 100003 + 1, (16, 16, 10))
    for modality in ("FLAIR", "T1", "T1GD", "T2"):
        np.testing.assert_array_equal(case.images[modality], expected.images[modality])
    assert case.label is not None and expected.label is not None
    np.testing.assert_array_equal(case.label, expected.label)
    np.testing.assert_allclose(case.affine, expected.affine)
    # Also found when the Task01 folder sits inside a data folder.
    assert len(list_cases(tmp_path)) == 2


def test_decathlon_channel_order_follows_dataset_json(tmp_path: Path) -> None:
    task = write_synthetic_task01(tmp_path / "t", n_cases=1, seed=1, shape=(12, 12, 8))
    meta = json.loads((task / "dataset.json").read_text())
    meta["modality"] = {"0": "T2w", "1": "T1w", "2": "t1gd", "3": "FLAIR"}
    (task / "dataset.json").write_text(json.dumps(meta))
    case = list_cases(task)[0].load()
    original = make_synthetic_case(100003, (12, 12, 8))
    np.testing.assert_array_equal(case.images["T2"], original.images["FLAIR"])
    meta["modality"]["0"] = "DWI"
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InvalidCaseError, match=r"dataset.json modality 0 = 'dwi' is not FLAIR"):
        list_cases(task)


def test_decathlon_bad_inputs(tmp_path: Path) -> None:
    task = tmp_path / "task"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    _save(np.zeros((4, 4, 3), dtype=np.float32), task / "imagesTr" / "BRATS_001.nii.gz")
    _save(np.zeros((4, 4, 3), dtype=np.uint8), task / "labelsTr" / "BRATS_001.nii.gz")
    write_dataset_json(task, ["BRATS_001"])
    with pytest.raises(
        InvalidCaseError, match=r"BRATS_001\.nii\.gz: expected a 4D image .* shape \(4, 4, 3\)"
    ):
        list_cases(task)
    _save(np.zeros((4, 4, 3, 4), dtype=np.float32), task / "imagesTr" / "BRATS_001.nii.gz")
    _save(np.zeros((4, 4, 2), dtype=np.uint8), task / "labelsTr" / "BRATS_001.nii.gz")
    with pytest.raises(InvalidCaseError, match=r"labelsTr/BRATS_001\.nii\.gz: shape \(4, 4, 2\) disagrees"):
        list_cases(task)
    with pytest.raises(InvalidCaseError, match=r"labelsTr/BRATS_001\.nii\.gz: shape \(4, 4, 2\) disagrees"):
        load_decathlon_case(task / "imagesTr" / "BRATS_001.nii.gz", task / "labelsTr" / "BRATS_001.nii.gz")
    (task / "dataset.json").write_text("{not json")
    with pytest.raises(InvalidCaseError, match=r"dataset.json: not readable JSON"):
        list_cases(task)
