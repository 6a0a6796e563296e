"""Per-case 3D segmentation metrics (numpy and SciPy only, no torch).

Conventions (the same as MONAI's ``compute_dice`` / ``compute_hausdorff_distance``, against which
``tests/trainer/test_metrics.py`` checks them on real cases):

* Dice and Jaccard of two empty masks are 1.0 (nothing to find, nothing found).
* Sensitivity with no positive truth voxel is 1.0; specificity with no negative voxel is 1.0.
* HD95 is the larger of the two directed 95th-percentile surface distances (mm), surfaces being the
  mask voxels with a face-connected background neighbour (SciPy's default erosion, as MONAI).
  Two empty masks give 0.0; when exactly one is empty the distance is undefined and the grid's
  diagonal (mm) is returned, a finite worst case in the spirit of the BraTS evaluation's 373.13 mm.

Volumes (mL) come from voxel counts times the voxel volume. The volume error is signed, predicted
minus true (a positive error is over-segmentation); the relative error divides it by the true
volume and is None when the truth is empty (undefined), and such cases are left out of its mean.

BraTS regions (from Decathlon labels 1 edema, 2 non-enhancing, 3 enhancing): whole tumour (WT)
= labels 1, 2, 3; tumour core (TC) = 2, 3; enhancing tumour (ET) = 3.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from converters.masks import surface

if TYPE_CHECKING:
    from trainer.data import PreparedCase

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "sensitivity", "specificity", "hd95")

#: Volume figures of a case (mL, and relative to the true volume), see :func:`volume_metrics`.
VOLUME_NAMES: tuple[str, ...] = (
    "pred_volume_ml",
    "true_volume_ml",
    "volume_error_ml",
    "abs_volume_error_ml",
    "volume_error_rel",
    "abs_volume_error_rel",
)

#: BraTS evaluation regions over Decathlon labels.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}

Mask = npt.NDArray[Any]


def _pair(pred: Mask, truth: Mask) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    p, t = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    return p, t


def _counts(pred: Mask, truth: Mask) -> tuple[int, int, int, int]:
    p, t = _pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    return tp, fp, fn, tn


def dice(pred: Mask, truth: Mask) -> float:
    """Dice coefficient 2|P∩T| / (|P| + |T|) of two binary masks; 1.0 when both are empty."""
    tp, fp, fn, _ = _counts(pred, truth)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def jaccard(pred: Mask, truth: Mask) -> float:
    """Jaccard index |P∩T| / |P∪T|; 1.0 when both masks are empty."""
    tp, fp, fn, _ = _counts(pred, truth)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def sensitivity(pred: Mask, truth: Mask) -> float:
    """True-positive rate TP / (TP + FN); 1.0 when the truth is empty."""
    tp, _, fn, _ = _counts(pred, truth)
    return 1.0 if tp + fn == 0 else tp / (tp + fn)


def specificity(pred: Mask, truth: Mask) -> float:
    """True-negative rate TN / (TN + FP); 1.0 when the truth covers the whole grid."""
    _, fp, _, tn = _counts(pred, truth)
    return 1.0 if tn + fp == 0 else tn / (tn + fp)


def _directed_distances(
    from_surface: npt.NDArray[np.bool_], to_surface: npt.NDArray[np.bool_], spacing: Sequence[float]
) -> npt.NDArray[np.float64]:
    """Distance (mm) from each voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    dist = ndimage.distance_transform_edt(~to_surface, sampling=tuple(float(s) for s in spacing))
    return np.asarray(dist)[from_surface]


def _union_box(p: npt.NDArray[np.bool_], t: npt.NDArray[np.bool_]) -> tuple[slice, ...]:
    """Bounding box of both masks, one voxel of margin (distances only depend on what is inside)."""
    found = ndimage.find_objects((p | t).astype(np.int8))[0]
    return tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(found, p.shape, strict=True))


