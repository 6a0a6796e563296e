"""Tumour sub-regions from four series: series roles (pre and post contrast T1), co-registration,
model routing with fallback, and the outputs (a segment per tissue, region volumes in the SR).

Studies go to a real node over real sockets (pynetdicom, and DCMTK's storescu for the BraTS study);
the models are real OpenVINO IRs (tests/helpers/node.py): a 4-channel ``brats_regions`` 1x1
convolution with fixed per-channel thresholds and the 1-channel ``whole_tumor`` threshold model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from converters.case import Case
from converters.dicom_writer import StudyInfo, write_study
from converters.registration import RegistrationSettings, displacement_mm, edge_points, register_rigid
from converters.resample import world_points
from converters.synthetic import make_synthetic_case
from db import job_queue
from node.cli.commands import _result_rows
from node.config import Destination, RegistrationConfig
from node.coregistration import LoadedSeries, coregister, start_between_heads
from node.exceptions import JobError
from node.pipeline import load_chosen
from node.selection import (
    KEPT_CONTRAST,
    UNSURE_CONTRAST,
    SeriesInfo,
    SeriesSelector,
    scan_grouped_series,
    scan_series,
    series_info,
)
from node.sender import store_files
from node.service import NodeService
from tests.helpers.node import (
    CatchingSCP,
    RegionRules,
    install_model,
    make_regions_model,
    make_threshold_model,
    node_settings,
)
from tests.helpers.peers import DCIODVFY_PRIVATE_SCHEME, dciodvfy_problems, require_shared
from tests.helpers.ports import free_port
from tests.helpers.regions import brain_edge, brain_of, brats_case, misaligned
from tests.helpers.waiting import wait_until

SHAPE = (64, 64, 24)
#: Rules that find the synthetic phantom's three tissues (its z-scores, converters/synthetic.py): edema
#: bright in FLAIR but not in T1GD, the core bright in T2, the enhancing rim bright in T1GD. Their levels
#: keep the union near the phantom's tumour (Dice ~0.87; ~110 mL against 92), so that it agrees with the
#: whole_tumor threshold model's as a sound several-series result does (qc whole_tumour_agreement).
SYNTHETIC_RULES: RegionRules = {
    1: ({"FLAIR": 1.0, "T1GD": -1.0}, 2.0),
    2: ({"T2": 1.0}, 3.0),
    3: ({"T1GD": 1.0}, 2.0),
}

# -- series roles ----------------------------------------------------------------------------------------


def _t1(uid: str, description: str, time: str | None = None, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = uid
    ds.SeriesDescription = description
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ScanningSequence = "SE"
    ds.EchoTime = 10
    ds.RepetitionTime = 500
    ds.StudyDate = "20261202"
    if time is not None:
        ds.AcquisitionTime = time
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _roles(*datasets: Dataset) -> dict[str, str]:
    series = [series_info(ds, [], 30) for ds in datasets]
    chosen = SeriesSelector().select(series, ["T1", "T1GD"])
    return {m: s.series_instance_uid for m, s in chosen.items()}


def test_pre_and_post_contrast_t1_by_contrast_attributes_whatever_the_descriptions() -> None:
    # The post-contrast series is described "T1 pre": its own Contrast/Bolus module wins.
    post = _t1("1.2.2", "AX T1 pre", "093000", ContrastBolusAgent="Gadobutrol", ContrastBolusRoute="IV")
    pre = _t1("1.2.1", "AX T1", "091000")
    assert _roles(pre, post) == {"T1": "1.2.1", "T1GD": "1.2.2"}
    # Only a route and a volume recorded (no agent text) still says contrast was given.
    post = _t1("1.2.2", "AX T1", ContrastBolusRoute="IV", ContrastBolusVolume="7.5")
    assert _roles(_t1("1.2.1", "AX T1"), post) == {"T1": "1.2.1", "T1GD": "1.2.2"}
    # Agent texts and numbers that say none was given, as sites enter them.
    for attrs in (
        {"ContrastBolusAgent": "NONE"},
        {"ContrastBolusAgent": "No contrast"},
        {"ContrastBolusAgent": "none given"},
        {"ContrastBolusAgent": "Nativ"},
        {"ContrastBolusAgent": "kein KM"},
        {"ContrastBolusVolume": "0"},
        {"ContrastBolusTotalDose": "0.0", "ContrastBolusRoute": "-"},
    ):
        native = _t1("1.2.3", "AX T1 +C", **attrs)
        missing = SeriesSelector().assign([series_info(native, [], 30)], ["T1", "T1GD"]).missing
        assert missing == ["T1GD"], attrs


def test_an_agent_entered_at_registration_on_every_series_does_not_make_the_native_t1_post_contrast() -> None:
    """The agent entered at registration: every series of the study carries ContrastBolusAgent, so it
    tells no series from another. The native MPRAGE (described "nativ") became the T1GD over the real
    post-contrast T1 SE, the study had no T1, and the FLAIR and T2 were "given contrast". The descriptions
    and the timing decide then, as in a study without the attributes."""
    source = sorted(require_shared("dicom", "siemens_t1_fl2d_sag_healthy").iterdir())[0]

    def series(description: str, time: str, slices: int, agent: bool = True, **attrs: object) -> SeriesInfo:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesDescription = ds.ProtocolName = description
        ds.AcquisitionTime = ds.SeriesTime = time
        if agent:
            ds.ContrastBolusAgent = "Gadovist"
        for key, value in attrs.items():
            setattr(ds, key, value)
        return series_info(ds, [], slices)

    native = series("t1_mprage_sag_p2_iso_nativ", "100000", 176, ScanningSequence="GR\\IR",
                    SequenceVariant="SK\\SP\\MP", RepetitionTime=2300, EchoTime=2.3, InversionTime=900,
                    SliceThickness=1)  # fmt: skip
    flair = series("t2_tirm_tra_dark-fluid", "100500", 28, ScanningSequence="SE\\IR", RepetitionTime=9000,
                   EchoTime=81, InversionTime=2500, SliceThickness=5,
                   ImageOrientationPatient=[1, 0, 0, 0, 1, 0])  # fmt: skip
    t2 = series("t2_tse_tra", "101000", 28, ScanningSequence="SE", RepetitionTime=5000, EchoTime=100,
                SliceThickness=5, ImageOrientationPatient=[1, 0, 0, 0, 1, 0])  # fmt: skip
    post = series("t1_se_tra_KM", "104000", 28, ScanningSequence="SE", RepetitionTime=550, EchoTime=10,
                  SliceThickness=5, ImageOrientationPatient=[1, 0, 0, 0, 1, 0])  # fmt: skip
    study = [native, flair, t2, post]
    selector = SeriesSelector()
    assignment = selector.assign(study, ["FLAIR", "T1", "T1GD", "T2"])
    assert assignment.chosen == {"FLAIR": flair, "T1GD": post, "T1": native, "T2": t2}
    assert assignment.basis == {
        "T1GD": "description (contrast attributes on every T1 of the study)",
        "T1": "description (contrast attributes on every T1 of the study)",
    }  # no "given contrast" on the FLAIR or the T2
    assert selector.assign(study, ["T1GD"]).chosen == {"T1GD": post}
    # A localizer without the agent (the T1s all carry it) does not turn the rule off.
    localizer = series("localizer", "095500", 3, agent=False, ScanningSequence="GR", RepetitionTime=8.6,
                       EchoTime=4, SliceThickness=7)  # fmt: skip
    assert selector.assign([localizer, *study], ["FLAIR", "T1", "T1GD", "T2"]).chosen["T1"] is native
    # A T1 described neither way keeps its attribute's contrast: contrast was given, and a 3D T1 that
    # does not say so may be post-contrast (as the native T1 it fed the four-series model two
    # post-contrast T1s; found by review of the day's diff). After a T1 described post-contrast it is
    # one; before, it may be either: no native T1, and no T1GD while one is known (a second review).
    for time, basis in (("102000", UNSURE_CONTRAST), ("104500", KEPT_CONTRAST)):
        plain = series("t1_mprage_sag_p2_iso", time, 176, ScanningSequence="GR\\IR", EchoTime=2.3,
                       RepetitionTime=2300, InversionTime=900, SliceThickness=1)  # fmt: skip
        assert selector.contrast_evidence([*study, plain])[plain.series_instance_uid] == (True, basis)
        unsaid = [plain, flair, t2, post, series("t1_se_tra", "100000", 28, ScanningSequence="SE",
                  RepetitionTime=550, EchoTime=10, SliceThickness=5)]  # fmt: skip
        assignment = selector.assign(unsaid, ["FLAIR", "T1", "T1GD", "T2"])
        assert "T1" not in assignment.chosen
        if basis == UNSURE_CONTRAST:  # the finer 3D T1 that may be native is no T1GD beside the one known
            assert assignment.chosen["T1GD"] is post
            reasons = {u["series"]: u["reason"] for u in selector.not_used(unsaid, assignment)}
            assert "pre or post not known" in reasons[plain.label], reasons


def test_a_t1_without_attributes_acquired_after_contrast_is_post_contrast() -> None:
    """Contrast stays for the rest of the examination: a T1 series without Contrast/Bolus attributes
    of its own, acquired after one that has them, is post-contrast; one acquired before is native."""
    pre = _t1("1.2.1", "t1 se tra", "090000")
    post_axial = _t1("1.2.2", "t1 se tra", "091500", ContrastBolusAgent="Gadobutrol")
    post_sagittal = _t1("1.2.3", "t1 se sag", "092000")
    post_3d = _t1("1.2.4", "t1 mprage sag", "092500", SliceThickness=1)
    series = [
        series_info(d, [], 30 if d is not post_3d else 176) for d in (post_3d, post_sagittal, post_axial, pre)
    ]
    assignment = SeriesSelector().assign(series, ["T1", "T1GD"])
    assert assignment.chosen["T1"].series_instance_uid == "1.2.1"
    assert assignment.chosen["T1GD"].series_instance_uid == "1.2.4"  # the finest post-contrast one
    assert "acquired after a series given contrast" in assignment.basis["T1GD"]
    # The same when only a description says which one was given contrast.
    post = _t1("1.2.2", "t1 se tra KM", "091500")
    assert _roles(_t1("1.2.3", "t1 se cor", "092000"), post, pre)["T1"] == "1.2.1"
    # Or when only a series that is no T1 records the contrast: a perfusion series, or a FLAIR.
    perfusion = _t1(
        "1.2.5", "ep2d_perf", "091500", ScanningSequence="EP", EchoTime=30, RepetitionTime=1500,
        NumberOfTemporalPositions=50, ContrastBolusAgent="Gadobutrol",
    )  # fmt: skip
    flair = _t1(
        "1.2.6", "t2_tirm_tra_dark-fluid", "091500", ScanningSequence="SE\\IR", EchoTime=120,
        RepetitionTime=9000, InversionTime=2500, ContrastBolusAgent="Gadobutrol",
    )  # fmt: skip
    for recorded in (perfusion, flair):
        series = [series_info(d, [], 176 if d is post_3d else 30) for d in (post_3d, recorded, pre)]
        chosen = SeriesSelector().select(series, ["T1", "T1GD"])
        assert (chosen["T1"].series_instance_uid, chosen["T1GD"].series_instance_uid) == ("1.2.1", "1.2.4")


def test_pre_and_post_contrast_t1_by_description_never_by_acquisition_time_alone() -> None:
    # No contrast attribute anywhere: the descriptions; "pre contrast" is never post-contrast.
    pre = _t1("1.2.1", "T1 SE pre contrast", "093000")
    post = _t1("1.2.2", "T1 SE post contrast", "091000")
    assert _roles(pre, post) == {"T1": "1.2.1", "T1GD": "1.2.2"}
    # Nothing but acquisition times: two T1 series without contrast are common (a sagittal SE and a 3D
    # gradient echo), so the later one is no T1GD.
    first, later = _t1("1.2.1", "T1 SE", "091500"), _t1("1.2.2", "T1 SE", "094500.5")
    assignment = SeriesSelector().assign([series_info(d, [], 30) for d in (later, first)], ["T1", "T1GD"])
    assert assignment.missing == ["T1GD"]
    # And the native T1 is the one acquired first: a later one may have been given contrast unrecorded.
    assert assignment.chosen["T1"].series_instance_uid == "1.2.1"
    assert assignment.reasons()["T1"].endswith("acquired earlier")
    # Descriptions as sites write them, underscores for spaces and in other languages.
    for native, contrast in (
        ("t1_se_tra_nativ", "t1_se_tra_KM"),  # German: Kontrastmittel
        ("T1 SE vor KM", "T1 SE nach KM"),
        ("Ax T1 SE", "Ax T1 SE C+"),  # GE
        ("T1 senza mdc", "T1 con mdc"),  # Italian: mezzo di contrasto
        ("T1 SE sin contraste", "T1 SE con contraste"),
        ("T1_SE_pre", "T1_SE_Kontrast"),
    ):
        pair = _t1("1.2.2", contrast, "093000"), _t1("1.2.1", native, "091000")
        assert _roles(*pair) == {"T1": "1.2.1", "T1GD": "1.2.2"}, (native, contrast)


#: Descriptions as scanners and sites write them, without Contrast/Bolus attributes: given contrast?
DESCRIBED_CONTRAST = {
    # Post-contrast.
    "T1 MPRAGE POST": True,
    "AX T1 POST GAD": True,
    "Ax T1 BRAVO POST": True,
    "T1 FS post": True,
    "T1 post-gad": True,
    "T1 postGd": True,
    "t1_fl2d_tra_post_contrast": True,
    "t1_mprage_tra_p2_iso+KM": True,
    "T1W_3D_TFE+C": True,
    "AX 3D T1 FSPGR+C": True,
    "sT1W_3D_TFE_Gd": True,
    "T1 SE KM": True,
    "T1 KM+": True,
    "T1 mit KM": True,
    "T1 nach KM": True,
    "T1+C": True,
    "T1 C+": True,
    "T1C": True,
    "T1c": True,
    "T1CE": True,
    "T1 CE": True,
    "T1GD": True,
    "T1 3D assiale MDC": True,
    "POST OP T1 +C": True,  # post-operative and given contrast
    "t1_mprage_tra_postop_KM": True,
    "T1 post-op post gad": True,
    "T1 pre-op +C": True,  # pre-operative, not pre-contrast
    # Native.
    "T1 nativ": False,
    "T1 vor KM": False,
    "T1 ohne KM": False,
    "T1 kein KM": False,
    "T1 KM-": False,
    "T1 -KM": False,
    "T1 KM neg": False,
    "T1 KM-frei": False,
    "T1 pre": False,
    "t1_mprage_tra_postop": False,  # post-operative
    "T1 SE tra postop": False,
    "T1 post-op": False,
    "POST OP T1": False,
    "T1 postoperativ": False,
    "t1_tse_tra_post_fossa": False,  # posterior fossa
    "T1 post. fossa": False,
    "T1 posterior fossa": False,
    "T1COR": False,  # coronal
    "T1CORONAL": False,
    "T1 COR": False,
    "T1 pre-op": False,
}


@pytest.mark.parametrize("description", DESCRIBED_CONTRAST)
def test_a_description_says_contrast_by_its_words_not_by_parts_of_words(description: str) -> None:
    """"post" in postop, post-op, posterior or "post fossa", "t1c" in T1COR and "KM-" (without contrast)
    say no contrast: such a native T1 taken for the T1GD had the four-series model run on a study
    without contrast."""
    given = DESCRIBED_CONTRAST[description]
    series = series_info(_t1("1.2.1", description), [], 30)
    assert SeriesSelector().contrast_evidence([series])["1.2.1"][0] is given
    missing = SeriesSelector().assign([series], ["T1", "T1GD"]).missing
    assert missing == (["T1"] if given else ["T1GD"])


def test_a_native_t1_described_postop_is_neither_the_t1gd_nor_after_contrast() -> None:
    # No contrast given: a later native T1 described postop makes no T1GD (the whole-tumour model runs).
    first, later = _t1("1.2.1", "t1_mprage_sag", "091000"), _t1("1.2.2", "t1_mprage_tra_postop", "093000")
    assignment = SeriesSelector().assign([series_info(d, [], 30) for d in (later, first)], ["T1", "T1GD"])
    assert assignment.missing == ["T1GD"]
    # The real T1GD records its agent: the native T1 before it stays the T1, whatever its name.
    for native in ("T1 SE tra postop", "T1COR", "t1_tse_tra_post_fossa", "T1 KM-"):
        post = _t1("1.2.2", "t1_mprage_tra", "093000", ContrastBolusAgent="Gadobutrol")
        assert _roles(_t1("1.2.1", native, "091000"), post) == {"T1": "1.2.1", "T1GD": "1.2.2"}, native


def test_derived_maps_serve_no_role() -> None:
    subtraction = _t1(
        "1.2.9", "T1 post SUB", ContrastBolusAgent="Gd", ImageType=["DERIVED", "PRIMARY", "SUB"]
    )
    post = _t1("1.2.2", "T1 post", ContrastBolusAgent="Gd", ImageType=["ORIGINAL", "PRIMARY", "M"])
    assert _roles(_t1("1.2.1", "T1"), subtraction, post)["T1GD"] == "1.2.2"


#: Patient values with markers no log line may contain.
PATIENT = {"PatientID": "QZXPAT1", "PatientBirthDate": "19700101", "PatientSex": "F"}


def _four(t2_patient: Mapping[str, str] = {}, flair_patient: Mapping[str, str] = {}) -> list[SeriesInfo]:
    """FLAIR, T1, T1GD and T2 of the patient :data:`PATIENT`, the T2's and FLAIR's patient attributes
    changed by ``t2_patient`` and ``flair_patient`` (an empty value: the attribute left out)."""
    flair = _t1(
        "1.2.1", "t2_tirm_tra_dark-fluid", "090000", ScanningSequence="SE\\IR", EchoTime=120,
        RepetitionTime=9000, InversionTime=2500,
    )  # fmt: skip
    t1 = _t1("1.2.2", "t1 se tra", "091000")
    t1gd = _t1("1.2.3", "t1 se tra", "093000", ContrastBolusAgent="Gadobutrol")
    t2 = _t1("1.2.4", "t2 tse tra", "092000", EchoTime=100, RepetitionTime=4000)
    for ds in (flair, t1, t1gd, t2):
        for key, value in PATIENT.items():
            setattr(ds, key, value)
    for ds, changes in ((t2, t2_patient), (flair, flair_patient)):
        for key, value in changes.items():
            if value:
                setattr(ds, key, value)
            else:
                delattr(ds, key)
    return [series_info(ds, [], 30) for ds in (flair, t1, t1gd, t2)]


def test_another_patients_series_serves_no_role_and_the_reason_names_no_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A T2 of another patient filed in the study (a PACS merge, a worklist mix-up) was given the T2
    role: the regions model registered another patient's T2 onto this patient's FLAIR."""
    caplog.set_level(logging.DEBUG)
    selector, all_four = SeriesSelector(), ["FLAIR", "T1", "T1GD", "T2"]
    assert selector.assign(_four(), all_four).missing == []
    for t2_patient, differs in (
        ({"PatientID": "QZXPAT2"}, "PatientID differs"),
        ({"PatientID": ""}, "PatientID differs"),
        ({"PatientBirthDate": "19710202"}, "PatientBirthDate differs"),
        ({"PatientSex": "M", "PatientBirthDate": "19710202"}, "PatientBirthDate, PatientSex differ"),
        ({"IssuerOfPatientID": "QZXISSUER"}, None),  # only one side says: nothing to compare
        ({"PatientBirthDate": "", "PatientSex": ""}, None),
        ({"PatientID": "  QZXPAT1 ", "PatientSex": "f"}, None),  # the same, written otherwise
    ):
        series = _four(t2_patient)
        assignment = selector.assign(series, all_four)  # the reference: FLAIR, the first in order
        if differs is None:
            assert assignment.missing == [] and assignment.refused == {}, t2_patient
            continue
        reason = f"another patient's identity ({differs} from the reference series: FLAIR series 1.2.1)"
        assert assignment.missing == ["T2"] and "T2" not in assignment.chosen, t2_patient
        assert assignment.refused == {"1.2.4": reason}
        assert assignment.missing_reason() == f"T2 missing ({series[3].label}: {reason})"
        assert reason in assignment.missing_message(series)
        # The FLAIR alone (the whole-tumour model) runs, and its record says why the T2 served nothing.
        flair_only = selector.assign(series, ["FLAIR"])
        assert flair_only.chosen["FLAIR"] is series[0]
        not_used = {entry["series"]: entry["reason"] for entry in selector.not_used(series, flair_only)}
        assert not_used[series[3].label] == f"{reason}: serves no role"
    # Another issuer of the same PatientID, when both say.
    series = _four({"IssuerOfPatientID": "QZXISSUERB"}, {"IssuerOfPatientID": "QZXISSUERA"})
    assert "(IssuerOfPatientID differs" in selector.assign(series, all_four).refused["1.2.4"]
    # The reference decides: with the T2 as reference, the other three are refused instead.
    assert sorted(selector.assign(_four({"PatientID": "QZXPAT2"}), all_four, "T2").missing) == [
        "FLAIR", "T1", "T1GD"
    ]
    assert "another patient's identity" in caplog.text
    for value in ("QZXPAT", "19700101", "19710202", "QZXISSUER"):  # (a sex, F or M, is in any text)
        assert value not in caplog.text


