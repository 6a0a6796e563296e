"""Checks before anything leaves the node: is this result plausible enough to send?

Each rule is a small pure function of arrays and numbers that returns a :class:`RuleResult`
(passed, failed or not checked, with the figures it looked at). :func:`check` runs them all and
returns a :class:`QCReport`; a study with a failed rule sends nothing and its job ends ``review``
(node/pipeline.py), until an administrator sends it anyway (``segnode jobs retry ID --send-anyway``).

Rules and where their limits come from (defaults in ``[qc]`` of node.toml, node/config.py):

* ``series_slices``: the series has at least ``min_slices`` slices. Fewer slices cannot cover a
  brain at any clinical slice thickness (8 x 6 mm = 48 mm, under half the height of a brain), and a
  3-slice series is a localizer or a test shot.
* ``head_found``: the image shows an object: a foreground (:func:`head_mask`) of at least
  ``min_head_ml``. Blank series and pure noise have none (noise does not survive the opening).
* ``tumour_share_of_head``: the tumour is at most ``max_tumour_share_percent`` of the imaged head.
  Needs no brain mask and is sound: the brain lies inside the head's foreground, so the tumour's
  share of the brain is at least its share of the head; failing here means failing
  ``tumour_share_of_brain`` whatever the brain mask would have been. On a skull-stripped image the
  foreground *is* the brain and the two rules coincide. It catches the model outlining the whole
  brain of a whole-head image (a tumour of ~40 % of the head).
* ``brain_found``: the brain mask is not empty.
* ``brain_volume``: ``min_brain_ml`` <= brain volume <= ``max_brain_ml``. When the series is a slab
  through the brain (:func:`cut_faces`: the mask reaches its first or last slice, and the series
  covers less than :data:`WHOLE_BRAIN_MM` along its slice normal; e.g. a targeted slab of 12 slices
  through the tumour) a brain under ``min_brain_ml`` is what the series holds, not a failed mask: the
  lower bound is ``not checked`` (the message gives the series' coverage); the upper bound still
  applies. A series that covers a whole brain's height keeps the lower bound even where its mask
  reaches an edge: a clinical axial series commonly ends at the skull base, its mask reaching the
  last slice through the brainstem, and a failed mask there must still be caught.
* ``tumour_share_of_brain``: tumour volume <= ``max_tumour_share_percent`` of the brain volume.
* ``tumour_inside_brain``: tumour voxels outside the brain mask are removed before the SEG
  (:func:`restrict_to_brain`); the rule fails when more than ``max_outside_share_percent`` of what
  the model called tumour lay outside the brain: then the rest of it is not to be trusted either.
* ``tumour_within_coverage``: where the series' field of view cuts the brain, no tumour lies within
  :data:`EDGE_MARGIN_MM` of that face (tumour on the face's plane always counts). A tumour that
  reaches the cut goes on beyond the series: its volume is incomplete and the study is held rather
  than an underestimated volume sent. A slab that holds the whole tumour passes. One exception: an
  axial series (slice normal within 45 degrees of head-foot) covering a whole brain's height
  (:data:`WHOLE_BRAIN_MM`) cut only at its skull-base slice (:func:`skull_base_face`; a clinical axial
  series ending at the foramen magnum) may have up to ``max_tumour_at_cut_ml`` there:
  bright CSF or vessel inflow on the entry slices of a 2D FLAIR called tumour, not a tumour cut by the
  series (the shipped model's real cut tumours had 2.1-17 mL there; figures in node/config.py). A
  slab gets no such allowance: one grazing the pole of a large tumour has a fraction of a mL at its cut
  while most of the tumour lies outside it.

* ``whole_tumour_agreement`` (node/pipeline.py adds it after the model's own rules): when a
  several-series model ran (task ``brats_regions``), its whole tumour (the union of its tissues) is
  compared with the result of the active ``whole_tumor`` model (FLAIR alone) on the same study: taken
  from early analysis when it ran on the very same FLAIR, else run in the job on the FLAIR already read
  and masked. Fails when their Dice is under ``whole_tumour_min_dice`` (judged only when either
  volume exceeds ``whole_tumour_max_diff_ml``: under it a few voxels decide a Dice), or when the
  volumes differ by more than ``whole_tumour_max_diff_percent`` of the larger and more than
  ``whole_tumour_max_diff_ml``. The several-series model sees each series with its own bias field and
  registration; on clinical-style studies of its validation cases it outlined tens of mL of false
  oedema that the FLAIR model did not, and every other rule passed. ``not checked`` when a one-series
  model ran, when no ``whole_tumor`` model is active or it could not run on the study, and with
  ``compare_whole_tumour = false``; the message says which. Dice is computed on the reference series'
  grid when both models' reference is the same FLAIR series, else only the volumes are compared.

**Cautions** (:attr:`QCReport.cautions`) hold nothing back: the result is sent, and the SR (a text
item under Qualitative Evaluations), the job's ``qc.cautions`` and ``segnode jobs show`` carry the
caution for the reader.

* ``large_tumour``: the whole tumour is over ``caution_tumour_share_percent`` of the brain (without a
  brain mask: of the imaged head, a lower bound on its share of the brain, judged only on a series
  covering a whole brain's height). The shipped models were trained on tumours of at most 14 % of the
  brain and under-call larger ones, so the volume is to be read as a lower bound. Not judged on a slab
  through the brain, whose share of the brain within the series says nothing of the whole brain.
* ``small_tumour``: the whole tumour is above 0 and under ``caution_small_tumour_ml``. Brains without
  tumour (training cases made tumour-free by mirroring) came back with up to 4 mL of false tumour, in
  thin pieces along the brain's surface: a result this small is to be checked against the images
  before it is read as a tumour.

The report's figures carry ``coverage_mm`` (slices x slice spacing, along the slice normal),
``brain_cut`` (the mask reaches a face of the grid) and ``brain_slab`` (the series is a slab through the
brain, as ``brain_volume`` judges it: its brain volume is that of the brain within the series' coverage,
and the SR and ``segnode jobs show`` say so); both None without a brain mask.

The brain-mask rules report ``not checked`` when the job has no brain mask; the head rules report
``not checked`` when it has one (node/pipeline.py does not compute the head then): a brain found
implies a head, and the tumour's share of the brain is the stricter of the two shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from node.config import QCSettings

PASSED = "passed"
FAILED = "failed"
NOT_CHECKED = "not checked"
#: The status of a caution (:attr:`QCReport.cautions`): the result is sent, with the caution.
CAUTION = "caution"

#: Tumour within this distance (mm, between plane centres) of a face where the brain is cut reaches
#: the cut (``tumour_within_coverage``): on a 1 mm series the edge plane and the 3 next to it, on a
#: 2D series with slices more than 3 mm apart its edge slice alone (mask edges are a voxel or two
#: uncertain).
EDGE_MARGIN_MM = 3.0
#: A series covering at least this much along its slice normal (mm) spans a whole adult brain's
#: height (vertex to the foramen magnum ~130-140 mm; left to right ~140 mm): a brain under
#: ``min_brain_ml`` there is a failed mask even where the mask reaches an edge (``brain_volume``).
WHOLE_BRAIN_MM = 120.0

#: Names of the faces of a (slice, row, column) grid, for messages.
_FACE_NAMES = {
    (0, 0): "first slice", (0, 1): "last slice", (1, 0): "first row", (1, 1): "last row",
    (2, 0): "first column", (2, 1): "last column",
}  # fmt: skip


@dataclass(frozen=True)
class RuleResult:
    """The outcome of one rule: its name, status, the figures it used and a one-line message."""

    name: str
    status: str
    figures: dict[str, float | int]
    message: str

    @property
    def failed(self) -> bool:
        """True when the rule failed."""
        return self.status == FAILED


@dataclass(frozen=True)
class QCReport:
    """Every rule's outcome and the figures a reader needs (volumes in mL, shares in %)."""

    rules: list[RuleResult]
    figures: dict[str, float | int | None] = field(default_factory=dict)
    #: Cautions raised (status :data:`CAUTION`): sent with the result, never holding it.
    cautions: list[RuleResult] = field(default_factory=list)

    @property
    def failed(self) -> list[RuleResult]:
        """The rules that failed."""
        return [r for r in self.rules if r.failed]

    @property
    def passed(self) -> bool:
        """True when no rule failed (rules not checked do not fail)."""
        return not self.failed

    def by_name(self, name: str) -> RuleResult:
        """The result of rule ``name`` (KeyError when it did not run)."""
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def reason(self) -> str:
        """One line naming each failed rule with its figures (no patient data)."""
        return "; ".join(f"qc {r.name}: {r.message}" for r in self.failed)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the job result."""
        return {
            "passed": self.passed,
            "rules": [
                {"name": r.name, "status": r.status, "figures": r.figures, "message": r.message}
                for r in self.rules
            ],
            "figures": self.figures,
            "cautions": [
                {"name": c.name, "status": c.status, "figures": c.figures, "message": c.message}
                for c in self.cautions
            ],
        }


def _r(value: float) -> float:
    return round(float(value), 3)


# -- masks ------------------------------------------------------------------------------------------------


def otsu_threshold(values: npt.NDArray[np.floating[Any]], bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance) of ``values``; +inf when they are constant.

    The histogram spans the values up to their 99.9th percentile, so that a few very bright voxels
    (vessels, fat, artefacts) do not crowd the head and the air into its first bins.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("inf")
    low, high = float(finite.min()), float(np.percentile(finite, 99.9))
    if high <= low:
        return float("inf")
    counts, edges = np.histogram(np.clip(finite, low, high), bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(counts * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def head_mask(image: npt.NDArray[np.floating[Any]], radius: int = 2) -> npt.NDArray[np.bool_]:
    """The imaged head (or skull-stripped brain): what the scanner saw besides air and noise.

    Voxels above Otsu's threshold, opened in each slice with a disc of ``radius`` pixels (noise,
    which has no extent, does not survive it), closed and hole-filled in each slice (ventricles and
    dark CSF, below the threshold, are inside the head). Slices are the first axis of ``image``
    (a :class:`~converters.volume.Volume` array: slice, row, column), the plane the scanner acquired.
    """
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    # Structures one slice thick: each slice is opened, closed and filled on its own, in one call.
    disc = ((yy**2 + xx**2) <= radius**2)[np.newaxis]
    in_plane = ndimage.generate_binary_structure(2, 1)[np.newaxis]
    above = image > otsu_threshold(np.asarray(image, dtype=np.float64))
    out = ndimage.binary_opening(above, structure=disc)
    out = ndimage.binary_closing(out, structure=disc, border_value=0)
    return np.asarray(ndimage.binary_fill_holes(out, structure=in_plane), dtype=bool)


def restrict_to_brain(
    labels: npt.NDArray[np.integer[Any]], brain: npt.NDArray[np.bool_] | None
) -> tuple[npt.NDArray[np.integer[Any]], int]:
    """Remove every tumour voxel outside the brain mask; returns the new labels and how many went.

    With no mask (``None``) the labels are returned unchanged and the count is 0.
    """
    if brain is None:
        return labels, 0
    if brain.shape != labels.shape:
        raise ValueError(f"brain mask of shape {brain.shape} is not on the label grid {labels.shape}")
    outside = labels > 0
    outside[brain] = False  # in place: a label map of a 0.4 mm series is 120 M voxels
    removed = int(outside.sum())
    if not removed:
        return labels, 0
    out = labels.copy()
    out[outside] = 0
    return out, removed


def cut_faces(brain: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(axis, 0 for the first plane or 1 for the last) of each face of the series' (slice, row,
    column) grid that the brain mask reaches: the field of view cuts the brain there.

    Brain extraction continues the image past a face that cuts through the head and crops its mask
    back (converters/brain_mask.py :func:`~converters.brain_mask.continue_cut_faces`), so a brain cut
    by the series ends on that face rather than short of it; a brain the series covers whole keeps
    off every face (skull, scalp and air lie between).
    """
    faces = []
    for axis in range(brain.ndim):
        for end, index in ((0, 0), (1, brain.shape[axis] - 1)):
            if np.take(brain, index, axis=axis).any():
                faces.append((axis, end))
    return faces


