"""The SEG's source copies given the shared geometry highdicom requires of them.

highdicom builds a SEG only from source images whose geometry is written the one way it reads:

* single-frame images: ImageOrientationPatient exactly equal in every image (``!=`` on the values),
  and SliceThickness present (it reads the attribute);
* multi-frame images: PlaneOrientationSequence and PixelMeasuresSequence in the Shared Functional
  Groups.

Scanners write otherwise. GE writes each slice's orientation cosines with its own rounding (the real
GE series in ../shared/data: 32 different values in 130 slices, up to 7e-8 apart); Philips Enhanced
MR puts orientation and pixel measures in the Per-frame Functional Groups; anonymisers drop
SliceThickness (Type 2); some headers carry a SliceThickness or SpacingBetweenSlices that is no
number (a malformed DS, 'QZXST'), which highdicom fails to convert (``ValueError``), or a negative
SpacingBetweenSlices (older scanners write the signed step), which highdicom copies into the SEG,
where it must not be negative (PS3.3 C.7.6.16.2.1; dciodvfy: "Not permitted to be negative"). The
node's loader (converters/dicom_series.py) accepted these series (its orientation tolerance is 1e-4;
it measures the slice spacing from positions), the model has run on them, and without this module
the SEG of such a study failed at the very end of its job (or, the negative spacing, went out
invalid, for a validating PACS to reject).

:func:`seg_sources` returns copies carrying the one geometry that the loader already read from the
series (the first image's orientation, the pixel measures every frame agrees on, the slice spacing
from positions for a missing thickness: a single-frame image's SliceThickness, a multi-frame image's
in its shared Pixel Measures, Type 1C in the SEG's); a SliceThickness or SpacingBetweenSlices that is
no positive number, a single-frame image's or in a multi-frame image's Pixel Measures (shared or per
frame), is omitted first (the thickness then filled as a missing one); the sources themselves are not
modified. Each correction is logged with its keyword and the
size of the difference, never with a patient value.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from converters.dicom_series import ORIENTATION_TOLERANCE
from node.exceptions import JobError
from node.source_attributes import own_copy

logger = logging.getLogger(__name__)

#: Functional group sequences that highdicom reads from the Shared Functional Groups only.
SHARED_GROUPS: tuple[str, ...] = ("PlaneOrientationSequence", "PixelMeasuresSequence")
#: Single-frame attributes highdicom reads as numbers into the SEG's pixel measures.
_SPACING_KEYWORDS: tuple[str, ...] = ("SliceThickness", "SpacingBetweenSlices")


def seg_sources(sources: Sequence[Dataset], *, what: str = "SEG") -> list[Dataset]:
    """Copies of ``sources`` (one series, in slice order) with the shared geometry highdicom needs.

    Raises
    ------
    JobError
        The images' orientations differ by more than the loader's tolerance, or a multi-frame
        image's frames disagree on a functional group that must be shared.
    """
    copies = [own_copy(ds) for ds in sources]
    single = [ds for ds in copies if "PerFrameFunctionalGroupsSequence" not in ds]
    if single:
        _share_orientation(single, what)
        _omit_unreadable_spacing(single, what)
        _fill_slice_thickness(single, what)
    for ds in copies:
        if "PerFrameFunctionalGroupsSequence" in ds:
            _omit_unreadable_frame_spacing(ds, what)
            _share_frame_groups(ds, what)
            _fill_frame_thickness(ds, what)
    return copies


def _cosines(ds: Dataset) -> np.ndarray | None:
    value = ds.get("ImageOrientationPatient")
    if value is None or len(value) != 6:
        return None
    return np.asarray([float(v) for v in value])


def _share_orientation(images: list[Dataset], what: str) -> None:
    first = _cosines(images[0])
    if first is None:
        return  # highdicom reports what is missing
    written = images[0].ImageOrientationPatient
    if all(ds.get("ImageOrientationPatient") == written for ds in images[1:]):
        return
    spread = 0.0
    for ds in images[1:]:
        cosines = _cosines(ds)
        if cosines is None:
            continue
        spread = max(spread, float(np.max(np.abs(cosines - first))))
    if spread > ORIENTATION_TOLERANCE:
        raise JobError(
            f"{what}: the source images' ImageOrientationPatient differ by up to {spread:.2g}, over "
            f"the loader's tolerance {ORIENTATION_TOLERANCE:.2g}"
        )
    shared = copy.deepcopy(images[0]["ImageOrientationPatient"])
    for ds in images[1:]:
        ds["ImageOrientationPatient"] = copy.deepcopy(shared)
    logger.info(
        "%s: source ImageOrientationPatient written with different rounding (up to %.2g apart): the "
        "first image's written for every image",
        what, spread,
    )


def _number(ds: Dataset, keyword: str) -> float | None:
    """``ds``'s ``keyword`` as one finite number, or None when it is absent, empty or no number (a DS
    'QZXST', several values): pydicom may refuse to convert it at all."""
    try:
        value = ds.get(keyword)
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _omit_unreadable_spacing(images: list[Dataset], what: str) -> None:
    """Omit from single-frame ``images`` (copies) a SliceThickness or SpacingBetweenSlices that is no
    positive number: highdicom reads both into the SEG's pixel measures, failing on one that is no
    number (``ValueError: could not convert string to float``) and copying a negative one (the signed
    step some older scanners write), which the SEG must not have. The thickness is then filled from
    the positions like an absent one."""
    for keyword in _SPACING_KEYWORDS:
        bad = [ds for ds in images if _not_a_positive_number(ds, keyword)]
        for ds in bad:
            del ds[keyword]
        if bad:
            logger.warning(
                "%s: source attribute %s not a positive number in %d of %d images: omitted (value not "
                "logged)",
                what, keyword, len(bad), len(images),
            )


def _not_a_positive_number(ds: Dataset, keyword: str) -> bool:
    """Whether ``ds`` has a ``keyword`` that is neither empty nor one finite number above 0."""
    try:
        empty = keyword not in ds or ds.get(keyword) in (None, "")
    except (TypeError, ValueError):
        empty = False
    number = _number(ds, keyword)
    return not empty and (number is None or number <= 0)


def _omit_unreadable_frame_spacing(ds: Dataset, what: str) -> None:
    """Omit from the Pixel Measures items of multi-frame ``ds`` (a copy: its functional group
    sequences are replaced, not changed in place) a SliceThickness or SpacingBetweenSlices that is no
    positive number, as :func:`_omit_unreadable_spacing` does for single-frame images: highdicom copies
    the shared item into the SEG, a malformed DS and all (an invalid SEG), and fails on a
    multi-valued or empty SpacingBetweenSlices (``sqlite3.ProgrammingError``, ``KeyError``). An empty
    value goes too. The thickness is then filled from the frame positions like an absent one."""
    omitted: dict[str, int] = {}
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(keyword)
        if groups:
            cleaned = [_without_unreadable_spacing(group, omitted) for group in groups]
            if any(new is not old for new, old in zip(cleaned, groups, strict=True)):
                setattr(ds, keyword, DicomSequence(cleaned))
    for keyword, count in omitted.items():
        logger.warning(
            "%s: source attribute %s not a positive number in %d Pixel Measures items of a %d-frame "
            "image: omitted (value not logged)",
            what, keyword, count, len(ds.PerFrameFunctionalGroupsSequence),
        )


def _without_unreadable_spacing(group: Dataset, omitted: dict[str, int]) -> Dataset:
    """``group`` (a functional groups item), or a copy of it whose Pixel Measures item lacks the
    spacing attributes that are no positive number; ``omitted`` counts them by keyword."""
    measures = group.get("PixelMeasuresSequence")
    if not measures:
        return group
    bad = [k for k in _SPACING_KEYWORDS if k in measures[0] and not _positive(measures[0], k)]
    if not bad:
        return group
    item = own_copy(measures[0])
    for keyword in bad:
        del item[keyword]
        omitted[keyword] = omitted.get(keyword, 0) + 1
    cleaned = own_copy(group)
    cleaned.PixelMeasuresSequence = DicomSequence([item, *measures[1:]])
    return cleaned


def _positive(ds: Dataset, keyword: str) -> bool:
    number = _number(ds, keyword)
    return number is not None and number > 0


def _fill_slice_thickness(images: list[Dataset], what: str) -> None:
    missing = [ds for ds in images if ds.get("SliceThickness") in (None, "")]
    if not missing:
        return
    spacing = _slice_spacing(images)
    if spacing is None:
        return  # one image and no SpacingBetweenSlices: highdicom reports the missing attribute
    for ds in missing:
        ds.SliceThickness = f"{spacing:.6g}"
    logger.warning(
        "%s: source attribute SliceThickness absent or empty in %d of %d images: the slice spacing "
        "from their positions (%.3g mm) written in the SEG's pixel measures",
        what, len(missing), len(images), spacing,
    )


def _slice_spacing(images: list[Dataset]) -> float | None:
    """The distance between the first two images along the slice normal (the series is in slice
    order), or SpacingBetweenSlices for a single image."""
    if len(images) < 2:
        value = _number(images[0], "SpacingBetweenSlices")
        return value if value is not None and value > 0 else None
    cosines = _cosines(images[0])
    positions = [images[n].get("ImagePositionPatient") for n in (0, 1)]
    if cosines is None or any(p is None or len(p) != 3 for p in positions):
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    gap = abs(float((np.asarray(positions[1], float) - np.asarray(positions[0], float)) @ normal))
    return gap if gap > 0 else None


def _fill_frame_thickness(ds: Dataset, what: str) -> None:
    """The shared Pixel Measures of multi-frame ``ds`` (a copy) given the frame spacing as
    SliceThickness when it has none: the SEG copies that item, where SliceThickness is Type 1C
    (PS3.3 C.7.6.16.2.1; dciodvfy: "Missing attribute Type 1C ... SliceThickness")."""
    shared_items = ds.get("SharedFunctionalGroupsSequence")
    measures = shared_items[0].get("PixelMeasuresSequence") if shared_items else None
    if not measures or measures[0].get("SliceThickness") not in (None, ""):
        return
    spacing = _frame_spacing(ds)
    if spacing is None:
        return  # no positions to measure: highdicom or the SEG's validators report it
    item = copy.deepcopy(measures[0])
    item.SliceThickness = f"{spacing:.6g}"
    shared = own_copy(shared_items[0])
    shared.PixelMeasuresSequence = DicomSequence([item])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    logger.warning(
        "%s: source attribute SliceThickness absent or empty in the pixel measures of a %d-frame image: "
        "the frame spacing from their positions (%.3g mm) written in the SEG's pixel measures",
        what, len(ds.PerFrameFunctionalGroupsSequence), spacing,
    )


def _frame_spacing(ds: Dataset) -> float | None:
    """The mean distance between neighbouring frames of ``ds`` along the slice normal, as the loader
    measures it (frames in any order), or SpacingBetweenSlices for a single frame."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    frames = list(ds.PerFrameFunctionalGroupsSequence)

    def group(frame: Dataset, keyword: str) -> Dataset | None:
        items = frame.get(keyword) or shared.get(keyword)
        return items[0] if items else None

    if len(frames) < 2:
        measures = group(frames[0], "PixelMeasuresSequence") if frames else None
        value = _number(measures, "SpacingBetweenSlices") if measures is not None else None
        return value if value is not None and value > 0 else None
    orientation = group(frames[0], "PlaneOrientationSequence")
    cosines = _cosines(orientation) if orientation is not None else None
    if cosines is None:
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    depths = []
    for frame in frames:
        position = group(frame, "PlanePositionSequence")
        value = position.get("ImagePositionPatient") if position is not None else None
        if value is None or len(value) != 3:
            return None
        depths.append(float(np.asarray(value, float) @ normal))
    extent = max(depths) - min(depths)
    return extent / (len(depths) - 1) if extent > 0 else None


