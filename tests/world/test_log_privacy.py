"""No patient value reaches the node's log through a library (node/log_scrub.py).

``segnode --debug serve`` in a subprocess receives, over a real association, a study whose names,
IDs and dates carry marker strings and make pydicom, highdicom and pynetdicom warn; none of the
markers appears in what the node writes to stderr, and the SEG still comes back. Unit checks feed
the filter the libraries' own messages (highdicom's one-component-name warning, pydicom's invalid
value warning, pynetdicom's data set dump, a traceback).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pynetdicom.dsutils import pretty_dataset

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db.registry import open_registry
from node import dimse
from node.config import Destination
from node.log_scrub import LibraryValueFilter, install, scrub_text
from node.sender import store_files
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model
from tests.helpers.ports import free_port
from tests.helpers.served import ServedNode, node_toml

#: keyword -> a value with a marker no other log line can contain, invalid in a way a library reports.
MARKED = {
    "PatientName": "QZXNAMEONE",  # one component: highdicom's UserWarning prints it
    "PatientID": "QZXPATID" + "0" * 60,  # over-long LO
    "PatientBirthDate": "QZXBD",  # not a DA: pydicom's "Invalid value for VR DA: '...'"
    "OtherPatientIDs": "QZXOTHER",
    "AccessionNumber": "QZXACC" + "1" * 14,  # over-long SH
    "StudyDescription": "QZXDESC\\" + "D" * 70,
    "ReferringPhysicianName": "QZXREFERRER",
    "PatientSex": "QZXS",
}
MARKERS = ("QZXNAMEONE", "QZXPATID", "QZXBD", "QZXOTHER", "QZXACC", "QZXDESC", "QZXREFERRER", "QZXS")


def _marked_study(out: Path) -> list[Path]:
    files = write_study(make_synthetic_case(3, shape=(64, 64, 10)), out, modalities=["FLAIR"]).files["FLAIR"]
    saved = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for path in files:
                ds = pydicom.dcmread(path)
                for keyword, value in MARKED.items():
                    tag = tag_for_keyword(keyword)
                    assert tag is not None
                    ds[tag] = DataElement(tag, dictionary_VR(tag), value)
                ds.save_as(path, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = saved
    return files


def _served(tmp_path: Path, catcher_port: int) -> ServedNode:
    """``segnode --debug serve`` with the threshold model active and every Python warning shown."""
    model_dir = make_threshold_model(tmp_path / "model", crop=(64, 64))
    url = f"sqlite:///{tmp_path / 'node.db'}"
    install_model(open_registry(url), model_dir)
    port = free_port()
    config = node_toml(tmp_path, port, url, [Destination("pacs", "CATCHER", "127.0.0.1", catcher_port)])
    log = tmp_path / "serve.log"
    return ServedNode(config, tmp_path / "var", log, port, debug=True, env={"PYTHONWARNINGS": "always"})


@pytest.fixture()
def catcher() -> Iterator[CatchingSCP]:
    scp = CatchingSCP().start(free_port())
    yield scp
    scp.stop()


def test_no_marker_reaches_the_served_nodes_log(tmp_path: Path, catcher: CatchingSCP) -> None:
    files = _marked_study(tmp_path / "study")
    node = _served(tmp_path, catcher.port).start()
    try:
        results = store_files(files, "127.0.0.1", node.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {dimse.SUCCESS}
        received = catcher.wait_for(lambda r: {d.Modality for d in r} >= {"SEG", "SR"}, 120)
    finally:
        node.stop()
    text = node.log.read_text(errors="replace")
    seg = next(d for d in received if d.Modality == "SEG")
    assert hd.seg.Segmentation.from_dataset(seg).number_of_segments == 1
    assert str(seg.PatientName) == "QZXNAMEONE^"  # the values travel in the objects, not in the log
    assert "DEBUG pynetdicom" in text and "UserWarning" in text  # debug logging and warnings were on
    leaked = [marker for marker in MARKERS if marker in text]
    assert leaked == [], [line for line in text.splitlines() if any(m in line for m in leaked)][:10]


@pytest.fixture()
def scrubbed_log() -> Iterator[io.StringIO]:
    """A handler on the root logger, behind the installed filter, as ``segnode serve`` has."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    capture = logging.getLogger("py.warnings").propagate
    install()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # pytest records each test's warnings with its own showwarning. When an earlier test in this
            # process routed warnings into logging already (the demo, serve and the receivers call
            # install() and leave it on, as the node does for its life), install() above kept pytest's
            # recorder: route them into logging again.
            logging.captureWarnings(False)
            logging.captureWarnings(True)
            yield stream
    finally:
        root.removeHandler(handler)
        logging.captureWarnings(False)
        logging.getLogger("py.warnings").propagate = capture