def _slab(faces: Sequence[tuple[int, int]], coverage_mm: float | None) -> bool:
    """Whether the series is a slab through the brain: the brain is cut at its first or last slice and
    the series covers less than :data:`WHOLE_BRAIN_MM` along its slice normal."""
    cut_across = any(axis == 0 for axis, _ in faces)
    return cut_across and coverage_mm is not None and coverage_mm < WHOLE_BRAIN_MM


def _faces_text(faces: Sequence[tuple[int, int]]) -> str:
    return ", ".join(_FACE_NAMES.get(face, str(face)) for face in faces)


def _covers(coverage_mm: float | None) -> str:
    return "" if coverage_mm is None else f" (covers {coverage_mm:.0f} mm along its slice normal)"


# -- rules ------------------------------------------------------------------------------------------------


def rule_series_slices(slices: int, min_slices: int) -> RuleResult:
    """Enough slices to cover a brain: ``slices >= min_slices``."""
    ok = slices >= min_slices
    return RuleResult(
        "series_slices",
        PASSED if ok else FAILED,
        {"slices": int(slices), "min_slices": int(min_slices)},
        f"{slices} slices" + ("" if ok else f", fewer than {min_slices}"),
    )


def rule_head_found(head_ml: float | None, min_head_ml: float) -> RuleResult:
    """The image shows an object of at least ``min_head_ml`` (not blank, not pure noise)."""
    if head_ml is None:
        return RuleResult("head_found", NOT_CHECKED, {}, "no image to measure")
    ok = head_ml >= min_head_ml
    return RuleResult(
        "head_found",
        PASSED if ok else FAILED,
        {"head_ml": _r(head_ml), "min_head_ml": _r(min_head_ml)},
        f"imaged head {head_ml:.1f} mL"
        + ("" if ok else f", under {min_head_ml:g} mL: a blank or noise image"),
    )


