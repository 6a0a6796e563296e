"""trainer.metrics: hand-computed cases and an independent implementation (MONAI) on real labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tests.helpers.peers import require_shared
from trainer import metrics as m


def test_counts_by_hand() -> None:
    truth = np.zeros((4, 4, 4), bool)
    truth[0, 0, :4] = True  # 4 voxels
    pred = np.zeros_like(truth)
    pred[0, 0, 2:4] = True
    pred[3, 3, 3] = True  # 2 TP, 1 FP, 2 FN, 59 TN
    assert m.dice(pred, truth) == pytest.approx(4 / 7)
    assert m.jaccard(pred, truth) == pytest.approx(2 / 5)
    assert m.sensitivity(pred, truth) == pytest.approx(2 / 4)
    assert m.specificity(pred, truth) == pytest.approx(59 / 60)


def test_empty_conventions() -> None:
    empty = np.zeros((5, 6, 7), bool)
    full = np.ones_like(empty)
    assert m.dice(empty, empty) == 1.0 and m.jaccard(empty, empty) == 1.0
    assert m.hd95(empty, empty) == 0.0
    one = empty.copy()
    one[2, 2, 2] = True
    assert m.hd95(one, empty, (1.0, 2.0, 3.0)) == pytest.approx(np.linalg.norm([5.0, 12.0, 21.0]))
    assert m.specificity(full, full) == 1.0
    assert m.sensitivity(empty, empty) == 1.0


def test_hd95_of_a_shifted_cube_is_the_shift() -> None:
    a = np.zeros((40, 40, 40), bool)
    a[10:20, 10:20, 10:20] = True
    b = np.roll(a, 4, axis=0)
    assert m.hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(4.0)
    assert m.hd95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(10.0)


def test_regions_follow_brats_definitions() -> None:
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:8, 2:8, 2:8] = 1
    truth[4:6, 4:6, 4:6] = 3
    pred = truth.copy()
    pred[pred == 3] = 2  # core right, enhancing missed
    out = m.case_metrics(pred, truth, (1.0, 1.0, 1.0), task="brats_regions")
    assert out["regions"]["WT"]["dice"] == 1.0 and out["dice"] == 1.0
    assert out["regions"]["TC"]["dice"] == 1.0
    assert out["regions"]["ET"]["dice"] == 0.0
    mean = m.mean_metrics([out, out])
    assert mean["regions"]["ET"]["dice"] == 0.0 and mean["dice"] == 1.0
    with pytest.raises(ValueError, match="task 'liver'"):
        m.case_metrics(pred, truth, (1.0, 1.0, 1.0), task="liver")
    with pytest.raises(ValueError, match=r"prediction shape \(10, 10, 9\) differs"):
        m.dice(pred[:, :, :9], truth)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI 1.6 warns about its own internal argument
@pytest.mark.parametrize("case", ["BraTS2021_00005", "BraTS19_CBICA_ASK_1"])
def test_matches_monai_on_real_cases(case: str) -> None:
    """Independent implementation: MONAI's compute_dice / compute_hausdorff_distance (torch based)."""
    nib = pytest.importorskip("nibabel")
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    folder = require_shared("train", "brats", case)
    truth = np.asarray(nib.load(folder / f"{case}_seg.nii.gz").dataobj) > 0
    rng = np.random.default_rng(0)
    pred = ndimage.binary_dilation(np.roll(truth, 3, axis=0), iterations=2)
    pred[rng.random(truth.shape) < 1e-4] = True  # scattered false positives far from the tumour
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    t = torch.from_numpy(truth[None, None].astype(np.float32))
    assert m.dice(pred, truth) == pytest.approx(float(monai_metrics.compute_dice(p, t)), abs=1e-6)
    assert m.jaccard(pred, truth) == pytest.approx(float(monai_metrics.compute_iou(p, t)), abs=1e-6)
    for spacing in [(1.0, 1.0, 1.0), (0.9, 1.2, 2.0)]:
        ref = float(monai_metrics.compute_hausdorff_distance(p, t, percentile=95, spacing=list(spacing)))
        assert m.hd95(pred, truth, spacing) == pytest.approx(ref, rel=1e-5)
    confusion = monai_metrics.get_confusion_matrix(p, t)[0, 0]
    tp, fp, tn, fn = (float(v) for v in confusion)
    assert m.sensitivity(pred, truth) == pytest.approx(tp / (tp + fn))
    assert m.specificity(pred, truth) == pytest.approx(tn / (tn + fp))


