"""The three tissues of a ``brats_regions`` SEG in OHIF, as tests/viewer/test_ohif.py does for the whole
tumour (the same stack, driver and screen checks: tests/helpers/viewer.py).

The node serves the shipped whole-tumour model and the ``brats_regions`` candidate
(models/candidates/segnode-brats-regions-1.2.0, INT8), as an administrator who promotes it has it. A
four-series BraTS training case (FLAIR, T1, T1GD, T2; tests/helpers/regions.py, never the holdout) is
uploaded to Orthanc, Orthanc C-STOREs it to the node, the node routes it to the regions model (brain
extraction, registration onto the FLAIR, inference) and returns a SEG with a segment per tissue and an SR
with each tissue's volume. The viewer is then judged from the page alone:

- the segmentation panel lists the three segments by number and label (edema, non-enhancing/necrotic
  core, enhancing tumour; db/card.py TASK_LABELS), in segment order;
- on the FLAIR slice where the smallest of the three tissues is largest, the screenshot shows that slice
  where expected, and pixels of each segment's colour (as the SEG recommends it; three distinct colours)
  lie inside that tissue's outline in the SEG as stored in Orthanc, and cover most of it.

The SR's volume of each segment (the TID 1411 group that references it) is checked against that
segment's voxels in the SEG; OHIF does not show those volumes (see test_ohif.py), so the driver skips
the SR part here. Screenshots are left in the test's tmp directory (printed).

The case is cropped to its head with rows and columns a multiple of 8, as scanners' matrices mostly are:
Orthanc 1.10 (DicomImageInformation) refuses to decode a 1-bit image whose Columns are not a multiple of 8
("Bad number of columns for a black-and-white image"), so its DICOMweb plugin answers 400 for every frame
of such a BINARY SEG, and OHIF stays at "Loading SEG..." (deploy/viewer/README.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from pydicom.dataset import Dataset

from converters.dicom_writer import write_study
from db import job_queue
from db.card import TASK_LABELS
from deploy.viewer import stack
from node.service import NodeService
from tests.helpers.peers import missing
from tests.helpers.regions import BRATS, brats_case
from tests.helpers.viewer import (
    check_drawn,
    need_viewer_parts,
    run_driver,
    screenshots,
    seg_masks,
    segment_colours,
    stored,
    voxel_ml,
)

#: A training case of ../shared/data/train/brats with all three tissues large enough to see on one slice
#: (the candidate's validation case; the default of tests/helpers/regions.py).
CASE = "BraTS2021_00005"
#: Rows and columns a multiple of this (see the module docstring).
MATRIX_MULTIPLE = 8
LABELS = [str(label["name"]) for label in TASK_LABELS["brats_regions"]]
#: DCM 121191 "Referenced Segment", SCT 118565006 "Volume": the SR's measurement of a segment.
REFERENCED_SEGMENT, VOLUME = "121191", "118565006"


class RegionsStudy(NamedTuple):
    orthanc: stack.OrthancWeb
    viewer: stack.ViewerServer
    node: NodeService
    study_uid: str
    study_id: str


@pytest.fixture()
def regions_stack(tmp_path: Path) -> Iterator[RegionsStudy]:
    orthanc_program = need_viewer_parts()
    if not (BRATS / CASE).is_dir():
        missing(f"no BraTS training case at {BRATS / CASE}")
    case = brats_case(CASE, multiple=MATRIX_MULTIPLE)
    with stack.running_stack(
        tmp_path / "stack",
        orthanc_program=orthanc_program,
        models=(stack.DEFAULT_MODEL, stack.REGIONS_MODEL),
    ) as (orthanc, viewer, node):
        uid, study_id = stack.push_study(orthanc, write_study(case, tmp_path / "study"))
        yield RegionsStudy(orthanc, viewer, node, uid, study_id)


def _segment_volumes(sr: Dataset) -> dict[int, float]:
    """Segment number -> the SR's volume (mL) of the measurement group that references that segment."""
    out: dict[int, float] = {}

    def walk(items: list[Dataset]) -> None:
        for item in items:
            children = list(item.get("ContentSequence", []))
            concepts = {str(c.ConceptNameCodeSequence[0].CodeValue): c for c in children}
            if REFERENCED_SEGMENT in concepts and VOLUME in concepts:
                number = int(concepts[REFERENCED_SEGMENT].ReferencedSOPSequence[0].ReferencedSegmentNumber)
                out[number] = float(concepts[VOLUME].MeasuredValueSequence[0].NumericValue)
            walk(children)

    walk(list(sr.ContentSequence))
    return out


