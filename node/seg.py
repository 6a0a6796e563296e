"""DICOM Segmentation (PS3.3 A.51, C.8.20) of the model's output, written with highdicom.

A BINARY SEG on the source series' grid: one frame per source slice that holds any tumour, each
frame referencing its source image (Derivation Image / Source Image sequences), one segment per
label of the model card with the codes of DESIGN.md "Codes for segments", algorithm type AUTOMATIC
with the model's name and version (family CID 7162 "Artificial Intelligence"), and a
SeriesDescription that marks the object as AI-generated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.exceptions import JobError
from node.seg_geometry import seg_sources
from node.source_attributes import clean_sources

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI TUMOUR SEG (segnode, not for diagnosis alone)"
MANUFACTURER = "segnode"
SEG_SERIES_NUMBER = 9901

#: SCT 12738006 "Brain" (DESIGN.md).
BRAIN = hd.sr.CodedConcept("12738006", "SCT", "Brain")
#: SCT 49755003 "Morphologically abnormal structure": category when the card gives none.
ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")


#: Display colour per label value (RGB in 0..255, the range highdicom's ``CIELabColor.from_rgb`` takes),
#: as in the PNG preview (node/preview.py). Labels beyond the table are yellow.
DISPLAY_RGB: dict[int, tuple[int, int, int]] = {
    1: (255, 40, 40),
    2: (40, 220, 40),
    3: (60, 120, 255),
}


def _code(entry: Mapping[str, Any] | None, default: hd.sr.CodedConcept) -> hd.sr.CodedConcept:
    if not entry:
        return default
    return hd.sr.CodedConcept(str(entry["code"]), str(entry["scheme"]), str(entry["meaning"]))


def algorithm_identification(card: Mapping[str, Any]) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification (PS3.3 C.8.20.2.1): the model name and version, family AI (CID 7162)."""
    return hd.AlgorithmIdentificationSequence(
        name=str(card.get("name", "segnode model"))[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=str(card.get("version", "unknown"))[:64],
        source="segnode",
    )


def segment_descriptions(
    card: Mapping[str, Any], notes: Mapping[int, str] | None = None
) -> list[hd.seg.SegmentDescription]:
    """One SegmentDescription per label of the card, numbered 1..n in the card's order; ``notes``
    (label value -> text) become the Segment Description (0062,0006) of those labels' segments."""
    labels = card.get("labels") or []
    if not labels:
        raise JobError(f"model card {card.get('name')!r}: 'labels' is empty; cannot describe SEG segments")
    algorithm = algorithm_identification(card)
    out = []
    for number, label in enumerate(labels, start=1):
        segment = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(label.get("name", f"label {label.get('value')}"))[:64],
            segmented_property_category=_code(label.get("category"), ABNORMAL),
            segmented_property_type=_code(
                label.get("type"), hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[BRAIN],
            display_color=hd.color.CIELabColor.from_rgb(
                *DISPLAY_RGB.get(int(label["value"]), (255, 217, 0))
            ),
        )
        note = (notes or {}).get(int(label["value"]))
        if note:
            segment.SegmentDescription = note[:64]  # LO
        out.append(segment)
    return out


def card_texts(card: Mapping[str, Any]) -> list[str]:
    """The model card's text an output carries: its name, version and label names."""
    labels = [str(label.get("name", "")) for label in card.get("labels") or []]
    return [str(card.get("name", "")), str(card.get("version", "")), *labels]


#: What a result that failed a QC check says first in its SeriesDescription: the node held it, and it
#: left only when an administrator released it after review (``segnode jobs retry ID --send-anyway``).
QC_FAILED_MARKER = "QC FAILED: "
#: SeriesDescription is LO (PS3.5 6.2): at most 64 characters.
DESCRIPTION_MAX = 64


def run_series(
    number: int, description: str, run: int, *, resend: int = 0, qc_failed: bool = False
) -> tuple[int, str]:
    """The SeriesNumber and SeriesDescription of an output of a study's ``run``-th analysis: run 1
    keeps ``number`` and ``description``; a re-run (instances received after the first) gets a
    number 10 higher per run and says which run it is, so that a reader tells the current result
    from the earlier one in the viewer's series list. A run's result made again after it had been
    queued for sending (``resend``: how many of its results were, ``segnode jobs retry`` of a done
    job) gets a number 1000 higher per such result and says "retry N", so that it is not a second
    series under the number and description the PACS already holds. A result that failed a QC check
    (``qc_failed``; it is sent only once released after review) begins with :data:`QC_FAILED_MARKER`.
    """
    prefix = QC_FAILED_MARKER if qc_failed else ""
    suffix = (f" run {run}" if run > 1 else "") + (f" retry {resend}" if resend > 0 else "")
    series_number = number + 10 * (max(run, 1) - 1) + 1000 * max(resend, 0)
    return series_number, fit_description(prefix, description, suffix)


def fit_description(prefix: str, description: str, suffix: str) -> str:
    """``prefix + description + suffix`` within :data:`DESCRIPTION_MAX` characters, the prefix, the
    suffix and the description's closing parenthesis (the disclaimer "not for diagnosis alone") whole.
    When it would not fit, the description loses "segnode, " (the Manufacturer says it), then "AI ",
    then the words of its title from the end."""
    room = DESCRIPTION_MAX - len(prefix) - len(suffix)
    for drop in ("segnode, ", "AI "):
        if len(description) > room:
            description = description.replace(drop, "", 1)
    if len(description) > room:
        title, paren, rest = description.partition(" (")
        if paren:
            disclaimer = paren + rest
            words = title.split()
            while words and len(" ".join(words)) + len(disclaimer) > room:
                words.pop()
            description = " ".join(words) + disclaimer if words else disclaimer.lstrip()
    return f"{prefix}{description[:room]}{suffix}"


def label_values(card: Mapping[str, Any]) -> list[int]:
    """The label-map value of each segment, in segment-number order."""
    return [int(label["value"]) for label in card.get("labels") or []]


def warm_up() -> None:
    """Load highdicom's tables of the standard now rather than in the first study's SEG stage.

    highdicom parses its module and IOD tables (JSON, ~0.8 s) the first time it builds a SEG and caches
    them for the process. Their loaders are private: when a highdicom release renames them this does
    nothing and the first SEG pays as before.
    """
    from node.highdicom_tables import load_into_highdicom

    try:
        from highdicom import _standard_utils as tables
    except ImportError:
        return
    load_into_highdicom()  # the tables cut to the node's objects: ~75 MiB less than highdicom's own
    for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
        loader = getattr(tables, name, None)
        if callable(loader):
            loader()


def build_seg(
    sources: Sequence[Dataset],
    labels: npt.NDArray[np.integer[Any]],
    card: Mapping[str, Any],
    *,
    software_version: str,
    run: int = 1,
    resend: int = 0,
    qc_failed: bool = False,
    notes: Mapping[int, str] | None = None,
) -> hd.seg.Segmentation:
    """A BINARY SEG from a label map on the source grid.

    Parameters
    ----------
    sources:
        The source series' datasets in slice order (the order of ``labels``' first axis). Their
        patient and study attributes are copied by the rules of :mod:`node.source_attributes`.
    labels:
        Label map (frames, rows, columns) with the card's label values (0 = background), one plane
        per source frame in source order (single-frame sources: one per image).
    card:
        The model card: name, version and labels (value, name, category, type codes).
    software_version:
        Version string of segnode, recorded in the SEG's equipment module.
    run:
        Which analysis of the study this is (:func:`run_series`).
    resend:
        How many earlier results of this run were queued for sending (:func:`run_series`).
    qc_failed:
        The result failed a QC check: the SeriesDescription says so (:func:`run_series`).
    notes:
        Label value -> a Segment Description for that segment (e.g. where its extent came from).

    Raises
    ------
    JobError
        The label map does not match the source grid, or the sources' geometry differs more than one
        SEG can describe (:func:`node.seg_geometry.seg_sources`).
    """
    frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in sources)
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if labels.shape != (frames, rows, columns):
        raise JobError(
            f"label map of shape {labels.shape} does not match the source series "
            f"({frames} frames of {rows}x{columns})"
        )
    values = label_values(card)
    segments = np.zeros(labels.shape, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        segments[labels == value] = number
    if not segments.any():
        # highdicom needs at least one frame: an empty result keeps every (empty) frame.
        logger.info("model found no tumour; the SEG holds one empty frame")
    series_number, description = run_series(
        SEG_SERIES_NUMBER, SERIES_DESCRIPTION, run, resend=resend, qc_failed=qc_failed
    )
    seg = hd.seg.Segmentation(
        source_images=seg_sources(clean_sources(sources, what="SEG", extra_texts=card_texts(card))),
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(card, notes),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=str(card.get("name", "segnode"))[:64],
        software_versions=software_version,
        device_serial_number="0",
        series_description=description,
        content_label="TUMOUR",
        content_description=f"AI segmentation by {card.get('name')} {card.get('version')}"[:64],
        omit_empty_frames=bool(segments.any()),
    )
    return seg
