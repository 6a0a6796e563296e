"""Bad input against a running node: each test sends something broken, then checks that the node
refused it with a clear log line, kept nothing of it, and still serves and processes a good study.

What node/test_scp.py already covers (bad Study/Series UIDs, missing pixel data over pynetdicom,
calling AE over pynetdicom, a missing slice) is covered here only where a real peer (DCMTK) or a new
angle (the bad instance in the middle of a good association) adds something.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from converters.case import Case
from converters.synthetic import make_synthetic_case
from db import job_queue
from db.node_tables import NodeInstance
from node import dimse, reactor
from node.config import Destination
from node.service import NodeService
from tests.helpers.dcmtk import run_tool, storescu
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.peers import require_program
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.helpers.world import World as BaseWorld

SHAPE = (48, 48, 16)


@pytest.fixture(scope="module")
def case() -> Case:
    return make_synthetic_case(21, SHAPE)


class World(BaseWorld):
    """The bad-input world: the node's instance rows, and a check that it still serves."""

    def rows(self, sop_uid: str) -> list[NodeInstance]:
        from sqlalchemy import select

        with self.node.sf() as s:
            return list(s.scalars(select(NodeInstance).where(NodeInstance.sop_instance_uid == sop_uid)))

    def still_serves(self, name: str) -> None:
        """A good study sent now is processed and its SEG delivered: the node lost nothing."""
        study = self.study(name)
        result = storescu(self.port, study.files["FLAIR"])
        assert result.returncode == 0, result.stdout + result.stderr
        job = self.job(study.study_instance_uid)
        assert job.status == "done", job.reason
        assert job.instance_count == SHAPE[2]
        self.catcher.wait_for(
            lambda r: any(
                ds.Modality == "SEG" and ds.StudyInstanceUID == study.study_instance_uid for ds in r
            ),
            30,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, case: Case) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("badinput")
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(tmp, free_port(), [catcher_destination(catcher)])
    settings.node.allowed_calling_aes = ["PACS"]
    node = NodeService(settings)
    model_dir = make_threshold_model(tmp / "model", crop=SHAPE[:2], spacing=case.spacing)
    install_model(node.registry, model_dir)
    node.start()
    try:
        yield World(node, catcher, tmp, case, model_dir)
    finally:
        node.stop()
        catcher.stop()


def catcher_destination(catcher: CatchingSCP) -> Destination:
    return Destination("pacs", catcher.ae_title, "127.0.0.1", catcher.port)


