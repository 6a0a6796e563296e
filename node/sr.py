"""Structured report of the tumour volumes: TID 1500 Measurement Report in a Comprehensive 3D SR.

One Volumetric ROI Measurements group (TID 1411) per SEG segment, each referencing that segment of
the SEG (ReferencedSegment, with the source series) and holding one measurement: SCT 118565006
"Volume" in UCUM "mL", measured by the model (algorithm identification TID 4019: the model's name
and version, in each group and each measurement).

When the model found no tumour there is no SEG to reference: each segment's group is then a TID 1501
Measurements group (no ROI) with the same finding type and a volume of 0 mL, so the PACS still
learns that the study was analysed and what was found.

When the job has a brain mask, one more TID 1501 group with finding type SCT 12738006 "Brain" holds
the brain volume (SCT 118565006 "Volume", UCUM "mL") and the whole tumour's share of it, in UCUM "%"
under :data:`TUMOUR_SHARE_OF_BRAIN`. No SNOMED CT, DCM or LOINC concept names a lesion's volume as
a share of its organ's (SCT 118586006 "Ratio" would not say of what), so that concept is in a
private coding scheme (PS3.3 8.2: designators beginning "99") whose meaning says it in words. A report
that uses the scheme identifies it in its Coding Scheme Identification Sequence.

When the series is a slab through the brain (node/qc.py: the brain is cut at its first or last slice
and the series covers less than a whole brain's height), the brain mask holds only the part of the
brain within the series' coverage: a targeted slab's 700 mL is not an atrophic brain. That group then
names its volume and the tumour's share with private concepts that say so,
:data:`BRAIN_VOLUME_IN_SERIES` and :data:`TUMOUR_SHARE_OF_BRAIN_IN_SERIES`, instead of SCT "Volume"
(which a reader or a PACS takes for the brain's volume) and :data:`TUMOUR_SHARE_OF_BRAIN`, and its
tracking identifier says it in words.

For a ``brats_regions`` model, two more TID 1501 groups hold the composite regions radiologists
follow (RANO): the whole tumour (every tissue; SCT 108369006 "Neoplasm") and the tumour core
(non-enhancing/necrotic and enhancing tumour; no standard concept names it, so a private one,
:data:`TUMOUR_CORE`). Which model ran and why (the routing: e.g. "T2 missing") is an Algorithm
Parameters item (DCM 111002, TID 4019) of the algorithm identification.

A result that failed a QC check (node/qc.py) is held, and reaches the PACS only when an administrator
releases it after review (``segnode jobs retry ID --send-anyway``). Its report then says so where a
reader sees it: TID 1500's Qualitative Evaluations container (UMLS C0034375) holds a TEXT item
:data:`QC_RELEASED` saying the result was held and released, and one TEXT item :data:`QC_FAILED_RULE`
per failed rule ("failed check NAME: MESSAGE", with the rule's figures; dsr2html shows the texts
under the container's name), private concepts as no standard one names
them; and its SeriesDescription begins with :data:`node.seg.QC_FAILED_MARKER`, as the SEG's does.

A result sent with a QC caution (node/qc.py ``QCReport.cautions``: e.g. a tumour so large that its
volume is to be read as a lower bound) has one TEXT item :data:`QC_CAUTION` per caution ("caution
NAME: MESSAGE") in the same Qualitative Evaluations container.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node.seg import QC_FAILED_MARKER, card_texts, run_series
from node.source_attributes import clean_sources

logger = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "AI TUMOUR VOLUME (segnode, not for diagnosis alone)"
SR_SERIES_NUMBER = 9902
MILLILITRE = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
#: SCT 113091000 "Magnetic resonance imaging" as the procedure reported.
MR_PROCEDURE = hd.sr.CodedConcept("113091000", "SCT", "Magnetic resonance imaging")
#: SCT 12738006 "Brain": finding type of the brain group.
BRAIN = hd.sr.CodedConcept("12738006", "SCT", "Brain")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
#: The private coding scheme of the concepts no standard scheme has (PS3.3 8.2: designators beginning
#: "99"), declared in the Coding Scheme Identification Sequence (SOP Common module) of every report
#: that uses it, so that a reader learns what the scheme is. dciodvfy still warns "Unrecognized defined
#: term <99SEGNODE>": it checks designators against its own fixed list, not against that sequence
#: (tests/helpers/peers.py DCIODVFY_PRIVATE_SCHEME).
PRIVATE_SCHEME = "99SEGNODE"
#: Whole-tumour volume / brain volume, in %: private concept (see the module docstring).
TUMOUR_SHARE_OF_BRAIN = hd.sr.CodedConcept(
    "TUMOUR_BRAIN_PCT", PRIVATE_SCHEME, "Whole tumour volume as percentage of brain volume"
)
#: Brain volume and the tumour's share of it when the series is a slab through the brain: private concepts
#: (see the module docstring).
BRAIN_VOLUME_IN_SERIES = hd.sr.CodedConcept(
    "BRAIN_SLAB_ML", PRIVATE_SCHEME, "Brain volume within the series' coverage, not the whole brain"
)
TUMOUR_SHARE_OF_BRAIN_IN_SERIES = hd.sr.CodedConcept(
    "TUMOUR_SLAB_PCT", PRIVATE_SCHEME, "Whole tumour volume as percentage of brain within the series"
)
#: Tracking identifier of the brain group of a slab.
BRAIN_IN_SERIES_TEXT = "brain within the series' coverage (a slab, not the whole brain)"
#: SCT 108369006 "Neoplasm": finding type of the whole-tumour group.
NEOPLASM = hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")
#: Non-enhancing/necrotic + enhancing tumour: private concept (see the module docstring).
TUMOUR_CORE = hd.sr.CodedConcept(
    "TUMOUR_CORE", PRIVATE_SCHEME, "Tumour core (non-enhancing or necrotic and enhancing tumour)"
)
#: UMLS C0034375 "Qualitative Evaluations": TID 1500's container of the report's text findings.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: The result failed the node's QC checks and was sent after review: private concept (module docstring).
QC_RELEASED = hd.sr.CodedConcept("QC_RELEASED", PRIVATE_SCHEME, "Sent after failed quality check and review")
#: One failed QC rule, its name and message: private concept (see the module docstring).
QC_FAILED_RULE = hd.sr.CodedConcept("QC_FAILED_RULE", PRIVATE_SCHEME, "Failed quality check")
#: A QC caution sent with the result, its name and message: private concept (see the module docstring).
QC_CAUTION = hd.sr.CodedConcept("QC_CAUTION", PRIVATE_SCHEME, "Quality check caution")
#: The QC_RELEASED item's text.
QC_RELEASED_TEXT = (
    f"{QC_FAILED_MARKER}the node held this result because it failed the quality checks below; it was "
    "sent only because an administrator released it after review. Check them before relying on the volumes."
)
#: Composite region key (node/pipeline.py ``region_volumes_ml``) -> (finding type, tracking identifier).
REGIONS: dict[str, tuple[hd.sr.CodedConcept, str]] = {
    "whole_tumour": (NEOPLASM, "whole tumour (all tissues)"),
    "tumour_core": (TUMOUR_CORE, "tumour core (necrotic/non-enhancing + enhancing)"),
}


def device_uid() -> str:
    """The Device Observer UID of this node's reports: the same for every report from this host, so a
    PACS sees one device (derived from the host name, which it does not reveal)."""
    return str(generate_uid(entropy_srcs=["segnode device observer", socket.gethostname()]))


def build_sr(
    seg: Dataset | None,
    sources: Sequence[Dataset],
    volumes_ml: Sequence[float],
    card: Mapping[str, Any],
    *,
    brain_volume_ml: float | None = None,
    tumour_share_percent: float | None = None,
    brain_in_series_only: bool = False,
    regions: Mapping[str, float] | None = None,
    routing: str | None = None,
    series: str | None = None,
    run: int = 1,
    resend: int = 0,
    other_evidence: Sequence[Dataset] = (),
    qc_failed: Sequence[tuple[str, str]] = (),
    cautions: Sequence[tuple[str, str]] = (),
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with the volume in mL of each segment of ``seg`` (and of the brain).

    Parameters
    ----------
    seg:
        The Segmentation the report refers to (segments numbered 1..n), or None when the model found
        no tumour (then one TID 1501 group of 0 mL per card label). The report copies the patient
        and study attributes of its evidence by the rules of :mod:`node.source_attributes`.
    sources:
        The source images of the segmentation (evidence; the TID 1411 groups' source series).
    volumes_ml:
        Volume of segment ``i + 1`` in millilitres.
    card:
        The model card (name and version as the algorithm identification; labels when ``seg`` is None).
    brain_volume_ml, tumour_share_percent:
        The brain mask's volume and the whole tumour's share of it; a Brain group holds them when
        ``brain_volume_ml`` is given.
    brain_in_series_only:
        The series is a slab through the brain (node/qc.py, QC figure ``brain_slab``): the brain group
        names its figures as those of the brain within the series' coverage.
    regions:
        Composite region (a :data:`REGIONS` key) -> volume in mL; one TID 1501 group each.
    routing:
        Which model ran and why, recorded as an Algorithm Parameters item (TID 4019).
    series:
        Which series served each of the model's inputs (:func:`node.pipeline.series_used`), another
        Algorithm Parameters item: a reader sees in the viewer whether the right series were used.
    run:
        Which analysis of the study this is (:func:`node.seg.run_series`: a re-run's series number
        and description say so).
    resend:
        How many earlier results of this run were queued for sending (:func:`node.seg.run_series`: a
        retried done job's series number and description say so).
    other_evidence:
        The images of the model's other input series (a ``brats_regions`` model's T1, T1GD and T2),
        listed in the evidence after ``sources``: the volumes were measured from them too.
    qc_failed:
        The QC rules the result failed, as (name, message): the report says it was held and released
        after review and names them (see the module docstring). Empty: the result passed.
    cautions:
        The QC cautions raised, as (name, message): one text item each under Qualitative Evaluations.
    """
    parameters = [f"routing: {routing}"] if routing else []
    if series:
        parameters.append(f"series: {series}")
    algorithm = hd.sr.AlgorithmIdentification(
        name=str(card.get("name", "segnode model"))[:64],
        version=str(card.get("version", "unknown"))[:64],
        parameters=parameters or None,
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(), name="segnode", model_name=str(card.get("name", ""))[:64] or None
        ),
    )
    groups: list[Any] = []
    for number, volume in enumerate(volumes_ml, start=1):
        if seg is None:
            groups.append(_unreferenced_group(number, volume, card, algorithm))
            continue
        segment = seg.SegmentSequence[number - 1]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"segment {number}: {segment.SegmentLabel}"[:64]
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
                ),
                finding_type=hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0]),
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=round(float(volume), 3),
                        unit=MILLILITRE,
                        algorithm_id=algorithm,
                    )
                ],
            )
        )
    for key, volume in (regions or {}).items():
        finding, identifier = REGIONS[key]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier[:64]),
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=[_volume(volume, algorithm)],
            )
        )
    if brain_volume_ml is not None:
        groups.append(_brain_group(brain_volume_ml, tumour_share_percent, algorithm, brain_in_series_only))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=MR_PROCEDURE,
        imaging_measurements=groups,
    )
    if qc_failed or cautions:
        report[0].ContentSequence.append(_qualitative_evaluations(qc_failed, cautions))
    series_number, description = run_series(
        SR_SERIES_NUMBER, SR_SERIES_DESCRIPTION, run, resend=resend, qc_failed=bool(qc_failed)
    )
    private = any(
        element.keyword == "CodingSchemeDesignator" and element.value == PRIVATE_SCHEME
        for element in report[0].iterall()
    )
    return hd.sr.Comprehensive3DSR(
        # The report takes its patient and study attributes, and its acquisition equipment, from the
        # first evidence: the cleaned sources (the scanner), then the SEG (built from the same
        # cleaned attributes). With the SEG first the SR named segnode as the acquiring equipment.
        # The other input series follow (highdicom reads only their UIDs).
        evidence=[
            *clean_sources(sources, what="SR", extra_texts=[*parameters, *card_texts(card)]),
            *other_evidence,
            *([seg] if seg is not None else []),
        ],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="segnode",
        series_description=description,
        is_complete=True,
        coding_schemes=[private_scheme_item()] if private else None,
    )