# -- the test model and the preview --------------------------------------------------------------------


def test_regions_test_model_maps_channels_to_tissues_deterministically(tmp_path: Path) -> None:
    from converters.prediction import outputs_to_labels
    from node.segmenter import OpenVINOSegmenter

    model_dir = make_regions_model(tmp_path / "m", crop=(8, 8))
    card = json.loads((model_dir / "model.json").read_text())
    assert card["task"] == "brats_regions" and card["modalities"] == ["FLAIR", "T1", "T1GD", "T2"]
    x = np.zeros((1, 4, 8, 8), dtype=np.float32)
    x[0, 0, 0] = 3.0  # FLAIR above 1.5: edema
    x[0, 3, 1] = 4.0  # T2 above 2.5: non-enhancing / necrotic
    x[0, 2, 2] = 4.0  # T1GD above 2.5: enhancing
    x[0, 0, 3], x[0, 2, 3] = 3.0, 5.0  # both: the larger excess (T1GD, 2.5 > 1.5) wins
    labels = outputs_to_labels(
        OpenVINOSegmenter(card, model_dir / "model_fp32.xml").predict(x), card["output"]
    )
    assert [int(v) for v in labels[0, :5, 0]] == [1, 2, 3, 3, 0]


def test_preview_draws_each_tissue_in_its_colour() -> None:
    import io

    from PIL import Image

    from node.preview import COLOURS, render_preview

    image = np.full((4, 32, 32), 100.0, dtype=np.float32)
    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1, 4:12, 4:12], labels[1, 16:24, 4:12], labels[1, 4:12, 16:24] = 1, 2, 3
    pixels = np.asarray(Image.open(io.BytesIO(render_preview(image, labels, tile=32))).convert("RGB"))
    colours = {tuple(int(c) for c in p) for p in pixels.reshape(-1, 3)}
    assert {COLOURS[1], COLOURS[2], COLOURS[3]} <= colours