def _send_raw_files(port: int, paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """C-STORE each file's bytes after its file meta exactly as they are (no decoding on our side)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
    assoc = reactor.associate(ae, "127.0.0.1", port, "SEGNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def test_bytes_that_are_not_dicom_on_the_socket(world: World) -> None:
    """Junk connections (HTTP, random bytes, an A-ASSOCIATE-RQ header with a nonsense length) are held
    open while a real PACS sends a study: the node serves it; then the junk goes away."""
    junk = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096), b"\x01\x00" + b"\xff" * 64]
    sockets = [socket.create_connection(("127.0.0.1", world.port), timeout=5) for _ in junk]
    try:
        for s, data in zip(sockets, junk, strict=True):
            s.sendall(data)
        world.still_serves("after-junk")
    finally:
        for s in sockets:
            s.close()
    world.still_serves("after-junk-closed")


@pytest.mark.parametrize("damage", ["not-dicom", "truncated-header", "truncated-pixels", "short-pixel-data"])
def test_broken_instance_in_a_good_association(
    world: World, damage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    study = world.study(f"broken-{damage}")
    files = study.files["FLAIR"]
    source = pydicom.dcmread(files[5])
    raw = files[5].read_bytes()
    _, offset = split_dataset(files[5])
    bad = world.tmp / f"{damage}.dcm"
    if damage == "not-dicom":
        bad.write_bytes(raw[:offset] + np.random.default_rng(0).bytes(3000))
    elif damage == "truncated-header":
        bad.write_bytes(raw[: offset + 120])
    elif damage == "truncated-pixels":
        bad.write_bytes(raw[: offset + (len(raw) - offset) * 2 // 3])
    else:
        ds = copy.deepcopy(source)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(bad, enforce_file_format=True)
    sent = [*files[:5], bad, *files[6:]]
    with caplog.at_level(logging.WARNING, logger="node.scp"):
        statuses = _send_raw_files(world.port, sent, monkeypatch)
    assert statuses[5] == dimse.CANNOT_UNDERSTAND
    assert statuses[:5] + statuses[6:] == [dimse.SUCCESS] * (len(files) - 1)
    expected = {
        "not-dicom": "SOPInstanceUID '' is not a valid DICOM UID",
        "truncated-header": "SOPInstanceUID '' is not a valid DICOM UID",
        "truncated-pixels": f"instance {source.SOPInstanceUID}: PixelData is ",
        "short-pixel-data": f"instance {source.SOPInstanceUID}: PixelData is {len(source.PixelData) // 2} "
        "bytes "
        f"but Rows {SHAPE[1]} x Columns {SHAPE[0]} x BitsAllocated 16 x NumberOfFrames 1 needs "
        f"{len(source.PixelData)} (truncated)",
    }[damage]
    assert expected in caplog.text
    assert world.rows(str(source.SOPInstanceUID)) == []
    # The PACS keeps its copy and sends the good instance again: the study completes (if the study
    # went idle before the retry, the first run fails for the missing slice and a second run is done).
    assert _send_raw_files(world.port, [files[5]], monkeypatch) == [dimse.SUCCESS]

    def complete() -> job_queue.JobInfo | None:
        return next(
            (
                j
                for j in job_queue.list_jobs(world.node.sf)
                if j.study_instance_uid == study.study_instance_uid
                and j.status == "done"
                and j.instance_count == SHAPE[2]
            ),
            None,
        )

    wait_until(complete, 60, "a run over the whole study")
    segs = world.catcher.wait_for(
        lambda r: any(ds.get("StudyInstanceUID") == study.study_instance_uid for ds in r), 30
    )
    assert sum(ds.Modality == "SEG" and ds.StudyInstanceUID == study.study_instance_uid for ds in segs) == 1


def test_missing_pixel_data_from_dcmtk(world: World, caplog: pytest.LogCaptureFixture) -> None:
    study = world.study("nopixels")
    ds = pydicom.dcmread(study.files["FLAIR"][0])
    del ds.PixelData
    bad = world.tmp / "nopixels.dcm"
    ds.save_as(bad, enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="node.scp"):
        result = storescu(world.port, [bad], extra=["-v"])
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr
    assert f"instance {ds.SOPInstanceUID}: no PixelData" in caplog.text
    assert world.rows(str(ds.SOPInstanceUID)) == []
    world.still_serves("after-nopixels")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("uid", ["1.2.3/../../../tmp/x", "1.2." + "3" * 70, "1.2.3\\evil"])
def test_sop_instance_uid_with_path_characters_or_too_long(
    world: World, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    """DCMTK sends such UIDs as they are (pynetdicom refuses to); the node refuses them."""
    study = world.study(f"baduid-{len(uid)}-{uid[5:7].strip('/.')}")
    ds = pydicom.dcmread(study.files["FLAIR"][0])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    bad = world.tmp / "baduid.dcm"
    ds.save_as(bad, enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="node.scp"):
        result = storescu(world.port, [bad], extra=["-v"])
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr
    refused = [r.getMessage() for r in caplog.records if r.name == "node.scp"]
    # A value with other characters than digits and dots is described, never logged (it may be an ID);
    # a backslash makes the value multi-valued: the request's UID is its first value, the data set's a list.
    if set(uid) <= set("0123456789."):
        assert any(f"SOPInstanceUID {uid!r} is not a valid DICOM UID" in m for m in refused), refused
    else:
        assert any("SOPInstanceUID of " in m and "(not shown" in m for m in refused), refused
        assert not any(uid in m or "evil" in m for m in refused), refused
    assert world.rows(uid) == []
    spool = world.node.settings.node.spool_path()
    assert not Path("/tmp/x").exists() or not Path("/tmp/x").is_file()
    assert all(p.resolve().is_relative_to(spool.resolve()) for p in spool.rglob("*"))
    assert not any(uid[:20] in str(p) for p in spool.rglob("*"))


def test_objects_the_node_does_not_use_are_acknowledged_never_processed(world: World) -> None:
    """Our own SEG and SR coming back (a PACS forwarding everything) are acknowledged, never a job."""
    study = world.study("loop")
    assert storescu(world.port, study.files["FLAIR"]).returncode == 0
    job = world.job(study.study_instance_uid)
    assert job.status == "done", job.reason
    jobs_before = len(job_queue.list_jobs(world.node.sf))
    # -R: propose only the files' own classes (storescu's default list has no SEG class).
    result = storescu(world.port, [Path(job.result["seg"]), Path(job.result["sr"])], extra=["-R"])
    assert result.returncode == 0, result.stdout + result.stderr
    for key in ("seg", "sr"):
        uid = str(pydicom.dcmread(job.result[key], stop_before_pixels=True).SOPInstanceUID)
        [row] = world.rows(uid)
        assert not row.kept and row.path is None
    ended = ("done", "failed", "skipped")
    wait_until(lambda: job_queue.list_jobs(world.node.sf)[0].status in ended, 10, "idle")
    assert len(job_queue.list_jobs(world.node.sf)) == jobs_before  # no routing loop


def _mixed_size(files: list[Path]) -> None:
    ds = pydicom.dcmread(files[3])
    ds.Rows, ds.Columns = 32, 32
    ds.PixelData = np.zeros((32, 32), np.uint16).tobytes()
    ds.save_as(files[3], enforce_file_format=True)


def _mixed_orientation(files: list[Path]) -> None:
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(files[3], enforce_file_format=True)


def _duplicate_position(files: list[Path]) -> None:
    ds = pydicom.dcmread(files[3])
    ds.ImagePositionPatient = pydicom.dcmread(files[4]).ImagePositionPatient
    ds.save_as(files[3], enforce_file_format=True)


def _missing_slice(files: list[Path]) -> None:
    files[7].unlink()


@pytest.mark.parametrize(
    ("name", "damage", "reason"),
    [
        ("mixed-sizes", _mixed_size, "mixed sizes: Rows x Columns 32x32 in "),
        # One image of another orientation is a stack of its own (serving no role: one image); the axial
        # stack it leaves has a gap where it was.
        ("mixed-orientations", _mixed_orientation, "axial stack (AX FLAIR, 15 slices): series "),
        ("duplicate-positions", _duplicate_position, "duplicate positions: "),
        ("missing-slice", _missing_slice, "missing slices (uneven gaps): gap of "),
    ],
)
def test_inconsistent_series_fails_with_its_reason_and_the_node_goes_on(
    world: World, name: str, damage: object, reason: str
) -> None:
    study = world.study(name)
    files = study.files["FLAIR"]
    damage(files)  # type: ignore[operator]
    result = storescu(world.port, [p for p in files if p.exists()])
    assert result.returncode == 0, result.stdout + result.stderr
    job = world.job(study.study_instance_uid)
    assert job.status == "failed"
    assert job.reason.startswith(f"FLAIR series {study.series_uids['FLAIR']} "), job.reason
    assert "(AX FLAIR, " in job.reason and reason in job.reason, job.reason
    if name == "mixed-orientations":
        assert "missing slices (uneven gaps): gap of " in job.reason, job.reason
    assert not any(ds.StudyInstanceUID == study.study_instance_uid for ds in world.catcher.received)
    world.still_serves(f"after-{name}")


def test_unknown_calling_ae_from_dcmtk_is_rejected(world: World, caplog: pytest.LogCaptureFixture) -> None:
    echoscu = require_program("echoscu")
    with caplog.at_level(logging.WARNING, logger="node.scp"):
        refused = run_tool([echoscu, "-aet", "INTRUDER", "-aec", "SEGNODE", "127.0.0.1", str(world.port)], 30)
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    assert (
        "(calling AE 'INTRUDER', called AE 'SEGNODE') rejected: calling AE title not allowed" in caplog.text
    )
    study = world.study("intruder")
    sent = storescu(world.port, study.files["FLAIR"][:3], calling="INTRUDER")
    assert sent.returncode != 0
    assert job_queue.list_jobs(world.node.sf, limit=1000) == [
        j
        for j in job_queue.list_jobs(world.node.sf, limit=1000)
        if j.study_instance_uid != study.study_instance_uid
    ]
    ok = run_tool([echoscu, "-aet", "PACS", "-aec", "SEGNODE", "127.0.0.1", str(world.port)], 30)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_corrupt_model_is_refused_and_the_previous_keeps_serving(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A model whose files match their sha256 but are not a model (corrupt at export): refused."""
    import hashlib

    corrupt = make_threshold_model(
        world.tmp / "corrupt", version="9.9.9", crop=SHAPE[:2], spacing=world.case.spacing
    )
    xml = corrupt / "model_fp32.xml"
    xml.write_bytes(b"<?xml version='1.0'?><net name='x' version='11'><layers><layer id='0' type='Nope'/>")
    card = json.loads((corrupt / "model.json").read_text())
    entry = card["artifacts"][0]["files"][0]
    entry["sha256"], entry["size"] = hashlib.sha256(xml.read_bytes()).hexdigest(), xml.stat().st_size
    (corrupt / "model.json").write_text(json.dumps(card))
    serving = world.node.runtime.current
    assert serving is not None
    with caplog.at_level(logging.ERROR, logger="node.runtime"):
        promoted = install_model(world.node.registry, corrupt)
        study = world.study("after-corrupt-model")
        assert storescu(world.port, study.files["FLAIR"]).returncode == 0
        job = world.job(study.study_instance_uid)
    assert job.status == "done", job.reason
    assert job.model_label == serving.label
    assert f"model #{promoted.id} test-threshold 9.9.9" in caplog.text
    assert f"OpenVINO cannot read model file {xml}" in caplog.text
    assert "keeping the previous model" in caplog.text
    ok, details = world.node.health()
    assert ok and details["model"] == serving.label and "cannot read model file" in details["model_error"]
    # Put the good model back for the other tests of the module.
    world.node.registry.promote(serving.info.id, by="test", reason="back to the good model")


def test_a_pdu_header_announcing_bytes_never_sent_does_not_hold_a_slot(tmp_path: Path) -> None:
    """Found here: an A-ASSOCIATE-RQ header claiming 4 GiB held its association (and thread) for good:
    accepted sockets had no read timeout. Now the node's network_timeout closes it."""
    import time

    from db.session import make_engine, make_session_factory, upgrade
    from node.metrics import NodeMetrics
    from node.scp import StorageSCP

    settings = node_settings(tmp_path, free_port())
    settings.node.max_associations = 1
    upgrade(settings.database.url)
    scp = StorageSCP(settings.node, make_session_factory(make_engine(settings.database.url)), NodeMetrics())
    scp.ae.network_timeout = scp.ae.acse_timeout = 1.0  # the association's thread ends on ARTIM expiry
    scp.start()
    try:
        with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as s:
            s.sendall(b"\x01\x00" + b"\xff" * 64)
            start = time.monotonic()
            try:
                while s.recv(4096):
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
            held = time.monotonic() - start
        assert held < 5, f"the junk connection was held {held:.1f} s"
        from tests.helpers.served import echo_ok

        # max_associations is 1: an echo works once the junk's slot is free again.
        wait_until(lambda: echo_ok(scp.port), 10, "the slot freed")
    finally:
        scp.stop()