def _share_rule(
    name: str, tumour_ml: float, whole_ml: float | None, whole: str, missing: str, max_percent: float
) -> RuleResult:
    """Tumour at most ``max_percent`` of ``whole_ml`` (``whole``: "head" or "brain")."""
    if whole_ml is None or whole_ml <= 0:
        return RuleResult(name, NOT_CHECKED, {}, missing)
    share = 100.0 * tumour_ml / whole_ml
    ok = share <= max_percent
    of_what = f"the imaged head ({whole_ml:.1f} mL)" if whole == "head" else "the brain"
    return RuleResult(
        name,
        PASSED if ok else FAILED,
        {"tumour_ml": _r(tumour_ml), f"{whole}_ml": _r(whole_ml), "share_percent": _r(share),
         "max_percent": _r(max_percent)},
        f"tumour {tumour_ml:.1f} mL is {share:.1f} % of {of_what}"
        + ("" if ok else f", over {max_percent:g} %"),
    )  # fmt: skip


def rule_tumour_share_of_head(tumour_ml: float, head_ml: float | None, max_percent: float) -> RuleResult:
    """Tumour at most ``max_percent`` of the imaged head (a lower bound on its share of the brain)."""
    return _share_rule(
        "tumour_share_of_head", tumour_ml, head_ml, "head", "no head found to compare with", max_percent
    )