# -- co-registration -------------------------------------------------------------------------------------


def test_registration_recovers_a_known_misalignment_within_1_mm_at_the_brains_edge() -> None:
    """T1GD of a BraTS case moved by 4, 2, 2 degrees and ~6 mm; registration onto the FLAIR finds that
    motion: against where the same registration puts the unmoved T1GD (BraTS' own co-registration is not
    perfect: the residual is reported, not counted as error), within 1 mm everywhere on the brain's edge,
    and within 1.5 mm of the applied motion itself."""
    case = brats_case()
    moved, truth = misaligned(case)
    mask, edge = brain_of(case), brain_edge(case)
    settings = RegistrationSettings(threads=2)
    found = register_rigid(
        case.images["FLAIR"],
        case.affine,
        moved.images["T1GD"],
        case.affine,
        fixed_mask=mask,
        settings=settings,
    )
    unmoved = register_rigid(
        case.images["FLAIR"],
        case.affine,
        case.images["T1GD"],
        case.affine,
        fixed_mask=mask,
        settings=settings,
    )
    assert found.ok and unmoved.ok, (found.reason, unmoved.reason)
    applied = displacement_mm(truth["T1GD"], edge)
    assert applied.max() > 5.0  # a real misalignment: several mm at the edge
    recovered = displacement_mm(found.matrix, edge, truth["T1GD"] @ unmoved.matrix)
    absolute = displacement_mm(found.matrix, edge, truth["T1GD"])
    assert recovered.max() <= 1.0, f"max {recovered.max():.2f} mm"
    assert absolute.max() <= 1.5, f"max {absolute.max():.2f} mm"
    assert found.metric_final < found.metric_start
    assert abs(found.edge_displacement_mm - applied.max()) < 1.5


def test_series_registered_at_once_give_what_one_after_another_gives() -> None:
    """``[registration] parallel``: the three series registered in threads at once end where they end
    one after another (each registration samples with its own fixed seed): same images, same figures."""
    case = brats_case()
    moved, _ = misaligned(case)
    series = _loaded_series(moved.images, case.affine)
    modalities, mask = ["FLAIR", "T1", "T1GD", "T2"], brain_of(case)
    configs = {n: RegistrationConfig(threads=1, parallel=n) for n in (1, 3)}
    results = {n: coregister(series, "FLAIR", modalities, mask, config) for n, config in configs.items()}
    one, three = results[1], results[3]
    assert set(three.images) == {"FLAIR", "T1", "T1GD", "T2"}
    for modality in ("T1", "T1GD", "T2"):
        np.testing.assert_array_equal(one.images[modality], three.images[modality])
        a, b = one.alignments[modality].result, three.alignments[modality].result
        assert a is not None and b is not None and three.alignments[modality].ok
        np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-9)
        assert a.iterations == b.iterations


def test_a_series_covering_a_slab_of_the_brain_fails_its_registration() -> None:
    """A T1GD of 30 slices through the lesion registers well on its slab, but would give the model zeros
    over the rest of the brain (the enhancing tumour came out three times too large): it fails, so the
    study falls back; the whole-brain series pass with their coverage recorded."""
    case = brats_case()
    mask = brain_of(case)
    z = np.argwhere(mask)[:, 2]
    start = int((z.min() + z.max()) // 2) - 15
    slab_affine = case.affine.copy()
    slab_affine[:3, 3] += case.affine[:3, :3] @ np.array([0.0, 0.0, float(start)])
    series = _loaded_series({m: case.images[m] for m in ("FLAIR", "T1", "T2")}, case.affine)
    series.update(_loaded_series({"T1GD": case.images["T1GD"][:, :, start : start + 30].copy()}, slab_affine))
    out = coregister(series, "FLAIR", ["FLAIR", "T1", "T1GD", "T2"], mask, RegistrationConfig(threads=2))
    slab = out.alignments["T1GD"]
    assert not slab.ok and slab.brain_coverage is not None and slab.brain_coverage < 0.5
    assert "of the reference's brain (< 90 %)" in slab.reason
    assert out.failures == [f"registration of T1GD failed: {slab.reason}"]
    for modality in ("T1", "T2"):
        assert out.alignments[modality].ok and out.alignments[modality].as_dict()["brain_coverage"] > 0.99


def test_an_unmoved_series_whose_metric_ends_a_hair_worse_passes() -> None:
    """BraTS2021_00031's T2, already aligned with its FLAIR: the optimizer ends 0.5 mm from the start
    with Mattes MI 0.0105 worse, over the 0.01 allowed; it failed and the study lost its sub-regions.
    A result that close to its start has not diverged."""
    case = brats_case("BraTS2021_00031")
    found = register_rigid(
        case.images["FLAIR"], case.affine, case.images["T2"], case.affine, fixed_mask=brain_of(case),
        settings=RegistrationSettings(threads=2),
    )  # fmt: skip
    assert found.edge_displacement_mm <= 1.0
    assert found.ok, found.reason


def test_a_series_flipped_left_right_fails_its_registration() -> None:
    """A T1GD whose pixels are mirrored left-right (same geometry): no rigid motion undoes it, and it
    passed with the enhancing tumour on the wrong side (its Dice fell from 0.65 to 0.11). It fits about
    as well mirrored as it is, so it fails; the correct series fit far better than their mirrors."""
    case = brats_case()
    mask = brain_of(case)
    images = {m: case.images[m] for m in ("FLAIR", "T1", "T2")}
    images["T1GD"] = case.images["T1GD"][::-1].copy()  # RAS x reversed: left is right
    out = coregister(
        _loaded_series(images, case.affine), "FLAIR", ["FLAIR", "T1", "T1GD", "T2"], mask,
        RegistrationConfig(threads=2),
    )  # fmt: skip
    flipped = out.alignments["T1GD"]
    assert not flipped.ok and "mirrored left-right" in flipped.reason
    recorded = flipped.as_dict()  # as the job records it
    assert recorded["metric_mirrored"] < recorded["metric_final"] + 0.05
    for modality in ("T1", "T2"):
        result = out.alignments[modality].result
        assert out.alignments[modality].ok and result is not None
        assert result.metric_mirrored > result.metric_final + 0.1
    unchecked = coregister(
        _loaded_series(images, case.affine), "FLAIR", ["FLAIR", "T1", "T1GD", "T2"], mask,
        RegistrationConfig(threads=2, mirror_check=False),
    )  # fmt: skip
    assert unchecked.alignments["T1GD"].ok  # what passed before


def test_another_frame_of_reference_counts_only_the_motion_beyond_the_heads_tops() -> None:
    """A T1 on its own Frame of Reference, its positions 78 mm off the FLAIR's with no motion of the
    patient: registration finds it, and its figures (and limits) are about the motion beyond the
    heads' tops, not the offset between the two frames (it failed, '78.0 mm > limit 20 mm')."""
    case = brats_case()
    mask = brain_of(case)
    offset = np.eye(4)
    offset[:3, 3] = [60.0, -40.0, 30.0]
    series = _loaded_series({m: case.images[m] for m in ("FLAIR", "T1GD", "T2")}, case.affine)
    [other] = _loaded_series({"T1": case.images["T1"]}, offset @ case.affine).values()
    other.datasets[0].FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.78"
    series["T1"] = other
    config = RegistrationConfig(threads=2)
    out = coregister(series, "FLAIR", ["FLAIR", "T1", "T1GD", "T2"], mask, config)
    moved = out.alignments["T1"]
    assert not moved.same_frame_of_reference and moved.ok, moved.reason
    assert moved.result is not None and moved.result.start_offset_mm > 20.0
    assert moved.result.translation_mm < config.max_translation_mm
    edge = brain_edge(case)
    assert displacement_mm(moved.result.matrix, edge, offset).max() <= 1.5
    # segnode jobs show says the figures are beyond a start that holds the frames' offset
    shown = dict(_result_rows({"registration": out.as_dict()}))["registration T1"]
    assert shown.startswith(
        f"onto FLAIR: another Frame of Reference, started from the tops of the heads "
        f"{moved.result.start_offset_mm:.1f} mm apart (the offset between the frames, no motion); "
        f"beyond that start: {moved.result.translation_mm:.1f} mm, "
    ), shown
    # With registration off the start is all there is: it said "beyond that start: geometry only".
    off = coregister(series, "FLAIR", ["FLAIR", "T1"], mask, RegistrationConfig(enabled=False))
    shown = dict(_result_rows({"registration": off.as_dict()}))["registration T1"]
    placed = "another Frame of Reference, placed by the tops of the heads alone (no rigid registration)"
    assert shown.startswith(f"onto FLAIR: {placed}"), shown


def _head_and_brain_part(keep_mm: float) -> tuple[Any, Any, Any, Any, Any]:
    """The real Philips sagittal 3D T1 (head and neck, 241 mm of head in z), its top ``keep_mm`` as an
    axial brain-only series covers it (vertex to skull base), and a rough brain mask on that part."""
    from scipy import ndimage

    from converters.dicom_series import load_series_folder
    from converters.reorient import volume_to_ras

    folder = require_shared("dicom", "philips_t1_sag3d_mprage_healthy")
    head, affine = volume_to_ras(load_series_folder(folder))
    top = int(np.argwhere(head > 0.1 * np.percentile(head, 99))[:, 2].max())
    low = top - round(float(keep_mm / np.linalg.norm(affine[:3, 2])))
    part = np.ascontiguousarray(head[:, :, low : top + 3])
    part_affine = affine.copy()
    part_affine[:3, 3] += affine[:3, 2] * low
    inside = ndimage.binary_fill_holes(part > 0.1 * np.percentile(part, 99))
    mask = ndimage.binary_erosion(inside, iterations=12)  # about the scalp and skull, 1 mm voxels
    return head, affine, part, part_affine, mask


@pytest.mark.parametrize("keep_mm", [120.0, 160.0])
def test_another_frame_of_reference_with_head_and_neck_starts_on_the_brain(keep_mm: float) -> None:
    """A sagittal T1 covering head and neck in its own Frame of Reference against a reference covering
    the brain only: the start puts the tops of the heads on each other and the registration lands
    on the truth (the offset of the frames) at the brain's edge. It started from the whole heads'
    centres, 38.8-62.8 mm off in z, and ended 42.8 mm wrong (refused, blaming a flip)."""
    head, affine, part, part_affine, mask = _head_and_brain_part(keep_mm)
    offset = np.eye(4)
    offset[:3, 3] = [30.0, -20.0, 15.0]
    series = _loaded_series({"FLAIR": part}, part_affine)
    [other] = _loaded_series({"T1": head}, offset @ affine).values()
    other.datasets[0].FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.31"
    series["T1"] = other
    out = coregister(series, "FLAIR", ["FLAIR", "T1"], mask, RegistrationConfig(threads=2))
    moved = out.alignments["T1"]
    assert moved.result is not None
    edge = edge_points(mask, part_affine)
    assert displacement_mm(moved.result.matrix, edge, offset).max() <= 1.5
    assert moved.ok, moved.reason
    assert moved.result.start_offset_mm > 20.0 and moved.method == "tops of the heads + rigid (Mattes MI)"


def test_a_poor_fit_is_refused_without_the_mirror_check() -> None:
    """A T1GD of pure noise, and the real head-and-neck T1 started from the whole heads' centres (it
    ends 42.8 mm wrong), pass the limits; with ``mirror_check = false`` nothing refused them and the
    regions model ran on the wrong anatomy. The similarity floor does; a real fit passes it."""
    case = brats_case()
    mask = brain_of(case)
    noise = np.random.default_rng(0).random(case.images["T1GD"].shape).astype(np.float32)
    images = {"FLAIR": case.images["FLAIR"], "T1GD": noise * case.images["T1GD"].max()}
    series = _loaded_series(images, case.affine)
    config = RegistrationConfig(threads=2, mirror_check=False)
    noisy = coregister(series, "FLAIR", ["FLAIR", "T1GD"], mask, config).alignments["T1GD"]
    assert not noisy.ok and noisy.reason.startswith("poor fit (similarity 0.00"), noisy.reason
    head, affine, part, part_affine, brain = _head_and_brain_part(160.0)
    offset = np.eye(4)
    offset[:3, 3] = [30.0, -20.0, 15.0]
    centres = [
        world_points(a, np.argwhere(image > 0.1 * np.percentile(image, 99))).mean(axis=0)
        for image, a in ((head, offset @ affine), (part, part_affine))
    ]
    start = np.eye(4)
    start[:3, 3] = centres[0] - centres[1]
    settings = config.settings()
    wrong = register_rigid(part, part_affine, head, offset @ affine, fixed_mask=brain, settings=settings,
                           initial=start)  # fmt: skip
    assert displacement_mm(wrong.matrix, edge_points(brain, part_affine), offset).max() > 20.0
    assert not wrong.ok and wrong.reason.startswith("poor fit"), wrong.reason
    right = register_rigid(part, part_affine, head, offset @ affine, fixed_mask=brain, settings=settings,
                           initial=offset)  # fmt: skip
    assert right.ok, right.reason
    # A reference slab starting 40 mm below the vertex, 80 mm thick: the tops of the heads are not the
    # same anatomy, the start is ~26 mm off and the fit ends ~37 mm wrong at MI -0.084, past the first
    # floor (0.08; found by review of the day's diff). Correct fits end beyond -0.5.
    top = part.shape[2] - 3  # the slice _head_and_brain_part found as the head's top
    slab = np.ascontiguousarray(part[:, :, top - 120 : top - 40])
    slab_affine = part_affine.copy()
    slab_affine[:3, 3] += part_affine[:3, 2] * (top - 120)
    slab_brain = np.ascontiguousarray(brain[:, :, top - 120 : top - 40])
    start = start_between_heads(head, offset @ affine, slab, slab_affine)
    wrong = register_rigid(slab, slab_affine, head, offset @ affine, fixed_mask=slab_brain, settings=settings,
                           initial=start)  # fmt: skip
    assert displacement_mm(wrong.matrix, edge_points(slab_brain, slab_affine), offset).max() > 20.0
    assert not wrong.ok and "poor fit" in wrong.reason, wrong.reason


def test_a_real_head_with_a_few_very_bright_voxels_registers_within_1_mm() -> None:
    """The real GE axial T1 (99th percentile 85, maximum 5467: a few very bright voxels) moved by ~5
    degrees and ~5 mm and registered onto itself: Mattes MI spread its 32 bins up to the maximum, the
    brain fell into one or two, and the fit ended 1.85 mm off at the brain's edge with MI -0.109, just
    past the first floor (0.08; 0.25 now). With both images' intensities winsorized the metric sees the
    brain; the caller's arrays are not clipped."""
    from scipy import ndimage

    from converters.dicom_series import load_series_folder
    from converters.registration import move_series
    from converters.reorient import volume_to_ras

    head, affine = volume_to_ras(load_series_folder(require_shared("dicom", "ge_t1_mprage_healthy")))
    head = head.astype(np.float32)
    inside = ndimage.binary_fill_holes(head > 0.1 * np.percentile(head, 99))
    centre = np.argwhere(inside).mean(axis=0)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    grid = np.ogrid[tuple(slice(0, n) for n in head.shape)]
    distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True)))
    brain = inside & (distance < 65.0)  # a brain-sized ball about the head's centre
    moved, truth = move_series(
        {"T1": head}, affine, {"T1": ((3.0, -2.0, 4.0), (4.0, -3.0, 2.0))},
        world_points(affine, np.argwhere(brain).mean(axis=0, keepdims=True))[0],
    )  # fmt: skip
    kept = moved["T1"].copy()
    found = register_rigid(head, affine, moved["T1"], affine, fixed_mask=brain,
                           settings=RegistrationSettings(threads=2))  # fmt: skip
    error = displacement_mm(found.matrix, edge_points(brain, affine), truth["T1"]).max()
    assert error <= 1.0, f"{error:.2f} mm at the brain's edge (MI {found.metric_final:.3f})"
    assert found.ok and -found.metric_final > 0.5, (found.metric_final, found.reason)
    assert head.max() == 5467.0 and np.array_equal(moved["T1"], kept)


