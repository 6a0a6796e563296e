"""The QC rules of node/qc.py on real arrays: ellipsoid brains of known volume, tumours inside and
outside them, the synthetic phantom, real head series with skull (data/dicom) and noise; the [qc]
config; the pipeline's qc stage on an assembled study; the SR's brain figures and the SR without SEG."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from converters.dicom_series import load_series_folder
from converters.dicom_writer import write_study
from converters.reorient import ras_to_volume
from converters.synthetic import make_synthetic_case
from db.card import TASK_LABELS
from node import qc
from node.cli.commands import _result_rows
from node.config import QCSettings, load_settings
from node.exceptions import ConfigError
from node.pipeline import assemble_coregistered, load_chosen, quality_check
from node.seg import build_seg
from node.selection import SeriesSelector, scan_series
from node.sr import (
    BRAIN,
    BRAIN_VOLUME_IN_SERIES,
    QC_CAUTION,
    TUMOUR_SHARE_OF_BRAIN,
    TUMOUR_SHARE_OF_BRAIN_IN_SERIES,
    build_sr,
)
from tests.helpers.peers import DCIODVFY_PRIVATE_SCHEME, REPO, dciodvfy_problems

DATA = REPO.parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")

#: Voxels of 2 mm: 8 uL each.
SPACING_MM = 2.0
VOXEL_ML = SPACING_MM**3 / 1000.0
GRID = (100, 110, 90)  # 200 x 220 x 180 mm


def ellipsoid(
    semi_axes_mm: tuple[float, float, float], centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> npt.NDArray[np.bool_]:
    """An ellipsoid on :data:`GRID` (2 mm voxels, origin at the grid centre)."""
    axes = [(np.arange(n) - (n - 1) / 2) * SPACING_MM for n in GRID]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    (a, b, c), (cx, cy, cz) = semi_axes_mm, centre_mm
    return np.asarray(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0)


def ellipsoid_ml(semi_axes_mm: tuple[float, float, float]) -> float:
    a, b, c = semi_axes_mm
    return 4.0 / 3.0 * np.pi * a * b * c / 1000.0


BRAIN_AXES = (68.0, 85.0, 60.0)  # ~1453 mL, an adult brain


@pytest.fixture(scope="module")
def brain() -> npt.NDArray[np.bool_]:
    mask = ellipsoid(BRAIN_AXES)
    assert mask.sum() * VOXEL_ML == pytest.approx(ellipsoid_ml(BRAIN_AXES), rel=0.01)
    return mask


def labels_of(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    return mask.astype(np.uint8)


# -- single rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slices", "status"), [(3, qc.FAILED), (7, qc.FAILED), (8, qc.PASSED), (155, qc.PASSED)]
)
def test_series_slices(slices: int, status: str) -> None:
    result = qc.rule_series_slices(slices, QCSettings().min_slices)
    assert result.status == status
    assert result.figures == {"slices": slices, "min_slices": 8}
    if status == qc.FAILED:
        assert result.message == f"{slices} slices, fewer than 8"


def test_brain_volume_and_brain_found_on_masks_of_known_volume(brain: npt.NDArray[np.bool_]) -> None:
    settings = QCSettings()
    small = ellipsoid((40.0, 50.0, 35.0))  # ~293 mL
    huge = ellipsoid((90.0, 105.0, 80.0))  # ~3167 mL: a whole head taken for the brain
    cases = [
        (brain, qc.PASSED, qc.PASSED),
        (small, qc.PASSED, qc.FAILED),
        (huge, qc.PASSED, qc.FAILED),
        (np.zeros(GRID, bool), qc.FAILED, qc.FAILED),
    ]
    for mask, found, volume in cases:
        ml = float(mask.sum()) * VOXEL_ML
        assert qc.rule_brain_found(ml).status == found
        result = qc.rule_brain_volume(ml, settings.min_brain_ml, settings.max_brain_ml)
        assert result.status == volume, ml
        assert result.figures["brain_ml"] == pytest.approx(ml, abs=1e-3)
    assert qc.rule_brain_found(0.0).message == "brain extraction found no brain"
    assert "outside 800-2200 mL" in qc.rule_brain_volume(293.0, 800, 2200).message
    # Under the floor the message says whose range it is: a young child's whole brain fails it too, and
    # the figure alone reads like a failed mask.
    assert "qc.min_brain_ml: an adult's brain" in qc.rule_brain_volume(755.0, 800, 2200).message
    assert "adult" not in qc.rule_brain_volume(2500.0, 800, 2200).message
    assert qc.rule_brain_volume(None, 800, 2200).status == qc.NOT_CHECKED


def test_tumour_share_of_brain(brain: npt.NDArray[np.bool_]) -> None:
    brain_ml = float(brain.sum()) * VOXEL_ML
    glioma = ellipsoid((25.0, 25.0, 25.0), centre_mm=(30.0, 10.0, 10.0)) & brain  # ~65 mL
    hemisphere = brain & (np.arange(GRID[0])[:, None, None] >= GRID[0] // 2)
    for tumour, status in [(glioma, qc.PASSED), (hemisphere, qc.FAILED), (brain, qc.FAILED)]:
        tumour_ml = float(tumour.sum()) * VOXEL_ML
        result = qc.rule_tumour_share_of_brain(tumour_ml, brain_ml, QCSettings().max_tumour_share_percent)
        assert result.status == status
        assert result.figures["share_percent"] == pytest.approx(100 * tumour.sum() / brain.sum(), abs=1e-3)
    assert 4.0 < 100 * glioma.sum() / brain.sum() < 5.0


def test_restrict_to_brain_removes_exactly_the_voxels_outside(brain: npt.NDArray[np.bool_]) -> None:
    # A tumour straddling the brain's surface, and a blob in the "scalp".
    tumour = ellipsoid((20.0, 20.0, 20.0), centre_mm=(60.0, 0.0, 0.0)) | ellipsoid(
        (6.0, 6.0, 6.0), (0, 0, 75.0)
    )
    labels = labels_of(tumour)
    labels[tumour & brain & (np.arange(GRID[2]) < 45)[None, None, :]] = 2  # a second label, inside
    kept, removed = qc.restrict_to_brain(labels, brain)
    assert removed == int((tumour & ~brain).sum()) > 0
    assert not (kept[~brain] > 0).any()
    np.testing.assert_array_equal(kept[brain], labels[brain])  # inside untouched, labels kept
    assert labels[~brain].any()  # the input is not modified
    same, none = qc.restrict_to_brain(labels, None)
    assert same is labels and none == 0
    with pytest.raises(ValueError, match="not on the label grid"):
        qc.restrict_to_brain(labels, brain[:-1])


def test_tumour_inside_brain_fails_when_most_was_outside(brain: npt.NDArray[np.bool_]) -> None:
    settings = QCSettings()
    for centre, status in [((45.0, 0.0, 0.0), qc.PASSED), ((80.0, 0.0, 0.0), qc.FAILED)]:
        tumour = ellipsoid((20.0, 20.0, 20.0), centre_mm=centre)
        kept, removed = qc.restrict_to_brain(labels_of(tumour), brain)
        report = qc.check(kept, brain, VOXEL_ML, 90, settings, removed_voxels=removed)
        rule = report.by_name("tumour_inside_brain")
        assert rule.status == status
        assert rule.figures["removed_voxels"] == removed == int((tumour & ~brain).sum())
        assert rule.figures["removed_percent"] == pytest.approx(100 * removed / tumour.sum(), abs=1e-3)
        assert report.figures["removed_outside_brain_voxels"] == removed


# -- the head mask: real heads, the phantom, noise -------------------------------------------------------


def _real_series() -> list[Path]:
    """Real T1 series with skull. The GE series is left out: its pixel data are not a head image
    (vertical stripes in every slice, straight from the source files), see node/README.md "Checks"."""
    folders = [DATA / "dicom" / n for n in ("philips_t1_sag3d_mprage_healthy", "siemens_t1_fl2d_sag_healthy")]
    return [f for f in folders if f.is_dir()]


@pytest.mark.parametrize("folder", _real_series(), ids=lambda p: p.name)
def test_head_mask_of_a_real_head_with_skull(folder: Path) -> None:
    volume = load_series_folder(folder)
    head = qc.head_mask(volume.array)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    head_ml = float(head.sum()) * voxel_ml
    # An adult head with skull, scalp and some neck: well above any brain, well below the field of view.
    assert 2000.0 < head_ml < 6000.0, head_ml
    assert head_ml < 0.6 * head.size * voxel_ml
    assert not head[:, :3, :3].any() and not head[:, -3:, -3:].any()  # the corners are air
    result = qc.rule_head_found(head_ml, QCSettings().min_head_ml)
    assert result.status == qc.PASSED


def test_head_mask_holds_the_brain_of_a_skull_stripped_phantom() -> None:
    """The share-of-head rule is a lower bound of the share of brain because the brain lies in the head
    mask: on the skull-stripped phantom (dark ventricles included) all of it does."""
    case = make_synthetic_case(21, (64, 64, 40))
    image = np.transpose(case.images["FLAIR"], (2, 1, 0))  # (slice, row, column)
    brain = image > 0
    head = qc.head_mask(image)
    assert (head & brain).sum() >= 0.99 * brain.sum()
    assert (head & ~brain).sum() <= 0.01 * brain.sum()
    assert case.label is not None
    tumour = np.transpose(case.label, (2, 1, 0)) > 0
    share_head = 100 * tumour.sum() / head.sum()
    share_brain = 100 * tumour.sum() / brain.sum()
    assert share_head <= share_brain + 0.2


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "rician", "blank", "constant"])
def test_no_head_in_noise_or_a_blank_series(kind: str) -> None:
    rng = np.random.default_rng(3)
    shape = (20, 256, 256)
    image = {
        "gaussian": lambda: rng.normal(500.0, 100.0, shape),
        "uniform": lambda: rng.uniform(0.0, 4095.0, shape),
        "rician": lambda: np.hypot(rng.normal(0, 50, shape), rng.normal(0, 50, shape)),
        "blank": lambda: np.zeros(shape),
        "constant": lambda: np.full(shape, 700.0),
    }[kind]().astype(np.float32)
    head = qc.head_mask(image)
    head_ml = float(head.sum()) * 1.0 * 1.0 * 5.0 / 1000.0  # 1 x 1 mm pixels, 5 mm slices
    result = qc.rule_head_found(head_ml, QCSettings().min_head_ml)
    assert result.status == qc.FAILED, head_ml
    assert "a blank or noise image" in result.message


def test_tumour_share_of_head_catches_the_whole_brain_outlined() -> None:
    """A whole-head image where the model outlined the brain: fails without any brain mask."""
    volume = load_series_folder(_real_series()[0]) if _real_series() else pytest.skip("no real series")
    head = qc.head_mask(volume.array)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    head_ml = float(head.sum()) * voxel_ml
    # Stand-ins for the brain, since the series has no brain mask: a ~1400 mL and a ~60 mL ball,
    # each scaled to this head's size.
    settings = QCSettings()
    whole_brain = qc.rule_tumour_share_of_head(1400.0, head_ml, settings.max_tumour_share_percent)
    lesion = qc.rule_tumour_share_of_head(60.0, head_ml, settings.max_tumour_share_percent)
    assert whole_brain.status == qc.FAILED and lesion.status == qc.PASSED
    assert qc.rule_tumour_share_of_head(60.0, None, 30.0).status == qc.NOT_CHECKED


# -- check(): the report -----------------------------------------------------------------------------------


def test_check_without_a_brain_mask_reports_the_brain_rules_not_checked(brain: npt.NDArray[np.bool_]) -> None:
    tumour = ellipsoid((25.0, 25.0, 25.0), centre_mm=(30.0, 10.0, 10.0))
    head = ellipsoid((85.0, 100.0, 85.0))
    report = qc.check(labels_of(tumour), None, VOXEL_ML, 4, QCSettings(), head=head)
    status = {r.name: r.status for r in report.rules}
    assert status == {
        "series_slices": qc.FAILED,
        "head_found": qc.PASSED,
        "tumour_share_of_head": qc.PASSED,
        "brain_found": qc.NOT_CHECKED,
        "brain_volume": qc.NOT_CHECKED,
        "tumour_share_of_brain": qc.NOT_CHECKED,
        "tumour_inside_brain": qc.NOT_CHECKED,
        "tumour_within_coverage": qc.NOT_CHECKED,
    }
    assert not report.passed and [r.name for r in report.failed] == ["series_slices"]
    assert report.reason() == "qc series_slices: 4 slices, fewer than 8"
    assert (
        report.figures["brain_volume_ml"] is None and report.figures["tumour_share_of_brain_percent"] is None
    )
    assert json.loads(json.dumps(report.as_dict()))["rules"][0]["status"] == qc.FAILED


def test_check_without_a_head_reports_only_that() -> None:
    """Noise: the head rule fails; the share of a head that is not there is not checked."""
    rng = np.random.default_rng(1)
    image = rng.normal(500.0, 100.0, (16, 64, 64)).astype(np.float32)
    labels = (image > 600).astype(np.uint8)
    report = qc.check(labels, None, 0.144, 16, QCSettings(), head=qc.head_mask(image))
    assert [r.name for r in report.failed] == ["head_found"]
    assert report.by_name("tumour_share_of_head").status == qc.NOT_CHECKED


def test_check_with_a_brain_mask(brain: npt.NDArray[np.bool_]) -> None:
    tumour = ellipsoid((25.0, 25.0, 25.0), centre_mm=(30.0, 10.0, 10.0)) & brain
    head = ellipsoid((85.0, 100.0, 85.0))
    report = qc.check(labels_of(tumour), brain, VOXEL_ML, 90, QCSettings(), head=head)
    assert report.passed, report.reason()
    assert all(r.status == qc.PASSED for r in report.rules)
    assert report.figures["brain_volume_ml"] == pytest.approx(brain.sum() * VOXEL_ML, abs=1e-3)
    assert report.figures["tumour_volume_ml"] == pytest.approx(tumour.sum() * VOXEL_ML, abs=1e-3)
    assert report.figures["tumour_share_of_brain_percent"] == pytest.approx(
        100 * tumour.sum() / brain.sum(), abs=1e-3
    )
    # No brain found: every rule about the brain fails at once, with its figures.
    empty = qc.check(labels_of(tumour), np.zeros(GRID, bool), VOXEL_ML, 90, QCSettings(), head=head)
    assert [r.name for r in empty.failed] == ["brain_found", "brain_volume"]
    assert empty.by_name("tumour_share_of_brain").status == qc.NOT_CHECKED


# -- cautions ------------------------------------------------------------------------------------------------


def test_a_large_tumour_is_sent_with_a_caution_and_a_slab_gets_none(brain: npt.NDArray[np.bool_]) -> None:
    """Over 15 % of the brain (the shipped models' training tumours reach 14 %) the result carries the
    large_tumour caution: it does not hold the study, it survives a rule added later, and it reaches the
    job's result. Under 15 %, with the caution set to 0, and on a slab through the brain: none."""
    settings = QCSettings()
    glioma = ellipsoid((25.0, 25.0, 25.0), centre_mm=(30.0, 10.0, 10.0)) & brain  # ~4.5 %
    large = ellipsoid((45.0, 50.0, 40.0), centre_mm=(20.0, 10.0, 10.0)) & brain
    hemisphere = brain & (np.arange(GRID[0])[:, None, None] >= GRID[0] // 2)  # ~50 %
    share = 100 * large.sum() / brain.sum()
    assert 15.0 < share < 30.0, share
    assert qc.check(labels_of(glioma), brain, VOXEL_ML, 90, settings).cautions == []
    report = qc.check(labels_of(large), brain, VOXEL_ML, 90, settings)
    assert report.passed, report.reason()  # sent
    [caution] = report.cautions
    assert (caution.name, caution.status) == ("large_tumour", qc.CAUTION)
    assert caution.figures["share_percent"] == pytest.approx(share, abs=1e-3)
    assert caution.message.startswith(
        f"the whole tumour ({large.sum() * VOXEL_ML:.1f} mL) is {share:.1f} % of the brain, over 15 %"
    )
    assert caution.message.endswith("take the volume as a lower bound")
    kept = qc.with_rule(report, qc.rule_whole_tumour_agreement(1.0, None, None, settings, "n/a"), {})
    assert kept.cautions == report.cautions
    stored = json.loads(json.dumps(report.as_dict()))
    assert [c["name"] for c in stored["cautions"]] == ["large_tumour"]
    rows = dict(_result_rows({"qc": stored}))
    assert rows["qc caution large_tumour"] == caution.message
    # Held for its share, and cautioned too (the SR of a released result says both).
    held = qc.check(labels_of(hemisphere), brain, VOXEL_ML, 90, settings)
    assert held.failed and [c.name for c in held.cautions] == ["large_tumour"]
    off = QCSettings(caution_tumour_share_percent=0.0)
    assert qc.check(labels_of(large), brain, VOXEL_ML, 90, off).cautions == []
    # A slab of 48 mm through the brain: its share of the brain within the series says nothing of the
    # whole brain.
    slab = qc.check(labels_of(large[SLAB]), brain[SLAB], VOXEL_ML, 24, settings, spacing_mm=(2.0, 2.0, 2.0))
    assert slab.figures["brain_slab"] is True and slab.cautions == []
    assert 100 * large[SLAB].sum() / brain[SLAB].sum() > 15.0  # a caution but for the slab


def test_without_a_brain_mask_the_caution_judges_the_head_of_a_whole_height_series() -> None:
    """No brain mask: a tumour over 15 % of the imaged head is over 15 % of the brain inside it; judged
    only where the series covers a whole brain's height (120 mm)."""
    head = ellipsoid((85.0, 100.0, 85.0))  # ~3 L
    large = ellipsoid((55.0, 60.0, 50.0), centre_mm=(10.0, 10.0, 10.0))
    share = 100 * large.sum() / head.sum()
    assert 15.0 < share < 30.0, share
    spacing = (2.0, 2.0, 2.0)
    report = qc.check(labels_of(large), None, VOXEL_ML, 90, QCSettings(), head=head, spacing_mm=spacing)
    assert report.passed, report.reason()
    [caution] = report.cautions
    assert f"is {share:.1f} % of the imaged head, so more of the brain, over 15 %" in caution.message
    part = slice(20, 70)  # 100 mm of slices
    short = qc.check(
        labels_of(large[part]), None, VOXEL_ML, 50, QCSettings(), head=head[part], spacing_mm=spacing
    )
    assert short.cautions == [] and 100 * large[part].sum() / head[part].sum() > 15.0


def test_a_small_tumour_is_sent_with_a_caution_to_check_it_against_the_images(
    brain: npt.NDArray[np.bool_],
) -> None:
    """Under 5 mL (brains without tumour came back with up to 4 mL of false tumour through the node) the
    result carries the small_tumour caution, with its pieces counted; none for 0 mL (the SR of 0 mL
    says it), none at 5 mL and over, none with the caution set to 0."""
    settings = QCSettings()
    speck = ellipsoid((6.0, 6.0, 6.0), centre_mm=(30.0, 10.0, 10.0)) & brain  # ~0.9 mL
    other = ellipsoid((4.0, 4.0, 4.0), centre_mm=(-30.0, -20.0, 0.0)) & brain  # ~0.27 mL, apart
    labels = labels_of(speck | other)
    ml = float(labels.sum()) * VOXEL_ML
    report = qc.check(labels, brain, VOXEL_ML, 90, settings)
    assert report.passed, report.reason()
    [caution] = report.cautions
    assert (caution.name, caution.status, caution.figures["pieces"]) == ("small_tumour", qc.CAUTION, 2)
    assert caution.message.startswith(f"the whole tumour is {ml:.2f} mL in 2 pieces, under 5 mL: ")
    assert caution.message.endswith("check it against the images before reading it as a tumour")
    assert qc.check(labels_of(np.zeros(GRID, bool)), brain, VOXEL_ML, 90, settings).cautions == []
    five = ellipsoid((11.0, 11.0, 11.0), centre_mm=(30.0, 10.0, 10.0)) & brain  # ~5.6 mL
    assert float(five.sum()) * VOXEL_ML >= 5.0
    assert qc.check(labels_of(five), brain, VOXEL_ML, 90, settings).cautions == []
    off = QCSettings(caution_small_tumour_ml=0.0)
    assert qc.check(labels, brain, VOXEL_ML, 90, off).cautions == []
    one = qc.caution_small_tumour(1.0, 1, 5.0)
    assert one is not None and "is 1.00 mL in 1 piece, under 5 mL" in one.message


# -- a series that covers part of the brain -----------------------------------------------------------------

#: A slab of 24 slices of 2 mm (48 mm, slice centres at -23..23 mm) through the middle of :data:`GRID`;
#: axis 0 is the slice normal.
SLAB = slice(38, 62)


def test_a_cut_brain_under_the_minimum_is_not_checked_and_records_coverage(
    brain: npt.NDArray[np.bool_],
) -> None:
    """A targeted slab holding the whole tumour: the brain it holds is under 800 mL, which is the series'
    field of view, not a failed mask: brain_volume is not checked, the study passes and the figures say
    how far the series reaches."""
    cut = brain[SLAB]
    tumour = (ellipsoid((20.0, 20.0, 20.0), centre_mm=(0.0, 10.0, 10.0)) & brain)[SLAB]
    brain_ml = float(cut.sum()) * VOXEL_ML
    assert brain_ml < QCSettings().min_brain_ml
    assert qc.cut_faces(cut) == [(0, 0), (0, 1)] and qc.cut_faces(brain) == []
    report = qc.check(labels_of(tumour), cut, VOXEL_ML, 24, QCSettings(), spacing_mm=(2.0, 2.0, 2.0))
    assert report.passed, report.reason()
    rule = report.by_name("brain_volume")
    assert rule.status == qc.NOT_CHECKED
    assert "the series is a slab through the brain (covers 48 mm" in rule.message
    assert rule.figures["brain_cut"] is True and rule.figures["coverage_mm"] == 48.0
    assert report.by_name("tumour_within_coverage").status == qc.PASSED
    assert report.figures["coverage_mm"] == 48.0 and report.figures["brain_cut"] is True
    # The upper bound still holds: a "brain" of 2.3 L in the slab is a wrong mask.
    assert qc.rule_brain_volume(2300.0, 800.0, 2200.0, cut=True, coverage_mm=48.0).status == qc.FAILED
    # A series of a whole brain's height keeps the lower bound where its mask reaches an edge (a clinical
    # axial series ending at the skull base, the brainstem on its last slice): a small brain there is a
    # failed mask.
    thick = qc.check(labels_of(tumour), cut, VOXEL_ML, 24, QCSettings(), spacing_mm=(6.0, 2.0, 2.0))
    assert thick.figures["coverage_mm"] == 144.0 and thick.figures["brain_cut"] is True
    assert thick.by_name("brain_volume").status == qc.FAILED
    # A whole brain keeps its figures: not cut, the series' coverage recorded.
    whole = qc.check(labels_of(brain & ellipsoid((20.0, 20.0, 20.0))), brain, VOXEL_ML, 100, QCSettings(),
                     spacing_mm=(2.0, 2.0, 2.0))  # fmt: skip
    assert whole.figures["brain_cut"] is False and whole.figures["coverage_mm"] == 200.0


def test_a_tumour_reaching_the_cut_of_a_partial_series_fails(brain: npt.NDArray[np.bool_]) -> None:
    """A tumour on the slab's last slice, or within 3 mm of it, goes on beyond the series: its volume is
    incomplete and the study is held, however little of it the slab holds there (no allowance on a slab:
    a slab grazing a large tumour's pole has a fraction of a mL at its cut); 7 mm inside, it passes."""
    cut = brain[SLAB]
    # The slab's last slice lies at 23 mm: a tumour of radius 10 mm centred at 30 mm is cut by it (0.48 mL
    # within the margin), one at 11.5 mm ends on the slice at 21 mm (2 mm from the last one: its tip, 4
    # voxels, 0.03 mL), one at 6 mm on the slice at 15 mm.
    for centre_mm, status in [(30.0, qc.FAILED), (11.5, qc.FAILED), (6.0, qc.PASSED)]:
        tumour = (ellipsoid((10.0, 10.0, 10.0), centre_mm=(centre_mm, 0.0, 0.0)) & brain)[SLAB]
        assert tumour.any()
        report = qc.check(labels_of(tumour), cut, VOXEL_ML, 24, QCSettings(), spacing_mm=(2.0, 2.0, 2.0))
        rule = report.by_name("tumour_within_coverage")
        assert rule.status == status, (centre_mm, rule.message)
        assert report.by_name("brain_volume").status == qc.NOT_CHECKED
        if status == qc.FAILED:
            assert [r.name for r in report.failed] == ["tumour_within_coverage"]
            assert "tumour reaches the edge of the series' coverage" in report.reason()
            assert "its volume is incomplete" in report.reason()
            assert "last slice" in rule.message
            # No allowance at a slab's cut: the message names none ("over 0 mL" read like a setting
            # left at zero by mistake).
            assert ", over " not in rule.message and rule.figures["max_edge_ml"] == 0.0, rule.message
    # A tumour touching the edge of a series that covers the whole brain is not there: restricted to
    # the brain, which keeps off every face.
    assert qc.edge_voxels(labels_of(brain), qc.cut_faces(brain), (2.0, 2.0, 2.0)) == 0


def test_a_few_tumour_voxels_at_the_skull_base_cut_do_not_hold_the_study(
    brain: npt.NDArray[np.bool_],
) -> None:
    """A clinical axial series ending at the skull base (the brain mask on its last slice, the lowest,
    120+ mm covered) with a few voxels of bright inflow there called tumour: under max_tumour_at_cut_ml
    (0.5 mL) it passes, with the figure in its message; a tumour cut there (over it) is still held."""
    down = (0.0, 0.0, -1.0)  # LPS: each slice lower than the one before, the last at the skull base
    base = brain[:70]  # the brain cut on its last slice; 70 x 2 mm = 140 mm
    assert (0, 1) in qc.cut_faces(base)
    tumour = (ellipsoid((15.0, 15.0, 15.0), centre_mm=(-40.0, 10.0, 0.0)) & brain)[:70]
    last = np.flatnonzero(base[-1].ravel())
    for spots, status in [(20, qc.PASSED), (62, qc.PASSED), (63, qc.FAILED), (400, qc.FAILED)]:
        labels = labels_of(tumour)
        labels[-1].ravel()[last[:spots]] = 1  # 8 uL each: 0.16, 0.496, 0.504 and 3.2 mL
        report = qc.check(
            labels, base, VOXEL_ML, 70, QCSettings(), spacing_mm=(2.0, 2.0, 2.0), slice_direction=down
        )
        rule = report.by_name("tumour_within_coverage")
        assert rule.status == status, (spots, rule.message)
        assert rule.figures["edge_ml"] == pytest.approx(spots * VOXEL_ML, abs=1e-3)
        assert rule.figures["max_edge_ml"] == 0.5
        assert f"{spots * VOXEL_ML:.2f} mL" in rule.message
        assert report.passed == (status == qc.PASSED), report.reason()
        if status == qc.FAILED:
            assert "over the 0.5 mL allowed at a skull-base cut" in rule.message, rule.message
    # The limit is the [qc] setting's.
    strict = qc.check(labels_of(tumour) | (np.arange(70) == 69)[:, None, None] & base, base, VOXEL_ML, 70,
                      QCSettings(max_tumour_at_cut_ml=0.0), spacing_mm=(2.0, 2.0, 2.0),
                      slice_direction=down)  # fmt: skip
    assert strict.by_name("tumour_within_coverage").status == qc.FAILED
    # The allowance is for an axial whole-height series' skull-base slice only: the same 20 voxels
    # (0.16 mL) at that slice when it is the top one (the vertex), when the series is sagittal or coronal
    # (140 mm across is no brain's length: a frontal tumour may go on beyond it) or of unknown direction,
    # or when the brain is cut at both ends, hold the study.
    inflow = labels_of(tumour)
    inflow[-1].ravel()[last[:20]] = 1
    both_ends = brain[20:80]  # 120 mm, the brain cut at both ends
    assert qc.cut_faces(both_ends)[:2] == [(0, 0), (0, 1)]
    at_both = np.zeros(both_ends.shape, dtype=np.uint8)
    at_both[-1].ravel()[np.flatnonzero(both_ends[-1].ravel())[:20]] = 1
    for mask, labels, direction in [
        (base, inflow, (0.0, 0.0, 1.0)), (base, inflow, (1.0, 0.0, 0.0)), (base, inflow, (0.0, 1.0, 0.0)),
        (base, inflow, None), (both_ends, at_both, down),
    ]:  # fmt: skip
        report = qc.check(
            labels, mask, VOXEL_ML, mask.shape[0], QCSettings(), spacing_mm=(2.0, 2.0, 2.0),
            slice_direction=direction,
        )  # fmt: skip
        rule = report.by_name("tumour_within_coverage")
        assert rule.status == qc.FAILED and rule.figures["max_edge_ml"] == 0.0, (direction, rule.message)
    # Nor at the cut of a 100 mm slab, or where the field of view cuts the brain at its last row.
    slab = brain[20:70]
    edge_rows = np.zeros(brain.shape[1], dtype=bool)
    edge_rows[: int(np.flatnonzero(brain.any(axis=(0, 2))).mean())] = True
    row_cut = brain[:, edge_rows]  # every slice kept (a whole-height series), the brain cut at its last row
    assert [face for face in qc.cut_faces(row_cut) if face[0] == 0] == []
    for mask in (slab, row_cut):
        labels = np.zeros(mask.shape, dtype=np.uint8)
        face = qc.cut_faces(mask)[-1]
        index: list[slice | int] = [slice(None)] * 3
        index[face[0]] = 0 if face[1] == 0 else -1
        plane = np.zeros(mask[tuple(index)].size, dtype=np.uint8)
        plane[np.flatnonzero(mask[tuple(index)])[:20]] = 1
        labels[tuple(index)] = plane.reshape(mask[tuple(index)].shape)
        report = qc.check(
            labels, mask, VOXEL_ML, mask.shape[0], QCSettings(), spacing_mm=(2.0, 2.0, 2.0),
            slice_direction=down,
        )  # fmt: skip
        rule = report.by_name("tumour_within_coverage")
        assert rule.status == qc.FAILED and rule.figures["max_edge_ml"] == 0.0, (mask.shape, rule.message)


def test_a_whole_brain_under_the_minimum_still_fails(brain: npt.NDArray[np.bool_]) -> None:
    """A small brain the series covers whole (no face reached) is a failed mask: brain_volume fails."""
    small = ellipsoid((40.0, 50.0, 35.0))  # ~293 mL
    assert qc.cut_faces(small) == []
    report = qc.check(labels_of(small & ellipsoid((10.0, 10.0, 10.0))), small, VOXEL_ML, 100, QCSettings(),
                      spacing_mm=(2.0, 2.0, 2.0))  # fmt: skip
    assert [r.name for r in report.failed] == ["brain_volume"]
    assert "outside 800-2200 mL" in report.by_name("brain_volume").message
    assert report.by_name("tumour_within_coverage").status == qc.PASSED


# -- config ------------------------------------------------------------------------------------------------


def test_whole_tumour_agreement_limits() -> None:
    """A several-series model's whole tumour against the whole_tumor model's (defaults: Dice 0.5, volumes
    20 % of the larger and 10 mL apart), on the figures the node gave on the validation studies."""
    settings = QCSettings()
    rule = qc.rule_whole_tumour_agreement
    # As on the clean validation studies through the node (BraTS2021_00005): passes.
    ok = rule(136.3, 117.9, 0.894, settings)
    assert ok.status == qc.PASSED and ok.figures["diff_ml"] == pytest.approx(18.4)
    assert ok.message == "whole tumour 136.3 mL against the whole-tumour model's 117.9 mL, Dice 0.89"
    # 90 mL of false oedema around a 33 mL tumour (BraTS2021_00014 with a bias field per series).
    held = rule(92.6, 32.8, 0.3, settings)
    assert held.status == qc.FAILED and "Dice 0.30 under 0.5" in held.message
    assert "volumes 59.8 mL (65 %) apart, over 20 % and 10 mL" in held.message
    # 49 mL more than the FLAIR model, Dice 0.80 (BraTS2021_00005 with a bias field per series): held on
    # the volumes alone.
    biased = rule(175.3, 126.6, 0.803, settings)
    assert biased.status == qc.FAILED and "Dice" not in biased.message.split(": ", 1)[1]
    # The volumes alone where the two are not on one grid.
    assert rule(92.6, 32.8, None, settings).status == qc.FAILED
    assert rule(40.0, 32.8, None, settings).status == qc.PASSED
    # Over 20 % apart but by under 10 mL: small tumours pass; so does a poor Dice when both are under 10 mL.
    assert rule(9.0, 4.0, 0.6, settings).status == qc.PASSED
    small = rule(3.0, 2.0, 0.1, settings)
    assert small.status == qc.PASSED and "Dice not judged: both under 10 mL" in small.message
    # A poor Dice between tumours of like volume (the model outlined something else) fails alone.
    assert rule(50.0, 48.0, 0.2, settings).status == qc.FAILED
    assert rule(50.0, None, None, settings, "no whole_tumor model").status == qc.NOT_CHECKED
    assert qc.dice(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)) == 0.5


def test_qc_section_of_node_toml_and_env(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[qc]\nmin_slices = 12\nmax_tumour_share_percent = 25\n")
    settings = load_settings(config, env={"SEGNODE_QC_MIN_BRAIN_ML": "700"})
    assert (settings.qc.min_slices, settings.qc.max_tumour_share_percent) == (12, 25.0)
    assert settings.qc.min_brain_ml == 700.0 and settings.qc.max_brain_ml == 2200.0
    assert load_settings(None, env={}).qc == QCSettings()
    config.write_text("[qc]\nmax_tumour_at_cut_ml = 2\n")
    assert load_settings(config, env={}).qc.max_tumour_at_cut_ml == 2.0
    config.write_text("[qc]\ncompare_whole_tumour = false\n")
    assert load_settings(config, env={}).qc.compare_whole_tumour is False
    refused = [
        ("max_tumour_share_percent = 130", r"qc.max_tumour_share_percent 130.0 is not a percentage"),
        ("min_brain_ml = 2500", r"qc.min_brain_ml 2500.0 must be >= 0 and <= qc.max_brain_ml"),
        ("whole_tumour_min_dice = 1.5", r"qc.whole_tumour_min_dice must be between 0 and 1"),
        ("max_tumour_at_cut_ml = -1", r"qc.max_tumour_at_cut_ml must be >= 0"),
        ("caution_tumour_share_percent = 130", r"qc.caution_tumour_share_percent 130.0 is not a percentage"),
        ("caution_small_tumour_ml = -1", r"qc.caution_small_tumour_ml must be >= 0 \(0: off\), not -1.0"),
        ("max_brain = 2500", r"qc: unknown key 'max_brain'"),
    ]
    for line, message in refused:
        config.write_text(f"[qc]\n{line}\n")
        with pytest.raises(ConfigError, match=message):
            load_settings(config, env={})


# -- the pipeline's qc stage on an assembled study -----------------------------------------------------------


def test_quality_check_takes_a_ras_mask_onto_the_series_grid(tmp_path: Path) -> None:
    """A brain mask on the RAS grid (the brain stage's) is put on the series' (slice, row, column) grid:
    with the left half of the phantom as "brain", exactly the tumour in the right half is removed."""
    case = make_synthetic_case(5, (48, 48, 20))
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    chosen = SeriesSelector().select(scan_series(study.files["FLAIR"]), ["FLAIR"])
    assembled = assemble_coregistered({"FLAIR": load_chosen(chosen["FLAIR"], "FLAIR")}, "FLAIR")
    assert assembled.images["FLAIR"].shape == case.shape
    assert case.label is not None
    brain_ras = np.asarray(case.images["FLAIR"] > 0)
    brain_ras[: case.shape[0] // 2] = False  # x < midline is the right side in RAS: not brain
    labels_ras = np.asarray(case.label > 0).astype(np.uint8)
    labels = np.asarray(ras_to_volume(labels_ras, assembled.reference), dtype=np.uint8)
    checked = quality_check(labels, assembled, brain_ras, chosen["FLAIR"].slices, QCSettings())
    expected = np.asarray(ras_to_volume((labels_ras & brain_ras).astype(np.uint8), assembled.reference))
    np.testing.assert_array_equal(checked.labels, expected)
    removed = int((labels_ras & ~brain_ras).sum())
    assert removed > 0
    assert checked.report.figures["removed_outside_brain_voxels"] == removed
    voxel_ml = float(np.prod(assembled.reference.spacing)) / 1000.0
    assert checked.report.figures["brain_volume_ml"] == pytest.approx(brain_ras.sum() * voxel_ml, abs=1e-3)
    assert checked.report.by_name("series_slices").figures["slices"] == 20
    # Without a mask nothing is removed and the brain rules are not checked.
    unchecked = quality_check(labels, assembled, None, 20, QCSettings())
    np.testing.assert_array_equal(unchecked.labels, labels)
    assert unchecked.report.by_name("brain_volume").status == qc.NOT_CHECKED
    assert unchecked.report.by_name("head_found").status == qc.PASSED
    # With a mask the head is not computed: the brain rules are the stricter ones.
    assert checked.report.by_name("head_found").status == qc.NOT_CHECKED


def test_quality_check_of_a_series_that_cuts_the_brain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a written and read series: a brain mask reaching both ends of the series along its slice normal
    is cut by the field of view; the result passes with the coverage recorded, and fails once tumour lies
    on the last slice."""
    # The phantom is 150 mm tall whatever its slice count: taken as a slab, the whole-brain height is
    # raised above it.
    monkeypatch.setattr(qc, "WHOLE_BRAIN_MM", 200.0)
    case = make_synthetic_case(5, (48, 48, 20))
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    chosen = SeriesSelector().select(scan_series(study.files["FLAIR"]), ["FLAIR"])
    assembled = assemble_coregistered({"FLAIR": load_chosen(chosen["FLAIR"], "FLAIR")}, "FLAIR")
    assert case.label is not None
    brain_ras = np.zeros(case.shape, dtype=bool)
    brain_ras[8:26, 22:40, :] = True  # every slice of the series (Z, 7.5 mm each): 778 mL of a cut brain
    labels_ras = (np.asarray(case.label > 0) & brain_ras).astype(np.uint8)
    labels = np.asarray(ras_to_volume(labels_ras, assembled.reference), dtype=np.uint8)
    checked = quality_check(labels, assembled, brain_ras, 20, QCSettings())
    report = checked.report
    assert report.passed, report.reason()
    assert report.figures["coverage_mm"] == pytest.approx(150.0) and report.figures["brain_cut"] is True
    assert report.by_name("brain_volume").status == qc.NOT_CHECKED
    shown = ("series coverage", "150 mm along the slice normal; the brain is cut by the series' field of "
             "view")
    assert shown in _result_rows({"qc": report.as_dict()})  # segnode jobs show
    labels_ras[20:25, 25:30, -1] = 1  # tumour on the last slice
    labels = np.asarray(ras_to_volume(labels_ras, assembled.reference), dtype=np.uint8)
    held = quality_check(labels, assembled, brain_ras, 20, QCSettings()).report
    assert [r.name for r in held.failed] == ["tumour_within_coverage"]


# -- the SR: brain figures, and the SR without SEG ----------------------------------------------------


def _card() -> dict[str, Any]:
    return {
        "name": "test-model",
        "version": "2.3.4",
        "task": "whole_tumor",
        "labels": TASK_LABELS["whole_tumor"],
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    study = write_study(
        make_synthetic_case(11, (24, 32, 8)), tmp_path_factory.mktemp("sr"), modalities=["FLAIR"]
    )
    return [pydicom.dcmread(p) for p in study.files["FLAIR"]]


def _groups(sr: Dataset) -> list[Dataset]:
    """The measurement groups of a TID 1500 report (Imaging Measurements container's items)."""
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(measurements.ContentSequence)


def _numbers(group: Dataset) -> dict[tuple[str, str], tuple[float, str]]:
    return {
        (i.ConceptNameCodeSequence[0].CodeValue, i.ConceptNameCodeSequence[0].CodingSchemeDesignator): (
            float(i.MeasuredValueSequence[0].NumericValue),
            str(i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue),
        )
        for i in group.ContentSequence
        if i.ValueType == "NUM"
    }


def _finding(group: Dataset) -> tuple[str, str]:
    [item] = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071"]
    return (
        str(item.ConceptCodeSequence[0].CodeValue),
        str(item.ConceptCodeSequence[0].CodingSchemeDesignator),
    )


def _round_trip(sr: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    hd.sr.Comprehensive3DSR.from_dataset(ds)
    return ds


def test_sr_carries_brain_volume_share_and_model(
    sources: list[Dataset], tmp_path: Path, strict_pydicom: None
) -> None:
    sources = [copy.deepcopy(ds) for ds in sources]
    for ds in sources:
        ds.Manufacturer = "ACME MR"  # the scanner (the synthetic study's own says segnode)
    labels = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    labels[2:6, 5:15, 4:12] = 1
    seg = build_seg(sources, labels, _card(), software_version="9.9.9")
    sr = _round_trip(
        build_sr(seg, sources, [12.5], _card(), brain_volume_ml=1432.25, tumour_share_percent=0.873), tmp_path
    )
    tumour, brain_group = _groups(sr)
    assert _finding(tumour) == ("108369006", "SCT")
    assert _numbers(tumour) == {("118565006", "SCT"): (12.5, "mL")}
    assert _finding(brain_group) == (BRAIN.value, "SCT") == ("12738006", "SCT")
    assert _numbers(brain_group) == {
        ("118565006", "SCT"): (1432.25, "mL"),
        (TUMOUR_SHARE_OF_BRAIN.value, "99SEGNODE"): (0.873, "%"),
    }
    # The model's name and version: algorithm identification (TID 4019) in each group.
    for group in (tumour, brain_group):
        names = {
            i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue
            for i in group.ContentSequence
            if i.ValueType == "TEXT"
        }
        assert (names["Algorithm Name"], names["Algorithm Version"]) == ("test-model", "2.3.4")
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    # The acquiring equipment is the scanner, not segnode (highdicom takes it from the first evidence).
    [acquisition] = [
        e for e in sr.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"  # DCM Acquisition Equipment
    ]  # fmt: skip
    assert acquisition.Manufacturer == sources[0].Manufacturer == "ACME MR"
    # One device for every report of this node (a random UID made each report another device).
    again = build_sr(seg, sources, [12.5], _card())
    device = "DeviceObserverUID"
    assert {str(e.value) for e in sr.iterall() if e.keyword == device} == {
        str(e.value) for e in again.iterall() if e.keyword == device
    }


@pytest.mark.parametrize(
    "brain, regions, private",
    [
        pytest.param(True, None, True, id="brain-share"),
        pytest.param(False, {"whole_tumour": 0.0, "tumour_core": 0.0}, True, id="regions"),
        pytest.param(False, None, False, id="no-private-concept"),
    ],
)
def test_an_sr_with_private_concepts_identifies_their_coding_scheme(
    brain: bool, regions: dict[str, float] | None, private: bool, sources: list[Dataset], tmp_path: Path
) -> None:
    """The brain group's share of the brain and the regions' tumour core are concepts of the private
    scheme 99SEGNODE: the SR's Coding Scheme Identification Sequence names the scheme and who is
    responsible for it (PS3.3 SOP Common), so that a reader can tell what the designator means."""
    figures: dict[str, Any] = {"brain_volume_ml": 1432.25, "tumour_share_percent": 0.0} if brain else {}
    sr = _round_trip(build_sr(None, sources, [0.0], _card(), regions=regions, **figures), tmp_path)
    used = {str(e.value) for e in sr.iterall() if e.keyword == "CodingSchemeDesignator"}
    declared = {str(i.CodingSchemeDesignator): i for i in sr.get("CodingSchemeIdentificationSequence", [])}
    assert ("99SEGNODE" in used) == private
    if private:
        [item] = declared.values()
        assert item.CodingSchemeDesignator == "99SEGNODE"
        assert item.CodingSchemeName and item.CodingSchemeResponsibleOrganization
    else:
        assert declared == {}
    problems = dciodvfy_problems(tmp_path / "sr.dcm")
    assert [p for p in problems if not p.startswith(DCIODVFY_PRIVATE_SCHEME)] == []


def test_the_sr_character_set_encodes_its_own_text(sources: list[Dataset], tmp_path: Path) -> None:
    """The series descriptions the SR names (its "series:" parameter) may hold characters the
    reference series' set cannot write (a Latin-1 study whose T2 is described in Japanese): the SR is
    written in UTF-8 and the text survives, instead of "??" or an invalid character."""
    sources = [copy.deepcopy(ds) for ds in sources]
    for ds in sources:
        ds.SpecificCharacterSet = "ISO_IR 100"
    sr = _round_trip(build_sr(None, sources, [0.0], _card(), series="T2: 1.2.4 (頭部 T2)"), tmp_path)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any("頭部 T2" in t for t in texts), texts


@pytest.mark.parametrize("failed", [False, True], ids=["sent", "released-after-review"])
def test_the_sr_says_each_caution_under_qualitative_evaluations(
    failed: bool, sources: list[Dataset], tmp_path: Path
) -> None:
    """A caution is a text item (99SEGNODE QC_CAUTION) of TID 1500's Qualitative Evaluations container:
    alone when the result passed (no 'released after review' text), after the failed checks when it
    was held and released; dciodvfy finds nothing but the private scheme's designator."""
    message = "the whole tumour (300.0 mL) is 21.0 % of the brain, over 15 %: the volume is a lower bound"
    qc_failed = [("tumour_within_coverage", "tumour at the cut")] if failed else []
    sr = _round_trip(
        build_sr(None, sources, [300.0], _card(), qc_failed=qc_failed, cautions=[("large_tumour", message)]),
        tmp_path,
    )
    [container] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    texts = [(i.ConceptNameCodeSequence[0].CodeValue, str(i.TextValue)) for i in container.ContentSequence]
    assert texts[-1] == (QC_CAUTION.value, f"caution large_tumour: {message}")
    assert [code for code, _ in texts[:-1]] == (["QC_RELEASED", "QC_FAILED_RULE"] if failed else [])
    problems = dciodvfy_problems(tmp_path / "sr.dcm")
    assert [p for p in problems if not p.startswith(DCIODVFY_PRIVATE_SCHEME)] == []
    plain = build_sr(None, sources, [300.0], _card())
    assert not [i for i in plain.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]


def test_sr_without_seg_reports_zero_ml(sources: list[Dataset], tmp_path: Path, strict_pydicom: None) -> None:
    sr = _round_trip(build_sr(None, sources, [0.0], _card()), tmp_path)
    [group] = _groups(sr)
    assert group.ConceptNameCodeSequence[0].CodeValue == "125007"  # Measurement Group (TID 1501)
    assert _finding(group) == ("108369006", "SCT")
    assert _numbers(group) == {("118565006", "SCT"): (0.0, "mL")}
    assert not any(i.ValueType == "IMAGE" and "Segment" in str(i) for i in group.ContentSequence)
    # Evidence: the source series only (no SEG); patient and study from the sources.
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    [series] = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert len(series.ReferencedSOPSequence) == len(sources)
    assert (sr.StudyInstanceUID, sr.PatientID) == (sources[0].StudyInstanceUID, sources[0].PatientID)


def test_the_sr_of_a_slab_says_its_brain_volume_is_the_brain_within_the_series(
    brain: npt.NDArray[np.bool_], sources: list[Dataset], tmp_path: Path
) -> None:
    """A slab's brain mask holds the part of the brain within the series' coverage (here 48 mm, ~700 mL):
    the SR built from its QC figures names that volume and the tumour's share of it with concepts that
    say so, not SCT "Volume" of the Brain (which a reader takes for an atrophic brain), and `segnode
    jobs show` says so too; a whole brain keeps SCT "Volume"."""
    tumour = (ellipsoid((20.0, 20.0, 20.0), centre_mm=(0.0, 10.0, 10.0)) & brain)[SLAB]
    slab = qc.check(labels_of(tumour), brain[SLAB], VOXEL_ML, 24, QCSettings(), spacing_mm=(2.0, 2.0, 2.0))
    whole = qc.check(labels_of(brain & ellipsoid((20.0, 20.0, 20.0))), brain, VOXEL_ML, 100, QCSettings(),
                     spacing_mm=(2.0, 2.0, 2.0))  # fmt: skip
    assert slab.figures["brain_slab"] is True and whole.figures["brain_slab"] is False
    found = {}
    for name, report in (("slab", slab), ("whole", whole)):
        figures = report.figures
        sr = _round_trip(
            build_sr(None, sources, [0.0], _card(), brain_volume_ml=figures["brain_volume_ml"],
                     tumour_share_percent=figures["tumour_share_of_brain_percent"],
                     brain_in_series_only=bool(figures["brain_slab"])),
            tmp_path,
        )  # fmt: skip
        [brain_group] = [g for g in _groups(sr) if _finding(g) == (BRAIN.value, "SCT")]
        found[name] = (brain_group, _numbers(brain_group))
    group, numbers = found["slab"]
    brain_ml = slab.figures["brain_volume_ml"]
    assert brain_ml is not None and 600 < brain_ml < 800
    assert set(numbers) == {(BRAIN_VOLUME_IN_SERIES.value, "99SEGNODE"),
                            (TUMOUR_SHARE_OF_BRAIN_IN_SERIES.value, "99SEGNODE")}  # fmt: skip
    assert numbers[(BRAIN_VOLUME_IN_SERIES.value, "99SEGNODE")] == (brain_ml, "mL")
    meanings = [str(e.value) for e in group.iterall() if e.keyword == "CodeMeaning"]
    assert "Brain volume within the series' coverage, not the whole brain" in meanings
    texts = [str(e.value) for e in group.iterall() if e.keyword == "TextValue"]
    assert "brain within the series' coverage (a slab, not the whole brain)" in texts, texts
    _, numbers = found["whole"]
    assert numbers[("118565006", "SCT")] == (whole.figures["brain_volume_ml"], "mL")
    assert (TUMOUR_SHARE_OF_BRAIN.value, "99SEGNODE") in numbers
    # segnode jobs show
    result = {"tumour_volume_ml": 1.0, "brain_volume_ml": brain_ml, "tumour_share_of_brain_percent": 1.0,
              "qc": slab.as_dict()}  # fmt: skip
    rows = dict(_result_rows(result))
    assert rows["brain volume within the series"] == (
        f"{brain_ml:.1f} mL: the brain within the series' 48 mm coverage (a slab), not the whole brain"
    )
    assert "tumour share of brain within the series" in rows and "brain volume" not in rows
    result = {**result, "brain_volume_ml": whole.figures["brain_volume_ml"], "qc": whole.as_dict()}
    rows = dict(_result_rows(result))
    assert rows["brain volume"] == f"{whole.figures['brain_volume_ml']:.1f} mL"