def rule_brain_found(brain_ml: float | None) -> RuleResult:
    """The brain mask holds at least one voxel."""
    if brain_ml is None:
        return RuleResult("brain_found", NOT_CHECKED, {}, "no brain mask")
    ok = brain_ml > 0
    return RuleResult(
        "brain_found",
        PASSED if ok else FAILED,
        {"brain_ml": _r(brain_ml)},
        f"brain {brain_ml:.1f} mL" if ok else "brain extraction found no brain",
    )


def rule_brain_volume(
    brain_ml: float | None,
    min_ml: float,
    max_ml: float,
    *,
    cut: bool = False,
    coverage_mm: float | None = None,
) -> RuleResult:
    """``min_ml <= brain volume <= max_ml``; with ``cut`` (the series is a slab through the brain) a
    brain under ``min_ml`` is not checked: the series holds part of it. ``coverage_mm``: the series'
    extent along its slice normal, for the message."""
    if brain_ml is None:
        return RuleResult("brain_volume", NOT_CHECKED, {}, "no brain mask")
    figures: dict[str, float | int] = {"brain_ml": _r(brain_ml), "min_ml": _r(min_ml), "max_ml": _r(max_ml),
                                       "brain_cut": bool(cut)}  # fmt: skip
    if coverage_mm is not None:
        figures["coverage_mm"] = _r(coverage_mm)
    if cut and brain_ml < min_ml:
        return RuleResult(
            "brain_volume",
            NOT_CHECKED,
            figures,
            f"brain {brain_ml:.1f} mL, not checked against {min_ml:g} mL: the series is a slab through "
            f"the brain{_covers(coverage_mm)}",
        )
    ok = min_ml <= brain_ml <= max_ml
    message = f"brain {brain_ml:.1f} mL" + ("" if ok else f", outside {min_ml:g}-{max_ml:g} mL")
    if brain_ml < min_ml:
        # Read alone, the figure looks like a failed mask; a young child's whole brain fails it too.
        message += (
            " (qc.min_brain_ml: an adult's brain; a site that sends young children's studies sets it lower)"
        )
    return RuleResult("brain_volume", PASSED if ok else FAILED, figures, message)