def private_scheme_item() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification item of :data:`PRIVATE_SCHEME` (a new one per report)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="segnode private concepts (brain tumour volumes)",
        responsible_organization="segnode brain-tumour segmentation node (its manufacturer)",
    )


def _qualitative_evaluations(
    failed: Sequence[tuple[str, str]], cautions: Sequence[tuple[str, str]]
) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations container: when QC rules failed, that the result was released
    after review and each failed rule's name and message; then each caution's name and message."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    texts = [(QC_RELEASED, QC_RELEASED_TEXT)] if failed else []
    texts += [(QC_FAILED_RULE, f"failed check {name}: {message}") for name, message in failed]
    texts += [(QC_CAUTION, f"caution {name}: {message}") for name, message in cautions]
    items = [
        hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for name, value in texts
    ]
    container.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    return container


def _volume(
    value_ml: float, algorithm: hd.sr.AlgorithmIdentification, name: hd.sr.CodedConcept | None = None
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name or codes.SCT.Volume,
        value=round(float(value_ml), 3),
        unit=MILLILITRE,
        algorithm_id=algorithm,
    )


def _unreferenced_group(
    number: int, volume_ml: float, card: Mapping[str, Any], algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for card label ``number`` when there is no SEG segment to reference."""
    from node.seg import segment_descriptions

    description = segment_descriptions(card)[number - 1]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"segment {number}: {description.SegmentLabel} (none found)"[:64]
        ),
        finding_type=hd.sr.CodedConcept.from_dataset(description.SegmentedPropertyTypeCodeSequence[0]),
        algorithm_id=algorithm,
        measurements=[_volume(volume_ml, algorithm)],
    )


def _brain_group(
    brain_ml: float,
    share_percent: float | None,
    algorithm: hd.sr.AlgorithmIdentification,
    in_series_only: bool = False,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: the brain mask's volume and the whole tumour's share of it (``in_series_only``:
    of the part of the brain a slab holds, named so)."""
    measurements = [_volume(brain_ml, algorithm, BRAIN_VOLUME_IN_SERIES if in_series_only else None)]
    if share_percent is not None:
        measurements.append(
            hd.sr.Measurement(
                name=TUMOUR_SHARE_OF_BRAIN_IN_SERIES if in_series_only else TUMOUR_SHARE_OF_BRAIN,
                value=round(float(share_percent), 3),
                unit=PERCENT,
                algorithm_id=algorithm,
            )
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=BRAIN_IN_SERIES_TEXT if in_series_only else "brain"
        ),
        finding_type=BRAIN,
        algorithm_id=algorithm,
        measurements=measurements,
    )