def test_series_moved_within_the_brains_box_give_the_model_what_whole_series_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a brain mask, a moved series is resampled in the mask's box only (node/coregistration.py
    ``brain_box``): zero outside it, the whole series' values inside it, and the same network input
    after preprocessing (which reads nothing outside the brain), on a field of view well beyond the
    brain as a clinical series has."""
    from converters.preprocess import prepare_volume
    from node import coregistration

    case = brats_case(margin=30)
    moved, _ = misaligned(case)
    # A background that is not zero, as a scanner's.
    series = _loaded_series({m: image + 1.0 for m, image in moved.images.items()}, case.affine)
    modalities, mask = ["FLAIR", "T1", "T1GD", "T2"], brain_of(case)
    config = RegistrationConfig(threads=1)
    box = coregistration.brain_box(mask)
    assert box is not None and np.prod([b.stop - b.start for b in box]) < 0.6 * mask.size
    boxed = coregister(series, "FLAIR", modalities, mask, config)
    monkeypatch.setattr(coregistration, "brain_box", lambda _mask: None)
    whole = coregister(series, "FLAIR", modalities, mask, config)
    preprocessing = {"orientation": "RAS", "spacing_mm": [1.0, 1.0, 1.0], "crop_size": [176, 176],
                     "normalization": "zscore_nonzero", "slice_axis": 2}  # fmt: skip
    for modality in ("T1", "T1GD", "T2"):
        outside = np.ones(mask.shape, dtype=bool)
        outside[box] = False
        assert not boxed.images[modality][outside].any()
        assert whole.images[modality][outside].any()
        np.testing.assert_allclose(boxed.images[modality][box], whole.images[modality][box], atol=1e-3)
    inputs = [prepare_volume(r.images, case.affine, preprocessing, modalities, mask) for r in (boxed, whole)]
    np.testing.assert_array_equal(inputs[0].slice_indices, inputs[1].slice_indices)
    np.testing.assert_allclose(inputs[0].slices, inputs[1].slices, atol=1e-5)


def _loaded_series(images: dict[str, np.ndarray], affine: np.ndarray) -> dict[str, LoadedSeries]:
    """Each image as a loaded series of one frame of reference (no files, no volume)."""
    return {
        m: LoadedSeries(m, series_info(ds, [], 0), None, image, affine, [ds])  # type: ignore[arg-type]
        for m, image in images.items()
        for ds in [_series_dataset(m)]
    }


def _series_dataset(modality: str) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.{len(modality)}.{sum(map(ord, modality))}"
    ds.SeriesDescription = modality
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.77"  # one frame of reference: the scanner's
    return ds


# -- the node: routing, outputs, fallback ----------------------------------------------------------------


@dataclass
class Node:
    node: NodeService
    catcher: CatchingSCP

    def send(self, study: StudyInfo, modalities: list[str] | None = None) -> None:
        files = [p for m, fs in study.files.items() if modalities is None or m in modalities for p in fs]
        results = store_files(files, "127.0.0.1", self.node.scp.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {0}

    def job_for(self, study: StudyInfo, timeout: float = 120.0) -> job_queue.JobInfo:
        def finished() -> job_queue.JobInfo | None:
            for job in job_queue.list_jobs(self.node.sf):
                if job.study_instance_uid == study.study_instance_uid and job.status in (
                    "done", "failed", "skipped", "review",
                ):  # fmt: skip
                    return job
            return None

        return wait_until(finished, timeout, f"the job of {study.study_instance_uid}")

    def received(self, study: StudyInfo, modality: str, timeout: float = 60.0) -> Dataset:
        def found(received: list[Dataset]) -> bool:
            return any(
                d.Modality == modality and d.StudyInstanceUID == study.study_instance_uid for d in received
            )

        return next(
            d
            for d in self.catcher.wait_for(found, timeout)
            if d.Modality == modality and d.StudyInstanceUID == study.study_instance_uid
        )


@pytest.fixture(scope="module")
def case() -> Case:
    return make_synthetic_case(7, SHAPE)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, case: Case) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    regions = make_regions_model(
        root / "regions", crop=SHAPE[:2], spacing=case.spacing, rules=SYNTHETIC_RULES
    )
    whole = make_threshold_model(root / "whole", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    return regions, whole


def _node(
    tmp_path: Path, models: tuple[Path, ...], qc: dict[str, object] | None = None, **registration: object
) -> Iterator[Node]:
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    )
    for key, value in registration.items():
        setattr(settings.registration, key, value)
    for key, value in (qc or {}).items():
        setattr(settings.qc, key, value)
    node = NodeService(settings)
    for model_dir in models:
        install_model(node.registry, model_dir)
    node.start()
    try:
        yield Node(node, catcher)
    finally:
        node.stop()
        catcher.stop()


@pytest.fixture()
def env(tmp_path: Path, models: tuple[Path, Path]) -> Iterator[Node]:
    yield from _node(tmp_path, models)


def _sr_texts(sr: Dataset) -> list[str]:
    """Every TEXT value anywhere in the SR's content tree."""
    out: list[str] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                out.append(str(item.TextValue))
            walk(list(item.get("ContentSequence", [])))

    walk(list(sr.ContentSequence))
    return out


