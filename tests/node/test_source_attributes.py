"""Source attributes highdicom refuses never stop a job (node/source_attributes.py).

A FLAIR study whose patient and study attributes are bad the ways real scanners and RIS write them,
one attribute per case and all together, sent over a real association to a running node: the SEG
and SR arrive, are valid, carry the value the module's rule gives, and the node's log names the
attribute's keyword and not the bad value.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from converters.dicom_series import load_series
from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import job_queue
from db.card import TASK_LABELS
from node import dimse
from node.config import Destination
from node.seg import build_seg
from node.sender import store_files
from node.source_attributes import COPIED_ATTRIBUTES, clean_sources
from node.sr import build_sr
from tests.helpers.node import CatchingSCP, make_threshold_model, node_settings, running_node
from tests.helpers.peers import dciodvfy_problems
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

ABSENT = None
OMITTED = "<omitted>"

#: keyword -> (bad value or ABSENT, value expected in the SEG and SR or OMITTED).
BAD: dict[str, tuple[str | None, str]] = {
    "PatientSex": ("0000", ""),
    "PatientName": ("ONECOMPONENT", "ONECOMPONENT^"),
    "PatientBirthDate": ("2023", ""),
    "StudyID": (ABSENT, ""),
    "AccessionNumber": ("ACC" + "7" * 17, ""),
    "PatientID": (ABSENT, ""),
    "StudyDate": ("00000000", ""),
    "StudyTime": ("99", ""),
    "ReferringPhysicianName": ("R" * 70 + "^DR", "R" * 61 + "^DR"),
    "StudyDescription": ("HEAD " + "D" * 80, ("HEAD " + "D" * 80)[:64]),
    "PatientAge": ("45 years", OMITTED),
    "PatientSexNeutered": ("maybe", ""),
}
MORE_BAD: dict[str, tuple[str | None, str]] = {
    # the same attributes, bad in another way
    "PatientSex": ("male", "M"),
    "PatientBirthDate": ("00000000", ""),
    "StudyID": ("S" * 20, ""),
    "PatientID": ("P" * 70, ""),
    "PatientName": ("N" * 70 + "^GIVEN", "N" * 58 + "^GIVEN"),
    "StudyDate": ("20230231", ""),
}
CASES = [pytest.param({k: v}, id=k) for k, v in BAD.items()] + [
    pytest.param({k: v}, id=f"{k}-2") for k, v in MORE_BAD.items()
] + [
    # a backslash in a single-valued attribute: pydicom reads two values (a value multiplicity error)
    pytest.param({"PatientID": ("12\\34", "12 34")}, id="PatientID-backslash"),
    # an empty Type 3 sequence, as the real Philips series carries (dciodvfy: Bad Sequence number of Items)
    pytest.param({"ProcedureCodeSequence": ([], OMITTED)}, id="ProcedureCodeSequence-empty"),
]


def _set_bad(ds: Dataset, keyword: str, value: str | bytes | None) -> None:
    """Set ``keyword`` to ``value``; bytes are written as they are (a value pydicom cannot convert)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None
    if value is ABSENT:
        if tag in ds:
            del ds[tag]
        return
    if isinstance(value, bytes):
        ds[tag] = RawDataElement(BaseTag(tag), dictionary_VR(tag), len(value), value, 0, False, True)
        return
    ds[tag] = DataElement(tag, dictionary_VR(tag), value)


def _write_bad_study(out: Path, bad: dict[str, tuple[str | None, str]]) -> list[Path]:
    """A FLAIR series whose every file carries the bad values (pydicom told not to object)."""
    case = make_synthetic_case(5, shape=(64, 64, 12))
    files = write_study(case, out, modalities=["FLAIR"]).files["FLAIR"]
    saved = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for path in files:
                ds = pydicom.dcmread(path)
                for keyword, (value, _) in bad.items():
                    _set_bad(ds, keyword, value)
                ds.save_as(path, enforce_file_format=True)
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = saved
    return files