def test_highdicom_one_component_name_warning_is_scrubbed(scrubbed_log: io.StringIO) -> None:
    _one_component_name_object()  # shown even when an earlier test raised it (the fixture's "always")
    text = scrubbed_log.getvalue()
    assert "UserWarning" in text and "single component" in text
    assert "QZXNAMEONE" not in text


def test_quoted_keywords_stay_and_quoted_values_go() -> None:
    line = scrub_text('copied attribute "PatientName"\nThe string "QZXNAMEONE" is unlikely')
    assert line == "copied attribute \"PatientName\"\nThe string '<scrubbed>' is unlikely"
    assert scrub_text("lacks required attribute \"PatientID\":\n(0010,0020) LO [X]") == (
        "lacks required attribute \"PatientID\":\n(0010,0020) LO <scrubbed>"
    )


def test_a_value_beginning_with_a_quoted_keyword_is_scrubbed_whole(scrubbed_log: io.StringIO) -> None:
    """highdicom's ``The string "PatientName" QZX "Y" is unlikely``: the value ``PatientName" QZX "Y``
    begins with a keyword and a quote; all of it goes, the message around it stays."""
    hd.valuerep.check_person_name('PatientName" QZXKEYWORD "Y')
    text = scrubbed_log.getvalue()
    assert "The string '<scrubbed>' is unlikely" in text and "QZXKEYWORD" not in text
    assert scrub_text('copied attribute "PatientName" x "Y"') == "copied attribute '<scrubbed>'"


def _one_component_name_object() -> None:
    hd.base.SOPClass(
        study_instance_uid=hd.UID(),
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        instance_number=1,
        modality="SEG",
        manufacturer="segnode",
        patient_name="QZXNAMEONE",
    )


def test_pydicom_invalid_value_warning_is_scrubbed(scrubbed_log: io.StringIO) -> None:
    ds = pydicom.Dataset()
    ds.PatientBirthDate = "QZXBD"
    text = scrubbed_log.getvalue()
    assert "Invalid value for VR DA" in text and "QZXBD" not in text


def test_pynetdicom_dataset_dump_keeps_tags_and_keywords_only(scrubbed_log: io.StringIO) -> None:
    ds = pydicom.Dataset()
    ds.PatientName = "QZXNAME^GIVEN"
    ds.PatientID = "QZXPATID"
    ds.OtherPatientIDs = ["QZXOTHER", "QZXTWO"]
    logger = logging.getLogger("pynetdicom.association")
    logger.setLevel(logging.DEBUG)
    try:
        for line in pretty_dataset(ds):
            logger.info(line)
    finally:
        logger.setLevel(logging.NOTSET)
    text = scrubbed_log.getvalue()
    assert "(0010,0010) PN <scrubbed> # 1 PatientName" in text
    assert "PatientID" in text and "OtherPatientIDs" in text and "QZX" not in text


def test_library_traceback_is_scrubbed(scrubbed_log: io.StringIO) -> None:
    try:
        raise ValueError("'QZXSEX' is not a valid PatientSexValues")
    except ValueError:
        logging.getLogger("highdicom.base").exception("failed")
    text = scrubbed_log.getvalue()
    assert "ValueError" in text and "QZXSEX" not in text