def rule_tumour_share_of_brain(tumour_ml: float, brain_ml: float | None, max_percent: float) -> RuleResult:
    """Tumour volume at most ``max_percent`` of the brain volume."""
    return _share_rule("tumour_share_of_brain", tumour_ml, brain_ml, "brain", "no brain mask", max_percent)


def rule_tumour_inside_brain(
    removed_voxels: int, predicted_voxels: int, voxel_ml: float, checked: bool, max_percent: float
) -> RuleResult:
    """At most ``max_percent`` of the predicted tumour lay outside the brain mask (it was removed)."""
    if not checked:
        return RuleResult("tumour_inside_brain", NOT_CHECKED, {}, "no brain mask: nothing removed")
    share = 100.0 * removed_voxels / predicted_voxels if predicted_voxels else 0.0
    ok = share <= max_percent
    return RuleResult(
        "tumour_inside_brain",
        PASSED if ok else FAILED,
        {"removed_voxels": int(removed_voxels), "removed_ml": _r(removed_voxels * voxel_ml),
         "removed_percent": _r(share), "max_percent": _r(max_percent)},
        f"{removed_voxels} tumour voxels ({removed_voxels * voxel_ml:.1f} mL, {share:.1f} %) were outside "
        "the brain and removed" + ("" if ok else f", over {max_percent:g} %"),
    )  # fmt: skip


def rule_tumour_within_coverage(
    edge_voxels: int | None,
    faces: Sequence[tuple[int, int]],
    coverage_mm: float | None,
    margin_mm: float = EDGE_MARGIN_MM,
    *,
    voxel_ml: float = 0.0,
    max_edge_ml: float = 0.0,
    skull_base: tuple[int, int] | None = None,
) -> RuleResult:
    """No tumour within ``margin_mm`` of a face where the series' field of view cuts the brain
    (``faces``, :func:`cut_faces`); ``edge_voxels``: the tumour voxels there (None: no brain mask),
    ``voxel_ml`` the volume of one. Up to ``max_edge_ml`` is allowed only where an axial series covers a
    whole brain's height and is cut at its skull-base slice alone (``skull_base``, :func:`skull_base_face`;
    :func:`_edge_allowance`)."""
    name = "tumour_within_coverage"
    if edge_voxels is None:
        return RuleResult(name, NOT_CHECKED, {}, "no brain mask, or no brain found")
    max_edge_ml = _edge_allowance(faces, coverage_mm, max_edge_ml, skull_base)
    edge_ml = edge_voxels * voxel_ml
    figures: dict[str, float | int] = {"cut_faces": len(faces), "edge_voxels": int(edge_voxels),
                                       "edge_ml": _r(edge_ml), "max_edge_ml": _r(max_edge_ml),
                                       "margin_mm": _r(margin_mm)}  # fmt: skip
    if coverage_mm is not None:
        figures["coverage_mm"] = _r(coverage_mm)
    if not faces:
        return RuleResult(name, PASSED, figures, f"the series covers the whole brain{_covers(coverage_mm)}")
    where = f"brain cut by the series' field of view at its {_faces_text(faces)}{_covers(coverage_mm)}"
    if edge_voxels and edge_ml > max_edge_ml:
        return RuleResult(
            name,
            FAILED,
            figures,
            f"tumour reaches the edge of the series' coverage ({edge_voxels} voxels, {edge_ml:.2f} mL within "
            f"{margin_mm:g} mm of the cut{_over_allowance(max_edge_ml)}); its volume is incomplete; {where}",
        )
    if edge_voxels:
        return RuleResult(
            name,
            PASSED,
            figures,
            f"{edge_voxels} tumour voxels ({edge_ml:.2f} mL) within {margin_mm:g} mm of the cut, not over "
            f"{max_edge_ml:g} mL: too little to be a tumour cut by the series; {where}",
        )
    return RuleResult(name, PASSED, figures, f"tumour inside the series' coverage; {where}")