@pytest.mark.slow
def test_ohif_shows_the_three_tissues_each_inside_its_own_outline(
    regions_stack: RegionsStudy, tmp_path: Path
) -> None:
    orthanc, viewer, node, uid, study_id = regions_stack
    [job] = [j for j in job_queue.list_jobs(node.sf) if j.study_instance_uid == uid]
    assert job.status == "done", job.reason
    assert job.result["routing"]["task"] == "brats_regions", job.result["routing"]
    series = orthanc.series_by_modality(study_id)
    [seg_series], [sr_series] = series["SEG"], series["SR"]
    seg = stored(orthanc, seg_series["Instances"][0])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == LABELS
    assert {s.SegmentAlgorithmName for s in seg.SegmentSequence} == {"segnode-brats-regions"}
    masks = seg_masks(seg)
    assert sorted(masks) == [1, 2, 3], sorted(masks)
    colours = segment_colours(seg)
    for (a, rgb_a), (b, rgb_b) in itertools.combinations(colours.items(), 2):
        assert np.abs(np.subtract(rgb_a, rgb_b)).max() > 100, f"segments {a} and {b}: {rgb_a} ~ {rgb_b}"

    # The reference series (FLAIR) is what the SEG's frames derive from.
    reference = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    [flair_series] = [s for s in series["MR"] if s["MainDicomTags"]["SeriesInstanceUID"] == reference]
    flair = {str(ds.SOPInstanceUID): ds for ds in (stored(orthanc, i) for i in flair_series["Instances"])}
    assert "FLAIR" in next(iter(flair.values())).SeriesDescription.upper()
    # The slice where every tissue is present and the smallest of them is largest.
    shared = set(masks[1]) & set(masks[2]) & set(masks[3])
    assert shared, "no FLAIR slice holds all three tissues"
    chosen = max(shared, key=lambda u: min(int(masks[n][u].sum()) for n in (1, 2, 3)))
    instance = int(flair[chosen].InstanceNumber)

    report = run_driver(viewer.url, uid, tmp_path / "browser", [instance], sr=False)
    # The segmentation panel lists the three segments, each by its number and label, in segment order.
    panel = report["segmentationPanel"].splitlines()
    assert seg.SeriesDescription in panel, panel
    assert [line for line in panel if line in LABELS] == LABELS, panel
    assert [panel[panel.index(label) - 1] for label in LABELS] == ["1", "2", "3"], panel

    shot = screenshots(report)[instance]
    image = flair[chosen].pixel_array
    for number, label in enumerate(LABELS, start=1):
        check_drawn(shot, image, masks[number][chosen], colours[number], f"slice {instance}, {label}")

    # SR: each tissue's volume, against that segment's voxels in the SEG.
    volumes = _segment_volumes(stored(orthanc, sr_series["Instances"][0]))
    seg_ml = {n: sum(int(m.sum()) for m in masks[n].values()) * voxel_ml(seg) for n in masks}
    print(f"tissue volumes (mL): SR {volumes}, SEG {seg_ml}")
    assert sorted(volumes) == [1, 2, 3], volumes
    for number, ml in seg_ml.items():
        assert volumes[number] == pytest.approx(ml, rel=0.01), (number, volumes[number], ml)
