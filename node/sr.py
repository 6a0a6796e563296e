"""Structured report of the tumour volumes: TID 1500 Measurement Report in a Comprehensive 3D SR.

One Volumetric ROI Measurements group (TID 1411) per SEG segment, each referencing that segment of
the SEG (ReferencedSegment, with the source series) and holding one measurement: SCT 118565006
"Volume" in UCUM "mL", measured by the model (algorithm identification TID 4019).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.source_attributes import clean_sources

logger = logging.getLogger(__name__)

SR_SERIES_DESCRIPTION = "AI TUMOUR VOLUME (segnode, not for diagnosis alone)"
SR_SERIES_NUMBER = 9902
MILLILITRE = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
#: SCT 113091000 "Magnetic resonance imaging" as the procedure reported.
MR_PROCEDURE = hd.sr.CodedConcept("113091000", "SCT", "Magnetic resonance imaging")


def build_sr(
    seg: Dataset,
    sources: Sequence[Dataset],
    volumes_ml: Sequence[float],
    card: Mapping[str, Any],
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with the volume in mL of each segment of ``seg``.

    Parameters
    ----------
    seg:
        The Segmentation the report refers to (segments numbered 1..n). The report copies its patient
        and study attributes from it, by the rules of :mod:`node.source_attributes`.
    sources:
        The source images of the segmentation (evidence).
    volumes_ml:
        Volume of segment ``i + 1`` in millilitres.
    card:
        The model card (name and version as the algorithm identification).
    """
    algorithm = hd.sr.AlgorithmIdentification(
        name=str(card.get("name", "segnode model"))[:64], version=str(card.get("version", "unknown"))[:64]
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="segnode", model_name=str(card.get("name", ""))[:64] or None
        ),
    )
    groups = []
    for number, volume in enumerate(volumes_ml, start=1):
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
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=MR_PROCEDURE,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*clean_sources([seg], what="SR"), *sources],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="segnode",
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
    )