def skull_base_face(slice_direction: Sequence[float] | None) -> tuple[int, int] | None:
    """The slice face (axis 0, end) at the feet's side of an axial series: ``slice_direction`` is the
    unit vector (LPS) from one slice to the next; None when it is more than 45 degrees from head-foot
    (a sagittal or coronal series) or unknown."""
    if slice_direction is None or abs(float(slice_direction[2])) < np.sqrt(0.5):
        return None
    return (0, 0) if float(slice_direction[2]) > 0 else (0, 1)  # +z (S) onwards: the first is lowest


def _over_allowance(max_edge_ml: float) -> str:
    """The allowance a cut tumour went over, for the message; nothing where none is allowed ("over 0 mL"
    read like a setting left at zero by mistake)."""
    return f", over the {max_edge_ml:g} mL allowed at a skull-base cut" if max_edge_ml > 0 else ""


def _edge_allowance(
    faces: Sequence[tuple[int, int]],
    coverage_mm: float | None,
    max_edge_ml: float,
    skull_base: tuple[int, int] | None,
) -> float:
    """``max_edge_ml`` for an axial series covering at least :data:`WHOLE_BRAIN_MM` whose brain is cut at
    its skull-base slice only (where a 2D FLAIR's inflow is bright); else 0: at a slab's cut, at both
    ends, at a row or column edge, or across a sagittal or coronal series (120 mm is a brain's height,
    not its length), any tumour is a tumour cut by the series."""
    whole_height = coverage_mm is not None and coverage_mm >= WHOLE_BRAIN_MM
    return max_edge_ml if whole_height and skull_base is not None and list(faces) == [skull_base] else 0.0


