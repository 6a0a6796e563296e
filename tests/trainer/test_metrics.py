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