def test_scrub_text_rules() -> None:
    assert scrub_text("Invalid value for VR DA: '2023'.") == "Invalid value for VR DA: '<scrubbed>'."
    assert scrub_text('name "DOE" and [DOE^J] and key=DOE, x') == (
        "name '<scrubbed>' and [<scrubbed>] and key=<scrubbed>, x"
    )
    assert scrub_text("(0010,0020) LO [ID123]   # 1 PatientID") == "(0010,0020) LO <scrubbed> # 1 PatientID"
    record = logging.LogRecord("node.pipeline", logging.INFO, __file__, 1, "job %s: '%s'", ("1", "X"), None)
    assert LibraryValueFilter().filter(record) and record.getMessage() == "job 1: 'X'"  # ours: untouched


def test_highdicom_warning_inside_a_job_is_scrubbed(
    tmp_path: Path, catcher: CatchingSCP, scrubbed_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's symptom through the node: with the source attributes passed to highdicom as they
    are (the cleaning of node/source_attributes.py bypassed), highdicom's UserWarning about the
    one-component name is raised inside the job; the log still shows its text without the name."""
    from node import seg as seg_module
    from node import sr as sr_module
    from node.config import Destination
    from tests.helpers.node import node_settings, running_node

    monkeypatch.setattr(seg_module, "clean_sources", lambda sources, **_: list(sources))
    monkeypatch.setattr(sr_module, "clean_sources", lambda sources, **_: list(sources))
    files = write_study(make_synthetic_case(3, shape=(64, 64, 10)), tmp_path / "study", modalities=["FLAIR"])
    paths = files.files["FLAIR"]
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = "QZXNAMEONE"
        ds.save_as(path, enforce_file_format=True)
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    )
    with running_node(settings, make_threshold_model(tmp_path / "model", crop=(64, 64))) as node:
        results = store_files(paths, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {dimse.SUCCESS}
        catcher.wait_for(lambda r: any(d.Modality == "SEG" for d in r), 60)
    text = scrubbed_log.getvalue()
    assert "single component" in text  # the warning was raised and logged
    assert "QZXNAMEONE" not in text


def test_values_holding_quotes_or_line_breaks_are_scrubbed(scrubbed_log: io.StringIO) -> None:
    """pydicom's repr of a value holding both quotes (``'19\\'QZXLEAK"01'``), highdicom's ``"..."``
    around a name holding a double quote or a line break: the value goes, the message stays."""
    ds = pydicom.Dataset()
    ds.PatientBirthDate = "19'QZXLEAK\"01"
    hd.valuerep.check_person_name('O"QZXNAME2')
    hd.valuerep.check_person_name("O\nQZXLINE2")
    logging.getLogger("pydicom").warning("value %s", "'first line\nQZXLINE3")  # a quote that never closes
    text = scrubbed_log.getvalue()
    assert "Invalid value for VR DA" in text and text.count("single component") == 2
    assert [marker for marker in ("QZXLEAK", "QZXNAME2", "QZXLINE2", "QZXLINE3") if marker in text] == []


def test_quoted_values_run_to_the_last_same_quote() -> None:
    assert scrub_text("Invalid value for VR DA: '19\\'X\"01'.") == "Invalid value for VR DA: '<scrubbed>'."
    assert scrub_text('attribute "PatientName":\n "O"X^A" is unlikely') == (
        "attribute \"PatientName\":\n '<scrubbed>' is unlikely"
    )
    assert scrub_text("value 'a\nQZX\nb' (0010,0010)\nnext [c]") == (
        "value '<scrubbed>' (0010,0010)\nnext [<scrubbed>]"
    )
    assert scrub_text('line "one"\n  File "x.py", line 3') == "line '<scrubbed>'\n  File '<scrubbed>', line 3"