def _share_frame_groups(ds: Dataset, what: str) -> None:
    """Move a functional group that every frame writes alike into the Shared Functional Groups of
    ``ds`` (a copy: its sequences are replaced, not changed in place). Alike: orientations within the
    loader's tolerance, pixel spacings within its relative 1e-4; the first frame's is shared."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    shared_items = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    shared = copy.copy(shared_items[0])
    shared._dict = dict(shared_items[0]._dict)
    moved = []
    for keyword in SHARED_GROUPS:
        if keyword in shared or not all(keyword in item for item in per_frame):
            continue
        problem = _disagreement(keyword, [item[keyword].value for item in per_frame])
        if problem is not None:
            raise JobError(f"{what}: the source's frames {problem}; one SEG cannot describe them")
        shared[keyword] = copy.deepcopy(per_frame[0][keyword])
        moved.append(keyword)
    if moved:
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        groups = " and ".join(moved)
        logger.info("%s: source %s written per frame, alike in every frame: shared for the SEG", what, groups)


def _disagreement(keyword: str, groups: list[Sequence[Dataset]]) -> str | None:
    """Why the frames' ``keyword`` groups cannot be one shared group, or None when they can."""
    if keyword == "PlaneOrientationSequence":
        found = [_item_cosines(group) for group in groups]
        cosines = [c for c in found if c is not None]
        if len(cosines) != len(found):
            return "have an orientation missing or malformed"
        spread = max(float(np.max(np.abs(c - cosines[0]))) for c in cosines)
        if spread > ORIENTATION_TOLERANCE:
            return f"have orientations up to {spread:.2g} apart, over the loader's tolerance"
        return None
    found_spacings = [_item_spacing(group) for group in groups]
    spacings = [s for s in found_spacings if s is not None]
    if len(spacings) != len(found_spacings):
        return "have a PixelSpacing missing or malformed"
    if not all(np.allclose(s, spacings[0], rtol=1e-4, atol=1e-5) for s in spacings):
        return "have different pixel spacings"
    return None


def _item_spacing(items: Sequence[Dataset]) -> np.ndarray | None:
    value = items[0].get("PixelSpacing") if items else None
    if value is None or len(value) != 2:
        return None
    return np.asarray([float(v) for v in value])


def _item_cosines(items: Sequence[Dataset]) -> np.ndarray | None:
    if not items:
        return None
    return _cosines(items[0])