def _strictly_read(ds: Dataset) -> Dataset:
    """``ds`` written and read back with pydicom's strict validation: every value valid for its VR."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    saved = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        for element in read.iterall():
            _ = element.value
    finally:
        config.settings.reading_validation_mode = saved
    return read


@pytest.fixture()
def node_outputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    """A function: send a bad study to a running node, return the SEG and SR it sends."""
    catcher = CatchingSCP().start(free_port())
    model_dir = make_threshold_model(tmp_path / "model", crop=(64, 64))
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    )

    def run(bad: dict[str, tuple[str | None, str]]) -> tuple[Dataset, Dataset]:
        files = _write_bad_study(tmp_path / "study", bad)
        caplog.set_level(logging.INFO)
        with running_node(settings, model_dir) as node:
            results = store_files(files, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
            assert {status for _, status, _ in results} == {dimse.SUCCESS}
            ended = ("done", "failed", "skipped")
            job = wait_until(
                lambda: next((j for j in job_queue.list_jobs(node.sf) if j.status in ended), None),
                90,
                "the job",
            )
            assert job.status == "done", job.reason
            received = catcher.wait_for(lambda r: {d.Modality for d in r} >= {"SEG", "SR"}, 60)
        seg = next(d for d in received if d.Modality == "SEG")
        sr = next(d for d in received if d.Modality == "SR")
        return seg, sr

    try:
        yield run
    finally:
        catcher.stop()


@pytest.mark.parametrize(
    "bad", [*CASES, pytest.param({**BAD, **{k: v for k, v in MORE_BAD.items() if k not in BAD}}, id="all")]
)
def test_bad_source_attribute_is_corrected_and_logged_by_keyword(
    bad: dict[str, tuple[str | None, str]], node_outputs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    seg, sr = node_outputs(bad)
    seg, sr = _strictly_read(seg), _strictly_read(sr)
    read = hd.seg.Segmentation.from_dataset(seg)
    assert read.number_of_segments == 1
    hd.sr.Comprehensive3DSR.from_dataset(sr)
    ours = [r for r in caplog.records if r.name == "node.source_attributes"]
    for keyword, (value, expected) in bad.items():
        for out in (seg, sr):
            if expected == OMITTED:
                assert keyword not in out, f"{out.Modality} {keyword}"
            else:
                assert keyword in out, f"{out.Modality} {keyword}"
                assert str(out[keyword].value or "") == expected, f"{out.Modality} {keyword}"
        lines = [r.getMessage() for r in ours if f" {keyword} " in r.getMessage()]
        assert lines, f"no log line names {keyword}"
        if value:
            assert all(value not in line for line in lines), lines
    assert all("value not logged" in r.getMessage() for r in ours)


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
KOREAN = "Hong^Gildong=洪^吉洞=홍^길동"

#: id -> (the source's SpecificCharacterSet, its PatientName, the SpecificCharacterSet of the outputs;
#: None: absent, the default repertoire).
CHARACTER_SETS: dict[str, tuple[str | list[str] | None, str, str | list[str] | None]] = {
    # no SpecificCharacterSet (the default repertoire, ASCII) and a Latin-1 name, as older scanners
    # and anonymisers write it: the outputs cannot carry it in the default repertoire
    "default-with-latin1-bytes": (ABSENT, "Müller^Jürgen", "ISO_IR 192"),
    # PS3.5 Annex H's own form: value 1 empty means ISO 2022 IR 6; highdicom refuses the empty value
    "japanese-empty-first": (["", "ISO 2022 IR 87"], JAPANESE, ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    "japanese": (["ISO 2022 IR 6", "ISO 2022 IR 87"], JAPANESE, ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    # a single value with code extensions: the same repertoire without them
    "latin1-extensions": ("ISO 2022 IR 100", "Müller^Jürgen", "ISO_IR 100"),
    "default-extensions": ("ISO 2022 IR 6", "Smith^John", None),
    # a set highdicom 0.28.2 does not know (Korean), and a misspelled one pydicom still reads
    "korean": (["", "ISO 2022 IR 149"], KOREAN, "ISO_IR 192"),
    "misspelled-latin1": ("ISO-IR 100", "Müller^Jürgen", "ISO_IR 192"),
    "utf8": ("ISO_IR 192", "Łukasz^Żółć", "ISO_IR 192"),
    "chinese": ("GB18030", "王^小东", "GB18030"),
}


@pytest.mark.parametrize("charset, name, expected", CHARACTER_SETS.values(), ids=list(CHARACTER_SETS))
def test_the_outputs_carry_the_patients_name_in_a_character_set_they_can_be_written_in(
    charset: str | list[str] | None,
    name: str,
    expected: str | list[str] | None,
    node_outputs: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seg, sr = node_outputs({"SpecificCharacterSet": (charset, ""), "PatientName": (name, "")})
    for out in (_strictly_read(seg), _strictly_read(sr)):
        assert str(out.PatientName) == name, out.Modality
        carried = out.get("SpecificCharacterSet")
        assert (list(carried) if isinstance(carried, MultiValue) else carried) == expected, out.Modality
    logged = [r.getMessage() for r in caplog.records if r.name == "node.source_attributes"]
    changed = expected != charset
    assert any(" SpecificCharacterSet " in m for m in logged) == changed, logged
    assert not any(part in m for m in logged for part in name.replace("=", "^").split("^")), logged


def test_a_new_character_set_with_values_pydicom_cannot_convert(node_outputs: Any) -> None:
    """Text is decoded before the set changes; a value that cannot be converted (DS 'abc') does not
    stop that, and is omitted by its own rule."""
    seg, sr = node_outputs(
        {
            "SpecificCharacterSet": (["", "ISO 2022 IR 87"], ""),
            "PatientName": (JAPANESE, ""),
            "PatientWeight": (b"abc ", ""),
        }
    )
    for out in (_strictly_read(seg), _strictly_read(sr)):
        assert str(out.PatientName) == JAPANESE
        assert "PatientWeight" not in out


def test_cleaning_leaves_the_sources_untouched(tmp_path: Path) -> None:
    files = _write_bad_study(tmp_path / "study", BAD)
    before = [path.read_bytes() for path in files]
    sources = [pydicom.dcmread(p) for p in files]
    cleaned = clean_sources(sources)
    assert cleaned[0].PatientSex == "" and cleaned[0].PatientName == "ONECOMPONENT^"
    assert sources[0]["PatientSex"].value == "0000" and "StudyID" not in sources[0]
    assert cleaned[0].PixelData is sources[0].PixelData
    assert [path.read_bytes() for path in files] == before


def test_copied_attributes_are_the_modules_highdicom_copies() -> None:
    """The module's list is highdicom's: an upgrade that copies more shows here."""
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map

    modules = get_module_attribute_map()
    expected = {
        str(item["keyword"])
        for module in get_iod_module_map()["mr-image"]
        if module["ie"] in ("Patient", "Study")
        for item in modules[module["key"]]
        if not item["path"]
    }
    assert set(COPIED_ATTRIBUTES) == expected


_INSTITUTION = "University Hospital of Somewhere, Department of Neuroradiology, Bldg 7"
_SOFTWARE = "syngo MR XA30 with a very long vendor build string that exceeds LO 64"
#: (keyword, value out of its VR's range, value expected in the outputs' acquisition-equipment item).
EQUIPMENT_BAD = [
    pytest.param("StationName", "MRC40123-PRISMA-3T-X", "MRC40123-PRISMA-", id="StationName"),  # SH: 16
    pytest.param("InstitutionName", _INSTITUTION, _INSTITUTION[:64].rstrip(), id="InstitutionName"),  # LO
    pytest.param("SoftwareVersions", _SOFTWARE, _SOFTWARE[:64].rstrip(), id="SoftwareVersions"),
    pytest.param("AcquisitionDateTime", "20231301999999", OMITTED, id="AcquisitionDateTime"),  # month 13
    # no 30 February, though the DT pattern matches (pydicom's own check passes it)
    pytest.param("AcquisitionDateTime", "20230230120000", OMITTED, id="AcquisitionDateTime-2"),
    pytest.param("DeviceSerialNumber", "SN" + "4" * 66, OMITTED, id="DeviceSerialNumber"),  # never cut
]


@pytest.mark.parametrize("keyword, value, expected", EQUIPMENT_BAD)
def test_an_equipment_attribute_out_of_range_leaves_the_scanner_named_in_the_seg_and_sr(
    keyword: str, value: str, expected: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """highdicom builds the outputs' acquisition-equipment item (Contributing Equipment) from the first
    source and drops it silently when one of its values is invalid: the SEG and SR lost the scanner."""
    files = _write_bad_study(tmp_path / "study", {keyword: (value, expected)})
    datasets = [pydicom.dcmread(p) for p in files]
    volume = load_series(datasets)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    sources = [by_uid[uid] for uid in volume.sop_instance_uids]
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[4:7, 20:30, 20:30] = 1
    card = {"name": "test-model", "version": "1", "task": "whole_tumor", "labels": TASK_LABELS["whole_tumor"]}
    caplog.set_level(logging.INFO)
    seg = build_seg(sources, labels, card, software_version="test")
    sr = build_sr(seg, sources, [1.0], card)
    for out in (seg, sr):
        path = tmp_path / f"{out.Modality}.dcm"
        out.save_as(path, enforce_file_format=True)
        assert dciodvfy_problems(path) == [], out.Modality
        [item] = [
            e for e in pydicom.dcmread(path).ContributingEquipmentSequence
            if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"  # DCM Acquisition Equipment
        ]  # fmt: skip
        assert item.Manufacturer == sources[0].Manufacturer and item.Manufacturer, out.Modality
        if keyword == "AcquisitionDateTime":
            assert "ContributionDateTime" not in item, out.Modality
        elif expected == OMITTED:
            assert keyword not in item, out.Modality
        else:
            assert str(item[keyword].value) == expected, out.Modality
    lines = [r.getMessage() for r in caplog.records if r.name == "node.source_attributes"]
    assert [m for m in lines if f" {keyword} " in m], lines
    assert not any(value in m for m in lines), lines