def edge_voxels(
    labels: npt.NDArray[np.integer[Any]],
    faces: Sequence[tuple[int, int]],
    spacing_mm: Sequence[float] | None,
    margin_mm: float = EDGE_MARGIN_MM,
) -> int:
    """Tumour voxels within ``margin_mm`` of any of ``faces`` (the face's own plane always counts;
    without ``spacing_mm`` only that plane)."""
    near = np.zeros(labels.shape, dtype=bool)
    for axis, end in faces:
        planes = 1 + (int(margin_mm // float(spacing_mm[axis])) if spacing_mm and spacing_mm[axis] > 0 else 0)
        planes = min(planes, labels.shape[axis])
        index: list[slice] = [slice(None)] * labels.ndim
        index[axis] = slice(0, planes) if end == 0 else slice(labels.shape[axis] - planes, None)
        near[tuple(index)] = True
    return int(np.count_nonzero(near & (labels > 0)))


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient of two masks of one shape (1.0 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def rule_whole_tumour_agreement(
    tumour_ml: float,
    reference_ml: float | None,
    overlap: float | None,
    settings: QCSettings,
    not_checked: str = "",
) -> RuleResult:
    """A several-series model's whole tumour (``tumour_ml``) agrees with the ``whole_tumor`` model's
    (``reference_ml``; None: not checked, ``not_checked`` says why): Dice ``overlap`` (None: the two are
    not on one grid) at least ``whole_tumour_min_dice`` where either exceeds ``whole_tumour_max_diff_ml``,
    and volumes apart by at most ``whole_tumour_max_diff_percent`` of the larger or at most
    ``whole_tumour_max_diff_ml``."""
    name = "whole_tumour_agreement"
    if reference_ml is None:
        return RuleResult(name, NOT_CHECKED, {}, not_checked or "no whole-tumour result to compare with")
    diff_ml = abs(tumour_ml - reference_ml)
    larger = max(tumour_ml, reference_ml)
    diff_percent = 100.0 * diff_ml / larger if larger > 0 else 0.0
    figures: dict[str, float | int] = {
        "tumour_ml": _r(tumour_ml), "whole_tumour_model_ml": _r(reference_ml), "diff_ml": _r(diff_ml),
        "diff_percent": _r(diff_percent), "max_diff_percent": _r(settings.whole_tumour_max_diff_percent),
        "max_diff_ml": _r(settings.whole_tumour_max_diff_ml), "min_dice": _r(settings.whole_tumour_min_dice),
    }  # fmt: skip
    if overlap is not None:
        figures["dice"] = _r(overlap)
    problems = []
    judged = larger > settings.whole_tumour_max_diff_ml
    if overlap is not None and judged and overlap < settings.whole_tumour_min_dice:
        problems.append(f"Dice {overlap:.2f} under {settings.whole_tumour_min_dice:g}")
    if diff_ml > settings.whole_tumour_max_diff_ml and diff_percent > settings.whole_tumour_max_diff_percent:
        limits = f"{settings.whole_tumour_max_diff_percent:g} % and {settings.whole_tumour_max_diff_ml:g} mL"
        problems.append(f"volumes {diff_ml:.1f} mL ({diff_percent:.0f} %) apart, over {limits}")
    text = f"whole tumour {tumour_ml:.1f} mL against the whole-tumour model's {reference_ml:.1f} mL"
    text += "" if overlap is None else f", Dice {overlap:.2f}"
    text += "" if overlap is not None else " (not on one grid: volumes only)"
    if not judged and overlap is not None:
        text += f" (Dice not judged: both under {settings.whole_tumour_max_diff_ml:g} mL)"
    if problems:
        return RuleResult(name, FAILED, figures, f"{text}: {'; '.join(problems)}")
    return RuleResult(name, PASSED, figures, text)


def with_rule(report: QCReport, rule: RuleResult, figures: dict[str, float | int | None]) -> QCReport:
    """``report`` with ``rule`` added (replacing a rule of that name) and ``figures`` merged in."""
    rules = [r for r in report.rules if r.name != rule.name] + [rule]
    return QCReport(rules=rules, figures={**report.figures, **figures}, cautions=list(report.cautions))


# -- cautions ---------------------------------------------------------------------------------------------


def caution_large_tumour(
    tumour_ml: float,
    brain_ml: float | None,
    head_ml: float | None,
    *,
    slab: bool,
    coverage_mm: float | None,
    caution_percent: float,
) -> RuleResult | None:
    """The ``large_tumour`` caution when the whole tumour is over ``caution_percent`` of the brain (of
    the imaged head without a brain mask: the brain lies inside the head, so its share of the brain is
    larger still); None when it is not, when ``caution_percent`` is 0, and where the share says nothing
    of the whole brain (a slab through the brain; without a brain mask, a series covering less than
    :data:`WHOLE_BRAIN_MM`)."""
    if caution_percent <= 0 or tumour_ml <= 0:
        return None
    if brain_ml is not None:
        if slab or brain_ml <= 0:
            return None
        whole_ml, of_what = brain_ml, "the brain"
    elif head_ml is not None and head_ml > 0 and (coverage_mm is None or coverage_mm >= WHOLE_BRAIN_MM):
        whole_ml, of_what = head_ml, "the imaged head, so more of the brain"
    else:
        return None
    share = 100.0 * tumour_ml / whole_ml
    if share <= caution_percent:
        return None
    return RuleResult(
        "large_tumour",
        CAUTION,
        {"tumour_ml": _r(tumour_ml), "share_percent": _r(share), "caution_percent": _r(caution_percent)},
        f"the whole tumour ({tumour_ml:.1f} mL) is {share:.1f} % of {of_what}, over {caution_percent:g} %: "
        "tumours this large may be under-called (the shipped models were trained on tumours of at most "
        "14 % of the brain); take the volume as a lower bound",
    )


def caution_small_tumour(tumour_ml: float, pieces: int, caution_ml: float) -> RuleResult | None:
    """The ``small_tumour`` caution when the whole tumour (``pieces``: its 26-connected pieces) is above
    0 and under ``caution_ml``; None otherwise and when ``caution_ml`` is 0."""
    if caution_ml <= 0 or not 0 < tumour_ml < caution_ml:
        return None
    return RuleResult(
        "small_tumour",
        CAUTION,
        {"tumour_ml": _r(tumour_ml), "pieces": int(pieces), "caution_ml": _r(caution_ml)},
        f"the whole tumour is {tumour_ml:.2f} mL in {pieces} piece{'' if pieces == 1 else 's'}, under "
        f"{caution_ml:g} mL: brains without tumour came back with up to 4 mL of false tumour in tests; "
        "check it against the images before reading it as a tumour",
    )


# -- all rules --------------------------------------------------------------------------------------------


def check(
    labels: npt.NDArray[np.integer[Any]],
    brain: npt.NDArray[np.bool_] | None,
    voxel_ml: float,
    slices: int,
    settings: QCSettings,
    *,
    head: npt.NDArray[np.bool_] | None = None,
    removed_voxels: int = 0,
    spacing_mm: Sequence[float] | None = None,
    slice_direction: Sequence[float] | None = None,
) -> QCReport:
    """Run every rule on a result.

    Parameters
    ----------
    labels:
        The label map after :func:`restrict_to_brain` (0 background), on the grid of ``brain`` and
        ``head``.
    brain:
        The brain mask on the same grid, or None when the job has none (brain rules not checked).
    voxel_ml:
        Volume of one voxel in mL.
    slices:
        Slice count of the series (the fewest among the chosen series).
    settings:
        The ``[qc]`` limits.
    head:
        :func:`head_mask` of the image on the same grid (head rules not checked when None).
    removed_voxels:
        Tumour voxels :func:`restrict_to_brain` removed.
    spacing_mm:
        (slice, row, column) spacing of the grid in mm: the series' coverage along its slice normal
        and the margin of ``tumour_within_coverage`` (coverage not reported, edge planes only, when None).
    slice_direction:
        Unit vector (LPS) from one slice to the next: which end of an axial series is its skull base,
        where ``tumour_within_coverage`` allows ``max_tumour_at_cut_ml`` (none when None).
    """
    tumour_ml = float(np.count_nonzero(labels)) * voxel_ml
    brain_ml = None if brain is None else float(np.count_nonzero(brain)) * voxel_ml
    head_ml = None if head is None else float(np.count_nonzero(head)) * voxel_ml
    predicted = int(np.count_nonzero(labels)) + removed_voxels
    coverage_mm = None if spacing_mm is None else float(labels.shape[0]) * float(spacing_mm[0])
    faces = [] if brain is None else cut_faces(brain)
    at_edge = None if brain is None or not brain_ml else edge_voxels(labels, faces, spacing_mm)
    rules = [
        rule_series_slices(slices, settings.min_slices),
        rule_head_found(head_ml, settings.min_head_ml),
        # Without a head (blank, noise) a share of it says nothing more: not checked.
        rule_tumour_share_of_head(
            tumour_ml,
            head_ml if head_ml is not None and head_ml >= settings.min_head_ml else None,
            settings.max_tumour_share_percent,
        ),
        rule_brain_found(brain_ml),
        rule_brain_volume(
            brain_ml, settings.min_brain_ml, settings.max_brain_ml, cut=_slab(faces, coverage_mm),
            coverage_mm=coverage_mm,
        ),
        rule_tumour_share_of_brain(tumour_ml, brain_ml, settings.max_tumour_share_percent),
        rule_tumour_inside_brain(
            removed_voxels, predicted, voxel_ml, brain is not None, settings.max_outside_share_percent
        ),
        rule_tumour_within_coverage(
            at_edge, faces, coverage_mm, voxel_ml=voxel_ml, max_edge_ml=settings.max_tumour_at_cut_ml,
            skull_base=skull_base_face(slice_direction),
        ),
    ]
    figures: dict[str, float | int | None] = {
        "tumour_volume_ml": _r(tumour_ml),
        "brain_volume_ml": None if brain_ml is None else _r(brain_ml),
        "tumour_share_of_brain_percent": _r(100 * tumour_ml / brain_ml) if brain_ml else None,
        "head_volume_ml": None if head_ml is None else _r(head_ml),
        "removed_outside_brain_voxels": int(removed_voxels),
        "slices": int(slices),
        "coverage_mm": None if coverage_mm is None else _r(coverage_mm),
        "brain_cut": None if brain is None else bool(faces),
        "brain_slab": None if brain is None else _slab(faces, coverage_mm),
    }
    large = caution_large_tumour(
        tumour_ml, brain_ml, head_ml if head_ml is not None and head_ml >= settings.min_head_ml else None,
        slab=bool(figures["brain_slab"]), coverage_mm=coverage_mm,
        caution_percent=settings.caution_tumour_share_percent,
    )  # fmt: skip
    small = None
    if 0 < tumour_ml < settings.caution_small_tumour_ml:  # the pieces are counted only then
        pieces = int(ndimage.label(labels > 0, np.ones((3, 3, 3), bool))[1])
        small = caution_small_tumour(tumour_ml, pieces, settings.caution_small_tumour_ml)
    return QCReport(rules=rules, figures=figures, cautions=[c for c in (large, small) if c is not None])


def failed_rule_names(report: QCReport) -> Sequence[str]:
    """Names of the failed rules, in rule order."""
    return [r.name for r in report.failed]