def _sr_volumes(sr: Dataset) -> dict[str, float]:
    """Tracking identifier -> volume (mL) of each measurement group of the SR (TID 1500 container 126010)."""
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    out = {}
    for group in measurements.ContentSequence:
        items = list(group.ContentSequence)
        [name] = [str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112039"]
        [value] = [
            float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "118565006"
        ]
        out[name] = value
    return out


@pytest.mark.parametrize("from_flair", [True, False], ids=["whole-tumour-from-flair-model", "own-tissues"])
def test_four_series_get_the_regions_model_three_segments_and_region_volumes(
    case: Case, models: tuple[Path, Path], tmp_path: Path, from_flair: bool
) -> None:
    """The regions model's three tissues in the SEG and the SR. By default ([qc]
    whole_tumour_from_flair_model) the result's whole tumour is the whole_tumor model's, holes filled: the
    regions model's tumour core inside it, the rest oedema; off, the regions model's own tissues."""
    with contextmanager(_node)(tmp_path, models, qc={"whole_tumour_from_flair_model": from_flair}) as env:
        study = write_study(case, tmp_path / "study")
        env.send(study)
        job = env.job_for(study)
        seg = env.received(study, "SEG")
        sr = env.received(study, "SR")
    assert job.status == "done", job.reason
    assert job.model_label is not None and job.model_label.startswith("test-regions")
    routing = job.result["routing"]
    assert routing["task"] == "brats_regions"
    assert "the most capable model whose series are present" in routing["reason"]
    assert job.result["series"] == study.series_uids
    assert job.result["series_basis"]["T1GD"] == "contrast/bolus attributes"
    # Every series was registered onto the FLAIR (already aligned: it barely moves).
    registration = job.result["registration"]
    assert registration["reference"] == "FLAIR" and set(registration["series"]) == {"T1", "T1GD", "T2"}
    for entry in registration["series"].values():
        assert entry["ok"] and entry["same_frame_of_reference"] and entry["edge_displacement_mm"] < 3.0
    assert {"register", "load", "inference"} <= set(job.stages)

    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert [segments[n].SegmentLabel for n in (1, 2, 3)] == [
        "Edema",
        "Non-enhancing tumour",
        "Enhancing tumour",
    ]
    codes = [segments[n].SegmentedPropertyTypeCodeSequence[0].CodeValue for n in (1, 2, 3)]
    assert codes == ["79654002", "6574001", "C113842"]
    present = {
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert present == {1, 2, 3}

    # The SEG holds the tissues on the FLAIR frames, as the models give them on the case itself (the
    # study is aligned: registration barely moves a series, the voxels agree).
    card = json.loads((models[0] / "model.json").read_text())
    from converters.dicom_series import load_series
    from converters.reorient import ras_to_volume
    from node.pipeline import within_whole_tumour
    from node.segmenter import OpenVINOSegmenter

    direct = OpenVINOSegmenter(card, models[0] / "model_fp32.xml").segment(case.images, case.affine)
    if from_flair:
        whole_card = json.loads((models[1] / "model.json").read_text())
        whole = OpenVINOSegmenter(whole_card, models[1] / "model_fp32.xml").segment(case.images, case.affine)
        fused = within_whole_tumour(direct, whole > 0)
        # The two toy models disagree (the regions one calls bright T2 core, much of it outside the FLAIR
        # threshold's tumour): the result differs from the regions model's own.
        assert np.count_nonzero(fused != direct) > 0.1 * np.count_nonzero(direct)
        direct = fused
    volume = load_series(study.files["FLAIR"])
    expected = np.asarray(ras_to_volume(direct, volume))
    seg_file = tmp_path / "seg.dcm"
    seg.save_as(seg_file, enforce_file_format=True)
    read = hd.seg.segread(seg_file)
    volumes = _sr_volumes(sr)
    for number in (1, 2, 3):
        returned = read.get_pixels_by_source_instance(
            source_sop_instance_uids=volume.sop_instance_uids,
            segment_numbers=[number],
            assert_missing_frames_are_empty=True,
        )[..., 0]
        want = expected == number
        assert want.any()
        dice = 2 * np.sum(want & (returned > 0)) / (want.sum() + (returned > 0).sum())
        assert dice >= 0.9, f"segment {number}: Dice {dice:.3f} against the model run on the case"
        label = segments[number].SegmentLabel
        [key] = [k for k in volumes if k.startswith(f"segment {number}: {label}")]
        assert volumes[key] == pytest.approx(job.result["volumes_ml"][number - 1], abs=1e-3)
    regions = job.result["regions_ml"]
    assert volumes["whole tumour (all tissues)"] == pytest.approx(sum(job.result["volumes_ml"]), abs=1e-2)
    assert volumes["tumour core (necrotic/non-enhancing + enhancing)"] == pytest.approx(
        regions["tumour_core"], abs=1e-3
    )
    assert regions["tumour_core"] == pytest.approx(sum(job.result["volumes_ml"][1:]), abs=1e-2)
    assert any(t.startswith("routing: brats_regions (test-regions") for t in _sr_texts(sr))
    # The SR names the series that served each input, so that a reader can check them in the viewer.
    [used] = {t for t in _sr_texts(sr) if t.startswith("series: ")}  # in every group's algorithm item
    for modality, uid in study.series_uids.items():
        assert f"{modality}: series {uid} (" in used, used
    assert "(contrast/bolus attributes)" in used
    assert used.index("FLAIR:") < used.index("T1:") < used.index("T1GD:") < used.index("T2:")
    # QC: the tumour is the union of the tissues, and it agrees with the whole_tumor model's on the FLAIR
    # (that model ran in the job for the check; the routing still names the regions model alone).
    assert job.result["tumour_volume_ml"] == pytest.approx(regions["whole_tumour"], abs=0.01)
    agreement = next(r for r in job.result["qc"]["rules"] if r["name"] == "whole_tumour_agreement")
    assert agreement["status"] == "passed", agreement
    figures = job.result["qc"]["figures"]
    assert figures["whole_tumour_model_ml"] > 0 and figures["whole_tumour_dice"] >= 0.5
    assert agreement["figures"]["dice"] == pytest.approx(figures["whole_tumour_dice"], abs=1e-3)
    # The check judged the regions model's own tumour, whatever the result took.
    own = figures.get("model_tumour_volume_ml", job.result["tumour_volume_ml"])
    assert agreement["figures"]["tumour_ml"] == pytest.approx(own, abs=1e-3)
    extent = routing["whole_tumour_extent"]
    if from_flair:
        assert extent.startswith("whole tumour from whole_tumor (test-threshold")
        assert extent in routing["reason"]
        assert [t for t in _sr_texts(sr) if t.startswith("routing: ") and extent in t]
        # the whole tumour is the FLAIR model's, holes filled: at least its volume, not the model's own
        assert job.result["tumour_volume_ml"] >= figures["whole_tumour_model_ml"] - 1e-3
        assert abs(own - job.result["tumour_volume_ml"]) > 1.0
        rows = dict(_result_rows(job.result))
        assert "the several-series model's own" in rows["whole tumour, whole_tumor model"]
        early = job.result["early_analysis"] or {}
        assert "whole-tumour extent" in job.stages or "whole-tumour extent" in (early.get("stages") or {})
        # The SEG's oedema segment says whose whole tumour it is; the core segments are the model's alone.
        assert segments[1].SegmentDescription == "whole tumour of test-threshold 1.0.0 less the core"
        assert "SegmentDescription" not in segments[2] and "SegmentDescription" not in segments[3]
        assert dciodvfy_problems(seg_file) == []  # Segment Description is a Type 3 attribute of the item
    else:
        assert extent is None and "model_tumour_volume_ml" not in figures
        assert not any("SegmentDescription" in segment for segment in segments.values())
    # Early analysis ran that model on the FLAIR alone, before the other series came: reused when it did.
    reused = (job.result["early_analysis"] or {}).get("reused") or []
    assert "whole-tumour check whole_tumor" in reused or "whole-tumour check" in job.stages
    assert [e["outcome"] for e in routing["considered"]] == ["ran", "eligible"]
    # The SR's evidence is every image the volumes came from, the reference's first (the SR's patient
    # and study attributes are its), and the SEG; the segments' source series stays the reference.
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    listed = {
        str(s.SeriesInstanceUID): {str(i.ReferencedSOPInstanceUID) for i in s.ReferencedSOPSequence}
        for s in evidence.ReferencedSeriesSequence
    }
    assert next(iter(listed)) == study.series_uids["FLAIR"]
    for modality, uid in study.series_uids.items():
        heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.files[modality]]
        assert listed.get(uid) == {str(ds.SOPInstanceUID) for ds in heads}, modality
    assert listed[str(seg.SeriesInstanceUID)] == {str(seg.SOPInstanceUID)} and len(listed) == 5
    source_series = hd.sr.CodedConcept("121232", "DCM", "Source series for segmentation")
    source = hd.sr.utils.find_content_items(sr, name=source_series, recursive=True)
    assert len(source) == 3 and {str(i.UID) for i in source} == {study.series_uids["FLAIR"]}
    sr_file = tmp_path / "sr.dcm"
    sr.save_as(sr_file, enforce_file_format=True)
    assert [p for p in dciodvfy_problems(sr_file) if not p.startswith(DCIODVFY_PRIVATE_SCHEME)] == []


def test_study_without_t2_gets_the_whole_tumour_model_and_says_why(
    env: Node,
    case: Case,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = write_study(case, tmp_path / "study", modalities=["FLAIR", "T1", "T1GD"])
    env.send(study)
    job = env.job_for(study)
    assert job.status == "done", job.reason
    assert job.result["routing"]["task"] == "whole_tumor"
    reason = job.result["routing"]["reason"]
    assert (
        reason.startswith("whole_tumor (test-threshold 1.0.0") and "not brats_regions: T2 missing" in reason
    )
    assert job.result["registration"] is None  # one series: nothing to register
    sr = env.received(study, "SR")
    assert any("brats_regions: T2 missing" in t for t in _sr_texts(sr))
    from tests.helpers.cli import run_cli

    monkeypatch.setenv("SEGNODE_DATABASE_URL", env.node.settings.database.url)
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(["jobs", "show", str(job.id)], capsys, monkeypatch)
    assert code == 0 and "routing" in out and "T2 missing" in out
    # No brain_extraction model is active here: the table says the brain stage did not run.
    assert job.result["brain_extractor"] is None
    [row] = [line for line in out.splitlines() if "brain extractor" in line]
    assert "none (brain stage skipped: no usable brain_extraction model, so no brain mask)" in row, out
    # Each input's series as a reader recognises it: UID, description, slices.
    assert job.result["series_labels"]["FLAIR"].startswith(f"series {study.series_uids['FLAIR']} (")
    assert job.result["series_labels"]["FLAIR"] in out


def test_a_regions_result_far_larger_than_the_whole_tumour_models_is_held(
    case: Case,
    models: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A four-series model that calls oedema wherever the FLAIR is a little bright (as the regions model
    did on studies whose series each had their own bias field) outlines several times the FLAIR model's
    tumour: the study is held for review with both volumes and their Dice, and nothing is sent."""
    bloated = make_regions_model(
        tmp_path / "bloated", crop=SHAPE[:2], spacing=case.spacing,
        rules={**SYNTHETIC_RULES, 1: ({"FLAIR": 1.0}, 0.5)},
    )  # fmt: skip
    with contextmanager(_node)(tmp_path, (bloated, models[1])) as node:
        study = write_study(case, tmp_path / "study")
        node.send(study)
        job = node.job_for(study)
    assert job.status == "review", job.reason
    assert job.result["routing"]["task"] == "brats_regions"
    assert job.reason.startswith("qc whole_tumour_agreement: whole tumour ") and "Dice" in job.reason
    [failed] = [r for r in job.result["qc"]["rules"] if r["status"] == "failed"]
    assert failed["name"] == "whole_tumour_agreement"
    figures = job.result["qc"]["figures"]
    # Judged on the regions model's own tumour; the held result takes the FLAIR model's whole tumour.
    assert figures["model_tumour_volume_ml"] > 2 * figures["whole_tumour_model_ml"] > 0
    assert failed["figures"]["tumour_ml"] == pytest.approx(figures["model_tumour_volume_ml"], abs=1e-3)
    assert figures["tumour_volume_ml"] < figures["model_tumour_volume_ml"] / 2
    assert figures["whole_tumour_dice"] < 0.5
    assert job.sends == [] and node.catcher.received == []
    rows = dict(_result_rows(job.result))
    shown = f"{figures['whole_tumour_model_ml']:.1f} mL against the several-series model's own "
    assert rows["whole tumour, whole_tumor model"].startswith(shown)
    assert rows["qc whole_tumour_agreement"].startswith("failed: whole tumour ")


def test_without_a_whole_tumour_model_the_agreement_is_not_checked_and_says_so(
    case: Case, models: tuple[Path, Path], tmp_path: Path
) -> None:
    with contextmanager(_node)(tmp_path, (models[0],)) as node:
        study = write_study(case, tmp_path / "study")
        node.send(study)
        job = node.job_for(study)
    assert job.status == "done", job.reason
    agreement = next(r for r in job.result["qc"]["rules"] if r["name"] == "whole_tumour_agreement")
    assert agreement["status"] == "not checked"
    assert agreement["message"] == "no whole_tumor model to compare with (no active whole_tumor model)"
    assert job.result["qc"]["figures"]["whole_tumour_model_ml"] is None


def test_an_unreadable_t2_counts_as_absent(env: Node, case: Case, tmp_path: Path) -> None:
    study = write_study(case, tmp_path / "study")
    t2 = study.files["T2"]
    files = [p for m, fs in study.files.items() if m != "T2" for p in fs] + t2[:10] + t2[11:]  # a gap
    results = store_files(files, "127.0.0.1", env.node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}
    job = env.job_for(study)
    assert job.status == "done", job.reason
    routing = job.result["routing"]
    assert routing["task"] == "whole_tumor"
    assert f"not brats_regions: T2 series {study.series_uids['T2']}" in routing["reason"]


def _another_patient(paths: list[Path], **attrs: str) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)


def test_a_t2_of_another_patient_falls_back_to_the_whole_tumour_model_and_says_why(
    env: Node, case: Case, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the study's four series went to the regions model, which registered another patient's T2
    onto this patient's FLAIR and sent the SEG under this patient's identity."""
    caplog.set_level(logging.INFO)
    study = write_study(case, tmp_path / "study")
    own = str(pydicom.dcmread(study.files["FLAIR"][0]).PatientID)
    _another_patient(study.files["T2"], PatientID="QZXOTHERPATIENT")
    env.send(study)
    job = env.job_for(study)
    assert job.status == "done", job.reason
    routing = job.result["routing"]
    assert routing["task"] == "whole_tumor"
    t2, flair = study.series_uids["T2"], study.series_uids["FLAIR"]
    why = f"another patient's identity (PatientID differs from the reference series: FLAIR series {flair})"
    assert f"not brats_regions: T2 missing (series {t2} " in routing["reason"] and why in routing["reason"]
    not_used = {entry["series"].split(" (")[0]: entry["reason"] for entry in job.result["not_used"]}
    assert not_used[f"series {t2}"] == f"{why}: serves no role"
    assert why in caplog.text and "QZXOTHER" not in caplog.text and own not in caplog.text


def test_a_series_whose_instances_are_of_two_patients_is_refused(case: Case, tmp_path: Path) -> None:
    """Before, a series whose instances carry two PatientIDs was read as one volume."""
    study = write_study(case, tmp_path / "study", modalities=["FLAIR", "T2"])
    t2 = study.files["T2"]
    _another_patient([t2[1]], PatientID="QZXOTHERPATIENT")  # no probe of the scan reads this one
    groups = {study.series_uids[m]: files for m, files in study.files.items()}
    [series] = [s for s in scan_grouped_series(groups) if s.series_instance_uid == study.series_uids["T2"]]
    with pytest.raises(JobError, match=r"T2 series .*: its instances carry more than one patient identity "
                       r"\(PatientID differs between them\); refused"):  # fmt: skip
        load_chosen(series, "T2")
    assert series.identity_mixed == ""
    # A probe sees it (the last file is one): the series is no candidate, and the record says why.
    _another_patient([t2[-1]], PatientBirthDate="19010101")
    scanned = scan_grouped_series(groups)
    assert [s.identity_mixed for s in scanned if s.series_instance_uid == series.series_instance_uid] == [
        "PatientBirthDate"
    ]
    assignment = SeriesSelector().assign(scanned, ["FLAIR", "T2"], "FLAIR")
    assert assignment.missing == ["T2"]
    assert assignment.refused == {
        series.series_instance_uid: "its instances carry more than one patient identity (PatientBirthDate "
        "differs between them)"
    }


def _series_like(files: list[Path], out: Path, description: str, *per_image: dict[str, object]) -> list[Path]:
    """A new series made of ``files``' slices with their headers changed: one image per position and
    per item of ``per_image`` (the attributes each copy gets; several items: several images at each
    position, e.g. b-values), new series and instance UIDs."""
    out.mkdir(parents=True)
    uid, written = pydicom.uid.generate_uid(), []
    for n, attrs in enumerate(per_image):
        for number, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID, ds.SeriesDescription, ds.ProtocolName = uid, description, description
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            for key, value in attrs.items():
                setattr(ds, key, value)
            written.append(out / f"{n}-{number:03d}.dcm")
            ds.save_as(written[-1], enforce_file_format=True)
    return written


def test_a_brain_tumour_protocol_as_a_scanner_sends_it_gets_the_four_right_series(
    env: Node, case: Case, tmp_path: Path
) -> None:
    """The four series among those a glioma protocol also holds (a DWI, its ADC, T2 phase images, a TOF,
    an SWI, a DCE and a post-contrast FLAIR), each made to win a role by TE, TR, slice count or ImageType
    ORIGINAL (the test study's series are DERIVED), none described in words the exclude pattern knows:
    only their attributes tell."""
    study = write_study(case, tmp_path / "study")
    f = study.files
    original = ["ORIGINAL", "PRIMARY", "OTHER"]
    echo_planar = {"ScanningSequence": ["SE", "EP"], "EchoTime": "80", "RepetitionTime": "7000"}
    extra = [
        # GE-style DWI: b=0 and b=1000 at every position, b=0 first; by TE a T2, by slices the best one.
        *_series_like(f["T2"], tmp_path / "dwi", "AX DIFFUSION",
                      {**echo_planar, "ImageType": original, "DiffusionBValue": 0.0},
                      {**echo_planar, "ImageType": original, "DiffusionBValue": 1000.0}),
        # Its ADC map.
        *_series_like(f["T2"], tmp_path / "adc", "Apparent Diffusion Coefficient (mm2/s)",
                      {**echo_planar, "ImageType": ["DERIVED", "PRIMARY", "ADC"]}),
        # The phase images of a T2, ORIGINAL where the T2 is DERIVED (it would win).
        *_series_like(f["T2"], tmp_path / "phase", "t2_tse_tra",
                      {"ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"]}),
        # A time-of-flight angiogram: T1-weighted by TE and TR, ORIGINAL where the T1 is DERIVED.
        *_series_like(f["T1"], tmp_path / "tof", "3D multi-slab",
                      {"AngioFlag": "Y", "ImageType": original, "ScanningSequence": "GR", "EchoTime": "3.4",
                       "RepetitionTime": "22"}),
        # A 3D T2* gradient echo (an SWI magnitude): T1-weighted by TE and TR, ORIGINAL where the T1 is
        # DERIVED; only its echo pulse sequence and TE say that it is none.
        *_series_like(f["T1"], tmp_path / "swi", "3D GRE",
                      {"ImageType": original, "ScanningSequence": "GR", "EchoTime": "20",
                       "RepetitionTime": "27"}),
        # A DCE series: the T1GD's positions at three time points, ORIGINAL where the T1GD is DERIVED,
        # given contrast, three times its slices (it would win the T1GD role, then fail to load).
        *_series_like(f["T1GD"], tmp_path / "dce", "t1_vibe_dyn",
                      *({"ImageType": original, "NumberOfTemporalPositions": 3,
                         "TemporalPositionIdentifier": n} for n in (1, 2, 3))),
        # A FLAIR after contrast, acquired after the native one.
        *_series_like(f["FLAIR"], tmp_path / "flair-post", "AX FLAIR",
                      {"ContrastBolusAgent": "Gadobutrol", "AcquisitionTime": "235900"}),
    ]  # fmt: skip
    results = store_files(
        extra + [p for fs in f.values() for p in fs], "127.0.0.1", env.node.scp.port, "SEGNODE", "PACS"
    )
    assert {status for _, status, _ in results} == {0}
    job = env.job_for(study)
    assert job.status == "done", job.reason
    assert job.result["routing"]["task"] == "brats_regions", job.result["routing"]["reason"]
    assert job.result["series"] == study.series_uids
    assert job.result["series_replaced"] == []
    # Why the native FLAIR came before the post-contrast one, as `jobs show` and the SR tell it.
    basis = job.result["series_basis"]["FLAIR"]
    assert basis.startswith("over series ") and basis.endswith(": not given contrast")
    # Every other series is in the job, with why it served no input, as `jobs show` tells it.
    # Labels read "series UID (description, N slices)".
    entries = job.result["not_used"]
    not_used = {e["series"].split(" ", 2)[2][1:].rsplit(", ", 1)[0]: e["reason"] for e in entries}
    flair = job.result["series_labels"]["FLAIR"]
    assert not_used == {
        "AX DIFFUSION": "diffusion: serves no role",
        "Apparent Diffusion Coefficient (mm2/s)": "derived map (ImageType ADC): serves no role",
        "t2_tse_tra": "phase, real or imaginary image: serves no role",
        "3D multi-slab": "angiography: serves no role",
        "3D GRE": "no role: not FLAIR, T1, T1GD or T2 by its attributes or description",
        "t1_vibe_dyn": "dynamic (3 time points): serves no role",
        "AX FLAIR": f"a FLAIR candidate ranked below {flair}: not given contrast",
    }
    assert sum(key == "not used" for key, _ in _result_rows(job.result)) == len(not_used)


@pytest.mark.parametrize(
    ("others", "task", "segments"),
    [(("T1", "T1GD", "T2"), "brats_regions", (1, 2, 3)), ((), "whole_tumor", (1,))],
    ids=["four-series", "flair-only"],
)
def test_a_reference_finer_than_1_mm_is_worked_on_in_1_mm_blocks_and_labelled_on_its_own_frames(
    env: Node, case: Case, tmp_path: Path, others: tuple[str, ...], task: str, segments: tuple[int, ...]
) -> None:
    # The test case at 1.2 mm, and the same study with its FLAIR (the reference) reconstructed at
    # 0.6 mm: each voxel split in eight. Both models work on 2 x 2 x 2 blocks of the fine FLAIR,
    # which are the 1.2 mm FLAIR exactly, so its labels are the 1.2 mm study's split in eight.
    from converters.dicom_writer import write_volumes
    from converters.reorient import case_to_volume

    coarse = dataclasses.replace(case, affine=np.diag([1.2, 1.2, 1.2, 1.0]) @ np.eye(4))
    coarse.affine[:3, 3] = [-38.0, -38.0, -14.0]
    half = np.diag([0.5, 0.5, 0.5, 1.0])
    half[:3, 3] = -0.25
    fine = dataclasses.replace(
        coarse,
        images={"FLAIR": coarse.images["FLAIR"].repeat(2, 0).repeat(2, 1).repeat(2, 2)},
        affine=coarse.affine @ half,
    )
    labels = []
    for name, flair in (("coarse", coarse), ("fine", fine)):
        volumes = {"FLAIR": case_to_volume(flair, "FLAIR")}
        volumes |= {m: case_to_volume(coarse, m) for m in others}
        study = write_volumes(volumes, tmp_path / name)
        env.send(study)
        job = env.job_for(study)
        assert job.status == "done", job.reason
        assert job.result["routing"]["task"] == task, job.result["routing"]["reason"]
        seg_file = tmp_path / f"{name}.dcm"
        env.received(study, "SEG").save_as(seg_file, enforce_file_format=True)
        from converters.dicom_series import load_series

        frames = load_series(study.files["FLAIR"]).sop_instance_uids
        read = hd.seg.segread(seg_file)
        labels.append(
            sum(
                number * read.get_pixels_by_source_instance(
                    source_sop_instance_uids=frames, segment_numbers=[number],
                    assert_missing_frames_are_empty=True,
                )[..., 0].astype(np.uint8)
                for number in segments
            )
        )  # fmt: skip
    coarse_labels, fine_labels = labels
    assert coarse_labels.any() and fine_labels.shape == tuple(2 * n for n in coarse_labels.shape)
    np.testing.assert_array_equal(fine_labels, coarse_labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_a_dual_echo_t2_gives_its_long_echo_to_the_t2_role(env: Node, case: Case, tmp_path: Path) -> None:
    # A PD/T2 dual-echo series: two images at every position, echo 1 (TE 12 ms) and echo 2 (TE 100 ms),
    # sent slice by slice with the PD image first. Before, the series was one with duplicate positions
    # whose first header said PD: no T2, and the study lost its sub-regions.
    study = write_study(case, tmp_path / "study")
    (tmp_path / "pd").mkdir()
    dual = []
    for path in study.files["T2"]:
        t2 = pydicom.dcmread(path)
        t2.EchoNumbers = "2"
        t2.save_as(path, enforce_file_format=True)
        pd = pydicom.dcmread(path)
        pd.EchoNumbers, pd.EchoTime, pd.RepetitionTime = "1", "12", "3000"
        pd.SOPInstanceUID = pd.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        pd.save_as(tmp_path / "pd" / path.name, enforce_file_format=True)
        dual += [tmp_path / "pd" / path.name, path]
    series = {s.echo: s for s in scan_series(dual)}
    assert set(series) == {"echo 1, TE 12 ms", "echo 2, TE 100 ms"}
    assert {s.slices for s in series.values()} == {len(study.files["T2"])}
    files = [p for m, fs in study.files.items() if m != "T2" for p in fs] + dual
    results = store_files(files, "127.0.0.1", env.node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}
    job = env.job_for(study)
    assert job.status == "done", job.reason
    assert job.result["routing"]["task"] == "brats_regions", job.result["routing"]["reason"]
    assert job.result["series"] == study.series_uids


def test_an_unreadable_flair_gives_way_to_the_next_flair_and_the_job_says_so(
    env: Node, case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The study's best-ranked FLAIR (ORIGINAL, where the other is DERIVED) lost a slice on its way;
    # the other FLAIR is whole. Before, the job failed on the gap.
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    broken_uid, broken = pydicom.uid.generate_uid(), []
    (tmp_path / "broken").mkdir()
    for number, path in enumerate(study.files["FLAIR"]):
        if number == 11:
            continue  # the lost slice
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = broken_uid, 11
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        broken.append(tmp_path / "broken" / path.name)
        ds.save_as(broken[-1], enforce_file_format=True)
    results = store_files(broken + study.files["FLAIR"], "127.0.0.1", env.node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}
    job = env.job_for(study)
    assert job.status == "done", job.reason
    assert job.result["series"] == {"FLAIR": study.series_uids["FLAIR"]}
    [line] = job.result["series_replaced"]
    assert line.startswith(f"FLAIR series {broken_uid}") and "missing slices" in line
    assert f"series {study.series_uids['FLAIR']}" in line and line.endswith("used instead")
    seg = env.received(study, "SEG")
    assert {str(r.SeriesInstanceUID) for r in seg.ReferencedSeriesSequence} == {study.series_uids["FLAIR"]}
    from tests.helpers.cli import run_cli

    monkeypatch.setenv("SEGNODE_DATABASE_URL", env.node.settings.database.url)
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(["jobs", "show", str(job.id)], capsys, monkeypatch)
    assert code == 0 and "series replaced" in out and broken_uid in out


@pytest.fixture()
def strict_env(tmp_path: Path, models: tuple[Path, Path]) -> Iterator[Node]:
    # Limits no real registration meets: every one fails its check.
    yield from _node(tmp_path, models, max_translation_mm=1e-6, max_rotation_deg=1e-6)


def test_failed_registration_falls_back_to_the_whole_tumour_model(
    strict_env: Node, case: Case, tmp_path: Path
) -> None:
    moved = dataclasses.replace(case, images=dict(case.images))
    study = write_study(moved, tmp_path / "study")
    strict_env.send(study)
    job = strict_env.job_for(study)
    assert job.status == "done", job.reason
    routing = job.result["routing"]
    assert routing["task"] == "whole_tumor"
    assert "not brats_regions: registration of T1 failed: " in routing["reason"]
    assert "> limit 1e-06 mm" in routing["reason"] or "> limit 1e-06 deg" in routing["reason"]
    [regions] = [e for e in routing["considered"] if e["task"] == "brats_regions"]
    assert regions["outcome"] == "not run"
    # The failed registration's figures stay in the job, beside the reason.
    t1 = regions["registration"]["series"]["T1"]
    assert t1["ok"] is False and t1["translation_mm"] >= 0 and "brain_coverage" in t1
    seg = strict_env.received(study, "SEG")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Whole tumour"]


# -- a regions model that cannot run on the study --------------------------------------------------------


def test_a_regions_model_whose_network_cannot_take_its_cards_crop_is_refused_at_load(
    tmp_path: Path, case: Case
) -> None:
    """The card's crop (64 x 64) is not the network's fixed input (32 x 32): the model loaded (its warm-up
    ran only when the batch could be made static) and every four-series study then failed. Now a
    warm-up inference at the card's shape refuses it at load, and the previous model keeps serving."""
    from db.registry import open_registry
    from node.runtime import ModelRuntime

    registry = open_registry(f"sqlite:///{tmp_path / 'segnode.db'}")
    runtime = ModelRuntime(registry, "brats_regions")
    good = install_model(registry, make_regions_model(tmp_path / "good", crop=(32, 32), spacing=case.spacing))
    assert runtime.refresh() is not None
    broken = make_regions_model(tmp_path / "broken", crop=(32, 32), spacing=case.spacing, version="2.0.0")
    card = json.loads((broken / "model.json").read_text())
    card["preprocessing"]["crop_size"] = [64, 64]
    (broken / "model.json").write_text(json.dumps(card))
    promoted = install_model(registry, broken)
    loaded = runtime.refresh()
    assert loaded is not None and loaded.info.id == good.id and runtime.active_refused
    assert runtime.last_error.startswith(f"model {promoted.label}: a warm-up inference of ")
    assert "at the card's input shape (8, 4, 64, 64)" in runtime.last_error  # a batch, as jobs send


def test_a_regions_model_failing_on_the_study_falls_back_to_the_whole_tumour_model(
    tmp_path: Path, case: Case, models: tuple[Path, Path]
) -> None:
    """A model that loads (its warm-up passes) but whose inference fails on a study: the job fell on
    OpenVINO's RuntimeError, as no other error than a JobError let the next route run. The network
    here fixes its batch at 3 (a study's slices go in padded requests of 3, which works); its
    inference is then made to fail as OpenVINO fails, once the model has loaded."""
    regions = make_regions_model(
        tmp_path / "fixed-batch", crop=SHAPE[:2], spacing=case.spacing, rules=SYNTHETIC_RULES, batch=3,
    )
    with contextmanager(_node)(tmp_path, (regions, models[1])) as node:
        loaded = node.node.runtimes["brats_regions"].current
        assert loaded is not None and loaded.segmenter.batch_size == 3  # loaded, warm-up passed
        study = write_study(case, tmp_path / "study")
        node.send(study)
        job = node.job_for(study)
        assert job.status == "done", job.reason
        assert job.result["routing"]["task"] == "brats_regions"  # the fixed batch runs

        def fails(batch: np.ndarray) -> np.ndarray:
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp: [CPU] failed")

        loaded.segmenter.predict = fails  # type: ignore[method-assign]
        again = write_study(case, tmp_path / "again")
        node.send(again)
        job = node.job_for(again)
    assert job.status == "done", job.reason
    routing = job.result["routing"]
    assert routing["task"] == "whole_tumor"
    [entry] = [e for e in routing["considered"] if e["task"] == "brats_regions"]
    assert entry["outcome"] == "not run"
    failed = "model test-regions 1.0.0 (fp32, #1) failed on the study"
    assert entry["reason"].startswith(f"{failed}: RuntimeError: ")
    assert f"not brats_regions: {failed}" in routing["reason"]


# -- a BraTS study with a known misalignment, end to end through DCMTK -------------------------------------


@pytest.mark.slow
def test_misaligned_brats_study_end_to_end_over_storescu(tmp_path: Path) -> None:
    """A BraTS case with T1, T1GD and T2 moved (a few degrees and mm each) goes in by storescu, through
    brain extraction, registration and the regions model, and comes back as a SEG with three tissues;
    the job's registration found every motion within 1 mm at the brain's edge (against the same
    registration of the unmoved series) and within 1.5 mm of the applied motion."""
    from node.bootstrap import SHIPPED_BRAIN_EXTRACTOR_DIR, install_and_promote
    from tests.helpers.dcmtk import storescu

    case = brats_case()
    moved, truth = misaligned(case)
    regions = make_regions_model(tmp_path / "regions", crop=(192, 192))
    whole = make_threshold_model(tmp_path / "whole", crop=(192, 192))
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    )
    settings.registration.threads = 2
    # The two threshold models outline different things by construction (the regions one adds T2 and T1GD
    # bright voxels to the FLAIR's: ~150 against ~100 mL); the whole-tumour check has tests of its own.
    settings.qc.compare_whole_tumour = False
    node = NodeService(settings)
    install_and_promote(node.registry, SHIPPED_BRAIN_EXTRACTOR_DIR, by="test", reason="test")
    for model_dir in (regions, whole):
        install_model(node.registry, model_dir)
    node.start()
    env = Node(node, catcher)
    try:
        study = write_study(moved, tmp_path / "study")
        sent = storescu(node.scp.port, [p for files in study.files.values() for p in files])
        assert sent.returncode == 0, sent.stderr[-2000:]
        job = env.job_for(study, timeout=300)
        assert job.status == "done", job.reason
        assert job.result["routing"]["task"] == "brats_regions"
        seg = env.received(study, "SEG")
        assert [s.SegmentLabel for s in seg.SegmentSequence] == [
            "Edema",
            "Non-enhancing tumour",
            "Enhancing tumour",
        ]
        assert (
            pydicom.dcmread(study.files["FLAIR"][0]).SeriesInstanceUID
            == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        )
    finally:
        node.stop()
        catcher.stop()

    edge, mask = brain_edge(case), brain_of(case)
    settings_ = RegistrationSettings(threads=2)
    for modality, entry in job.result["registration"]["series"].items():
        found = np.asarray(entry["matrix"])
        unmoved = register_rigid(
            case.images["FLAIR"],
            case.affine,
            case.images[modality],
            case.affine,
            fixed_mask=mask,
            settings=settings_,
        )
        recovered = displacement_mm(found, edge, truth[modality] @ unmoved.matrix).max()
        absolute = displacement_mm(found, edge, truth[modality]).max()
        assert entry["ok"], entry["reason"]
        assert recovered <= 1.0, f"{modality}: {recovered:.2f} mm at the brain's edge"
        assert absolute <= 1.5, f"{modality}: {absolute:.2f} mm from the applied motion"


def _check_setup(
    monkeypatch: pytest.MonkeyPatch, whole_tumour_of: Any
) -> tuple[Any, Any, Any, Any]:
    """A regions result, a plan with the whole_tumor model beside it, a context, and the FLAIR model's
    run for the whole-tumour check stood in for by ``whole_tumour_of`` (the node's own bookkeeping)."""
    from types import SimpleNamespace

    from node import pipeline
    from node.config import QCSettings, RegistrationConfig
    from node.qc import QCReport
    from node.selection import Assignment

    files = sorted(p for p in require_shared("dicom", "siemens_t1_fl2d_sag_healthy").iterdir() if p.is_file())
    [flair] = scan_grouped_series({"f": files})
    monkeypatch.setattr(pipeline, "_whole_tumour_of", whole_tumour_of)
    # Off here: taking the FLAIR model's whole tumour runs the QC rules on a real study; the tests of it
    # below switch it on (and stand in for the rules where they run).
    qc_settings = QCSettings(whole_tumour_from_flair_model=False)
    ctx = SimpleNamespace(qc=qc_settings, registration=RegistrationConfig(), brain=lambda: None)
    chosen = Assignment(chosen={"FLAIR": flair})
    flair_model = SimpleNamespace(card={"modalities": ["FLAIR"]}, label="wt 1")
    whole = pipeline.Route("whole_tumor", flair_model, chosen)
    four = SimpleNamespace(card={"modalities": ["FLAIR", "T1", "T1GD", "T2"]}, label="br 1")
    regions = pipeline.Route("brats_regions", four, chosen)
    one_mm = SimpleNamespace(reference=SimpleNamespace(spacing=(1.0, 1.0, 1.0)))
    labels = np.zeros((4, 4, 4), np.uint8)
    report = QCReport(rules=[], figures={})
    done = pipeline.Segmented(regions, one_mm, None, labels, report, None)  # type: ignore[arg-type]
    return pipeline.RoutingPlan(routes=[regions, whole]), done, ctx, pipeline


def test_the_whole_tumour_check_computed_early_is_reused_by_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Early analysis that ran the regions model computed the FLAIR model's labels for its check and kept
    them nowhere: the job ran the FLAIR model again for the same check."""
    from types import SimpleNamespace

    calls: list[str] = []

    def whole_tumour_of(study: Any, chosen: Any) -> tuple[Any, Any]:
        calls.append("job" if study.job_id is not None else "early")
        return np.zeros((4, 4, 4), np.uint8), SimpleNamespace(spacing=(1.0, 1.0, 1.0))

    plan, done, ctx, pipeline = _check_setup(monkeypatch, whole_tumour_of)
    work = pipeline.EarlyWork()
    early = pipeline._Study(ctx, None, pipeline.Timer())
    early.results, early.checks = work.segmented, work.checks  # as analyse_early shares them
    out = pipeline.compare_whole_tumour(early, plan, done)
    job = pipeline._Study(ctx, 7, pipeline.Timer(), early=work)
    checked = pipeline.compare_whole_tumour(job, plan, out)
    assert calls == ["early"] and job.reused == ["whole-tumour check whole_tumor"]
    assert checked.report.by_name("whole_tumour_agreement").status == "passed"


def test_a_whole_tumour_taken_early_is_taken_again_from_the_models_own_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Early analysis gave the regions result the FLAIR model's whole tumour; the job checks the result
    again. It must start from the regions model's own labels (else the check would compare the FLAIR
    model's tumour with itself) and keep the SEG early analysis built when the labels come out the same."""
    from node.config import QCSettings
    from node.qc import QCReport

    flair = np.zeros((4, 4, 4), np.uint8)
    flair[:2, :2, :2] = 1

    def whole_tumour_of(study: Any, chosen: Any) -> tuple[Any, Any]:
        from types import SimpleNamespace

        return flair, SimpleNamespace(spacing=(1.0, 1.0, 1.0))

    plan, done, ctx, pipeline = _check_setup(monkeypatch, whole_tumour_of)
    ctx.qc = QCSettings()  # whole_tumour_from_flair_model on, the default

    def quality_check(labels: Any, *_: Any) -> Any:  # the rules need a real study; this test reads a figure
        return pipeline.Checked(labels, QCReport([], {"tumour_volume_ml": np.count_nonzero(labels) / 1e3}))

    monkeypatch.setattr(pipeline, "quality_check", quality_check)
    own = np.zeros((4, 4, 4), np.uint8)
    own[0, 0, 0], own[1, 1, 1], own[3, 3, 3], own[3, 3, 2] = 2, 1, 3, 1  # core in and out, oedema in and out
    done = dataclasses.replace(done, labels=own, report=QCReport([], {"tumour_volume_ml": 0.004}))

    work = pipeline.EarlyWork()
    early = pipeline._Study(ctx, None, pipeline.Timer())
    early.results, early.checks = work.segmented, work.checks
    taken = pipeline.compare_whole_tumour(early, plan, done)
    want = flair.copy()
    want[0, 0, 0] = 2
    assert np.array_equal(taken.labels, want)
    assert taken.extent is not None and taken.extent.startswith("whole tumour from whole_tumor (wt 1) ")
    taken.seg_file = b"the SEG early analysis encoded"

    job = pipeline._Study(ctx, 7, pipeline.Timer(), early=work)
    again = pipeline.compare_whole_tumour(job, plan, taken)
    assert np.array_equal(again.labels, want) and again.seg_file == b"the SEG early analysis encoded"
    agreement = again.report.by_name("whole_tumour_agreement")
    assert agreement.figures["tumour_ml"] == pytest.approx(0.004)  # the regions model's 4 voxels, not 8
    assert again.report.figures["model_tumour_volume_ml"] == pytest.approx(0.004)
    assert again.report.figures["tumour_volume_ml"] == pytest.approx(0.008)
    assert again.model_result is not None and np.array_equal(again.model_result.labels, own)


def test_with_the_check_off_the_whole_tumour_is_still_taken_and_the_rule_says_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from node.config import QCSettings
    from node.qc import QCReport

    def whole_tumour_of(study: Any, chosen: Any) -> tuple[Any, Any]:
        from types import SimpleNamespace

        return np.ones((4, 4, 4), np.uint8), SimpleNamespace(spacing=(1.0, 1.0, 1.0))

    plan, done, ctx, pipeline = _check_setup(monkeypatch, whole_tumour_of)
    ctx.qc = QCSettings(compare_whole_tumour=False)

    def quality_check(labels: Any, *_: Any) -> Any:  # the rules need a real study; not read here
        return pipeline.Checked(labels, QCReport([], {}))

    monkeypatch.setattr(pipeline, "quality_check", quality_check)
    out = pipeline.compare_whole_tumour(pipeline._Study(ctx, 7, pipeline.Timer()), plan, done)
    assert np.all(out.labels == 1) and out.model_result is not None  # all oedema: the model found nothing
    rule = out.report.by_name("whole_tumour_agreement")
    assert rule.status == "not checked" and rule.message == "off ([qc] compare_whole_tumour = false)"


def test_a_flair_model_run_on_another_series_gives_no_whole_tumour_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The FLAIR model's labels lie on another series' grid than the regions result's: nothing is taken
    from them (volumes compared only), and the routing note says why."""
    from node.config import QCSettings
    from node.selection import Assignment

    def whole_tumour_of(study: Any, chosen: Any) -> tuple[Any, Any]:
        from types import SimpleNamespace

        return np.ones((4, 4, 4), np.uint8), SimpleNamespace(spacing=(1.0, 1.0, 1.0))

    plan, done, ctx, pipeline = _check_setup(monkeypatch, whole_tumour_of)
    ctx.qc = QCSettings()
    folder = require_shared("dicom", "philips_t1_sag3d_mprage_healthy")
    [other] = scan_grouped_series({"p": sorted(p for p in folder.iterdir() if p.is_file())})
    whole = plan.routes[1]
    plan.routes[1] = pipeline.Route(whole.task, whole.model, Assignment(chosen={"FLAIR": other}))
    out = pipeline.compare_whole_tumour(pipeline._Study(ctx, 7, pipeline.Timer()), plan, done)
    assert out.labels is done.labels and out.model_result is None
    assert out.extent == (
        "whole tumour the model's own: the whole_tumor model ran on another series than its reference (FLAIR)"
    )
    assert out.report.figures["whole_tumour_dice"] is None  # not on one grid: volumes only


def test_a_whole_tumour_check_whose_flair_finds_no_brain_is_not_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With another series as the registration reference, the check masks the FLAIR for the first time;
    its brain extraction's refusal (a ConverterError, not a JobError) escaped the check and failed the
    job, losing the several-series result that had run."""
    from converters.brain_mask import NoBrainFoundError

    def whole_tumour_of(study: Any, chosen: Any) -> tuple[Any, Any]:
        raise NoBrainFoundError("FLAIR: the 1831 mL mask does not stand out from its surroundings")

    plan, done, ctx, pipeline = _check_setup(monkeypatch, whole_tumour_of)
    checked = pipeline.compare_whole_tumour(pipeline._Study(ctx, 7, pipeline.Timer()), plan, done)
    rule = checked.report.by_name("whole_tumour_agreement")
    assert rule.status == "not checked" and "could not run: FLAIR: the 1831 mL mask" in rule.message


def test_a_study_without_flair_is_skipped_with_the_reason_said_once(
    env: Node, case: Case, tmp_path: Path
) -> None:
    """T1, T1GD and T2 without FLAIR: both models need it, and the job said "no FLAIR series in the study
    (considered ...)" twice, once per model, naming neither."""
    study = write_study(case, tmp_path / "study", modalities=["T1", "T1GD", "T2"])
    env.send(study)
    job = env.job_for(study)
    assert job.status == "skipped", job.reason
    assert job.reason.startswith("no FLAIR series in the study (considered: series ")
    assert job.reason.count("no FLAIR series") == 1, job.reason
