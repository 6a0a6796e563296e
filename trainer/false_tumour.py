"""False tumour: what a model outlines away from the labelled tumour, and brains made tumour-free.

There is no healthy FLAIR in the training data. The nearest thing: a BraTS case with the hemisphere
that holds less of its tumour mirrored onto the other about the brain's centre (the mean x of its
non-zero voxels; the cases are on an atlas grid, RAS), every image and the label mirrored alike
(:func:`tumour_free`). **False tumour** is what a prediction holds beyond the label grown by
:data:`LABEL_MARGIN_VOXELS` voxels (2 mm on the 1 mm case grid): distant false pieces, not a tight or
loose edge (:func:`beyond_label`).

The export's INT8 check uses both (:func:`false_tumour_ml`, :func:`false_tumour_check`): an INT8
network can keep its Dice on a large tumour and still outline much more false tumour than its FP32
network elsewhere in the brain. segnode-wt-flair 2.5.0 did (docs/holdout_eval/loo-2.5.0-2026-12-07.md),
and a Dice drop cannot see it. benchmarks/tumour_free.py sends the same mirrored brains through a node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from converters.case import Case
from converters.prediction import SlicePredictor, segment_to_grid
from converters.preprocess import prepare_volume

#: Voxels (1 mm on the case grid) by which the label is grown before tumour beyond it is false.
LABEL_MARGIN_VOXELS = 2
#: The export's default limit: INT8 false tumour at most this many times the FP32 network's...
DEFAULT_MAX_RATIO = 1.25
#: ... plus this many mL in all (so that a model with almost none is not failed for a few voxels).
DEFAULT_SLACK_ML = 2.0


def mirror_x(array: npt.NDArray[Any], centre: int, keep_high: bool) -> npt.NDArray[Any]:
    """``array`` (X, Y, Z) with the side of x index ``centre`` that ``keep_high`` names kept and mirrored
    onto the other (zero where the mirror falls outside the grid)."""
    out = np.zeros_like(array)
    n = array.shape[0]
    for i in range(n):
        source = i if (i >= centre) == keep_high else 2 * centre - i
        if 0 <= source < n:
            out[i] = array[source]
    return out


def tumour_free(case: Case) -> tuple[Case, int, float]:
    """``case`` with its less-affected hemisphere mirrored onto the other (every image and the label);
    the mirror plane's x index and the share of the labelled tumour on the kept hemisphere.

    The plane is the mean x of the brain's voxels: non-zero in the FLAIR, or in any image of a case
    without one. What the tumour had on the kept side comes back twice; a case whose tumour crosses the
    midline keeps much of it.
    """
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label: its tumour's side is unknown")
    brain = np.zeros(case.label.shape, bool)
    for modality, image in case.images.items():
        if modality == "FLAIR" or "FLAIR" not in case.images:
            brain |= np.asarray(image) != 0
    centre = round(float(np.nonzero(brain)[0].mean()))
    tumour_x = np.nonzero(case.label > 0)[0]
    high_share = float((tumour_x > centre).mean()) if tumour_x.size else 0.0
    keep_high = high_share < 0.5
    mirrored = dataclasses.replace(
        case,
        case_id=f"{case.case_id}-mirrored",
        images={m: mirror_x(image, centre, keep_high) for m, image in case.images.items()},
        label=mirror_x(case.label, centre, keep_high),
    )
    return mirrored, centre, high_share if keep_high else 1.0 - high_share


def beyond_label(predicted: npt.NDArray[np.bool_], label: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``predicted`` beyond ``label`` grown by :data:`LABEL_MARGIN_VOXELS`: the false tumour."""
    grown = ndimage.binary_dilation(label, np.ones((3, 3, 3), bool), iterations=LABEL_MARGIN_VOXELS)
    return np.asarray(predicted & ~grown)


def false_tumour_ml(
    predictors: Mapping[str, SlicePredictor],
    card: Mapping[str, Any],
    cases: Iterable[Case],
    on_case: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Per predictor, the false tumour (mL, any tissue) on each case as it is and made tumour-free.

    Parameters
    ----------
    predictors:
        Name -> slice predictor of the same network (e.g. ``"fp32"``, ``"int8"``).
    card:
        Their model card.
    cases:
        Labelled cases on a 1 mm grid (loaded one at a time: ``CaseRef.load`` in a generator).
    on_case:
        Called with each case's identifier before it is segmented (a progress line).

    Returns
    -------
    dict
        Name -> mL, two entries a case: as it is, then mirrored (:func:`tumour_free`).
    """
    out: dict[str, list[float]] = {name: [] for name in predictors}
    for case in cases:
        if on_case is not None:
            on_case(case.case_id)
        if case.label is None:
            raise ValueError(f"case {case.case_id} has no label; false tumour is counted against one")
        mirrored, _, _ = tumour_free(case)
        for variant in (case, mirrored):
            assert variant.label is not None
            label = variant.label > 0
            voxel_ml = abs(float(np.linalg.det(variant.affine[:3, :3]))) / 1000.0
            # prepared once for every network (segment_volume's path)
            prepared = prepare_volume(
                variant.images, variant.affine, card["preprocessing"], card["modalities"], fit_region=True
            )
            for name, predict in predictors.items():
                predicted = segment_to_grid(predict, prepared, card) > 0
                out[name].append(float(beyond_label(predicted, label).sum()) * voxel_ml)
    return out


def false_tumour_check(
    fp32_ml: Sequence[float],
    int8_ml: Sequence[float],
    max_ratio: float = DEFAULT_MAX_RATIO,
    slack_ml: float = DEFAULT_SLACK_ML,
) -> dict[str, Any]:
    """The card's ``calibration.false_tumour_check``: INT8 passes when its false tumour, summed over the
    volumes, is at most ``max_ratio`` times the FP32 network's plus ``slack_ml``.

    The volumes are :func:`false_tumour_ml`'s, two a case (as it is, then mirrored): ``parts`` gives
    each network's sum over either kind apart.
    """
    fp32, int8 = float(np.sum(fp32_ml)), float(np.sum(int8_ml))
    limit = max_ratio * fp32 + slack_ml
    return {
        "volumes": len(fp32_ml),
        "fp32_ml": round(fp32, 3),
        "int8_ml": round(int8, 3),
        "ratio": round(int8 / fp32, 3) if fp32 > 0 else None,
        "max_ratio": float(max_ratio),
        "slack_ml": float(slack_ml),
        "limit_ml": round(limit, 3),
        "passed": bool(int8 <= limit + 1e-9),
        "parts": {kind: _sums(fp32_ml, int8_ml, start) for kind, start in (("as_is", 0), ("mirrored", 1))},
    }


def _sums(fp32_ml: Sequence[float], int8_ml: Sequence[float], start: int) -> dict[str, float]:
    """FP32's and INT8's mL summed over every other volume from ``start``."""
    return {
        "fp32_ml": round(float(np.sum(fp32_ml[start::2])), 3),
        "int8_ml": round(float(np.sum(int8_ml[start::2])), 3),
    }