def test_volume_error_of_known_boxes() -> None:
    truth = np.zeros((20, 20, 10), bool)
    truth[0:10, 0:10, 0:10] = True  # 1000 voxels of 1 x 1 x 2 mm = 2 mL
    pred = np.zeros_like(truth)
    pred[0:10, 0:10, 0:5] = True  # 1 mL, all inside the truth
    out = m.volume_metrics(pred, truth, (1.0, 1.0, 2.0))
    assert out["true_volume_ml"] == pytest.approx(2.0) and out["pred_volume_ml"] == pytest.approx(1.0)
    assert out["volume_error_ml"] == pytest.approx(-1.0) and out["abs_volume_error_ml"] == pytest.approx(1.0)
    assert out["volume_error_rel"] == pytest.approx(-0.5)
    assert out["abs_volume_error_rel"] == pytest.approx(0.5)
    over = m.volume_metrics(truth, pred, (1.0, 1.0, 2.0))  # the other way round: +1 mL, +100 %
    assert over["volume_error_ml"] == pytest.approx(1.0) and over["volume_error_rel"] == pytest.approx(1.0)
    empty = m.volume_metrics(pred, np.zeros_like(truth), (1.0, 1.0, 2.0))
    assert empty["volume_error_ml"] == pytest.approx(1.0)
    assert empty["volume_error_rel"] is None and empty["abs_volume_error_rel"] is None
    with pytest.raises(ValueError, match="spacing"):
        m.volume_metrics(pred, truth, (1.0, 1.0))


def test_region_volumes_and_their_means() -> None:
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[0:10, 0:10, 0:10] = 1  # edema
    truth[2:6, 2:6, 2:6] = 2  # core: 64 voxels
    truth[2:4, 2:4, 2:4] = 3  # enhancing: 8 of them
    pred = truth.copy()
    pred[pred == 3] = 2  # enhancing called core: ET 8 -> 0 voxels, TC and WT volumes right
    pred[11, 11, 11] = 1  # one stray edema voxel: WT + 1
    one = m.case_metrics(pred, truth, (1.0, 1.0, 1.0), task="brats_regions")
    regions = one["regions"]
    assert regions["WT"]["volume_error_ml"] == pytest.approx(0.001)
    assert regions["WT"]["true_volume_ml"] == pytest.approx(1.0)
    assert regions["TC"]["volume_error_ml"] == pytest.approx(0.0)
    assert regions["ET"]["volume_error_ml"] == pytest.approx(-0.008)
    assert regions["ET"]["volume_error_rel"] == pytest.approx(-1.0)
    assert one["volume_error_ml"] == regions["WT"]["volume_error_ml"]  # top level is WT
    # a second case without enhancing tumour in the truth: its relative ET error is undefined
    no_et = np.where(truth == 3, 2, truth).astype(np.uint8)
    two = m.case_metrics(no_et, no_et, (1.0, 1.0, 1.0), task="brats_regions")
    assert two["regions"]["ET"]["volume_error_rel"] is None and two["regions"]["ET"]["dice"] == 1.0
    mean = m.mean_metrics([one, two])["regions"]["ET"]
    assert mean["volume_error_ml"] == pytest.approx(-0.004)  # (-0.008 + 0) / 2
    assert mean["volume_error_rel"] == pytest.approx(-1.0)  # the undefined one left out
    assert mean["dice"] == pytest.approx(0.5)
    assert m.mean_metrics([two, two])["regions"]["ET"]["abs_volume_error_rel"] is None


class _Restorer:
    """The part of a prepared case that case_region_dice uses: labels back onto the case's grid."""

    def restore(self, labels: np.ndarray) -> np.ndarray:
        return labels


@pytest.mark.parametrize("task", ["whole_tumor", "brats_regions"])
def test_case_region_dice_is_case_metrics_dice(task: str) -> None:
    rng = np.random.default_rng(3)
    shape = (12, 20, 20)
    truth = ndimage.binary_dilation(rng.random(shape) > 0.97, iterations=2) * rng.integers(1, 4, shape)
    pred = np.where(rng.random(shape) > 0.2, truth, rng.integers(0, 4, shape)).astype(np.uint8)
    attrs = {"prepared": _Restorer(), "target": truth.astype(np.uint8), "spacing": (1.0, 1.0, 2.0)}
    case = type("Case", (), attrs)
    full = m.case_metrics(pred, case.target, case.spacing, task)
    regions = ("WT", "TC", "ET")
    want = [full["dice"]] if task == "whole_tumor" else [full["regions"][r]["dice"] for r in regions]
    got = m.case_region_dice(pred, case, task)  # type: ignore[arg-type]
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.3 < min(got) < 1.0
    with pytest.raises(ValueError, match="not 'whole_tumor'"):
        m.case_region_dice(pred, case, "lungs")  # type: ignore[arg-type]