def hd95(pred: Mask, truth: Mask, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask surfaces, in mm.

    Parameters
    ----------
    pred, truth:
        Binary masks of the same shape.
    spacing:
        Voxel size per axis in mm.

    Returns
    -------
    float
        max(P95 of pred->truth surface distances, P95 of truth->pred); 0.0 when both masks are
        empty; the grid diagonal in mm when exactly one is.
    """
    p, t = _pair(pred, truth)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {p.ndim}D mask")
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if not (has_p and has_t):
        return float(np.linalg.norm(np.asarray(p.shape, dtype=np.float64) * np.asarray(spacing, dtype=float)))
    box = _union_box(p, t)
    sp, st = surface(p[box]), surface(t[box])
    d_pt = _directed_distances(sp, st, spacing)
    d_tp = _directed_distances(st, sp, spacing)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def binary_metrics(pred: Mask, truth: Mask, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """All of :data:`METRIC_NAMES` for one binary pair."""
    return {
        "dice": dice(pred, truth),
        "jaccard": jaccard(pred, truth),
        "sensitivity": sensitivity(pred, truth),
        "specificity": specificity(pred, truth),
        "hd95": hd95(pred, truth, spacing),
    }


def volume_metrics(
    pred: Mask, truth: Mask, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float | None]:
    """Predicted and true volume (mL) of two binary masks and the error between them.

    Returns
    -------
    dict
        :data:`VOLUME_NAMES`: ``volume_error_ml`` = predicted - true (signed), ``abs_volume_error_ml``
        its magnitude; ``volume_error_rel`` = error / true volume (signed) and ``abs_volume_error_rel``,
        both None when the true volume is 0.
    """
    p, t = _pair(pred, truth)
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {p.ndim}D mask")
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    pred_ml = int(np.count_nonzero(p)) * voxel_ml
    true_ml = int(np.count_nonzero(t)) * voxel_ml
    error = pred_ml - true_ml
    rel = error / true_ml if true_ml > 0 else None
    return {
        "pred_volume_ml": pred_ml,
        "true_volume_ml": true_ml,
        "volume_error_ml": error,
        "abs_volume_error_ml": abs(error),
        "volume_error_rel": rel,
        "abs_volume_error_rel": None if rel is None else abs(rel),
    }


def case_metrics(
    pred: Mask, truth: Mask, spacing: Sequence[float], task: str = "whole_tumor"
) -> dict[str, Any]:
    """Metrics of one case.

    Parameters
    ----------
    pred, truth:
        Label maps (X, Y, Z). For ``whole_tumor`` any value above zero is tumour; for
        ``brats_regions`` they hold Decathlon labels.
    spacing:
        Voxel size (mm).
    task:
        ``"whole_tumor"`` or ``"brats_regions"``.

    Returns
    -------
    dict
        ``whole_tumor``: the five metrics and the :data:`VOLUME_NAMES`. ``brats_regions``: the
        whole-tumour ones at the top level (so every task has a ``dice``) plus
        ``{"regions": {"WT": {...}, "TC": {...}, "ET": {...}}}``, each with the same keys.
    """
    p, t = np.asarray(pred), np.asarray(truth)
    if task == "whole_tumor":
        return _with_volumes(p > 0, t > 0, spacing)
    if task != "brats_regions":
        raise ValueError(f"task {task!r} is not 'whole_tumor' or 'brats_regions'")
    regions = {
        name: _with_volumes(np.isin(p, labels), np.isin(t, labels), spacing)
        for name, labels in BRATS_REGIONS.items()
    }
    return {**regions["WT"], "regions": regions}


def _with_volumes(pred: Mask, truth: Mask, spacing: Sequence[float]) -> dict[str, Any]:
    return {**binary_metrics(pred, truth, spacing), **volume_metrics(pred, truth, spacing)}


def _mean_of(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric the first block has; None values (undefined) are left out, all None -> None."""
    out: dict[str, Any] = {}
    for name in (*METRIC_NAMES, *VOLUME_NAMES):
        if name not in blocks[0]:
            continue
        values = [b[name] for b in blocks if b.get(name) is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


def mean_metrics(per_case: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every metric over cases (and per region when the cases carry ``regions``).

    A relative volume error that is None (empty truth) is left out of its mean.
    """
    if not per_case:
        return {}
    out = _mean_of(per_case)
    if "regions" in per_case[0]:
        out["regions"] = {
            region: _mean_of([c["regions"][region] for c in per_case]) for region in per_case[0]["regions"]
        }
    return out


def case_region_dice(pred_labels: npt.NDArray[np.uint8], case: PreparedCase, task: str) -> list[float]:
    """3D Dice of a case on its original grid per region: [WT], or [WT, TC, ET] for regions.

    ``pred_labels`` are the label planes of the case's prepared slices (N, H, W).
    """
    restored = case.prepared.restore(pred_labels)
    if task == "whole_tumor":
        return [dice(restored > 0, case.target > 0)]
    if task != "brats_regions":
        raise ValueError(f"task {task!r} is not 'whole_tumor' or 'brats_regions'")
    # Dice alone: the trainer scores every validation case each epoch, and case_metrics' HD95 and
    # volumes there took about a tenth of a sub-region run's time.
    target = case.target
    return [dice(np.isin(restored, labels), np.isin(target, labels)) for labels in BRATS_REGIONS.values()]


def case_dice(pred_labels: npt.NDArray[np.uint8], case: PreparedCase, task: str) -> float:
    """Validation score of a case on its original grid: WT Dice, or mean WT/TC/ET Dice for regions.

    ``pred_labels`` are the label planes of the case's prepared slices (N, H, W).
    """
    return float(np.mean(case_region_dice(pred_labels, case, task)))
