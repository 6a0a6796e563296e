"""Each output has its own outcome at a destination (node/sender.py), over real sockets and a real
database: a Warning status is a delivery, a SOP Class the PACS does not take holds back only that
object, an unreadable output holds back only itself, and a PACS that stops answering mid-way leaves
every send marked with why and when it is tried again (not leased and resent without a trace)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import instances, job_queue, retention, send_queue
from db.send_queue import SendInfo
from db.transactions import SessionFactory, utcnow
from node import dimse
from node import sender as sender_module
from node.config import Destination
from node.metrics import NodeMetrics
from node.sender import Sender, requested_contexts, store_files
from node.service import NodeService
from tests.helpers.cli import run_cli
from tests.helpers.node import CatchingSCP, make_threshold_model, node_settings, running_node
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SHAPE = (48, 48, 12)
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture()
def sf(sqlite_sf: SessionFactory) -> SessionFactory:
    return sqlite_sf


def _object(path: Path, sop_class: str) -> job_queue.OutputObject:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SEG" if sop_class == SEG_STORAGE else "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return job_queue.OutputObject(str(path), str(ds.SOPInstanceUID))


def _done_job(sf: SessionFactory, out: Path, n: int, pacs: CatchingSCP) -> int:
    """A finished job of study ``n`` whose SEG and SR wait to be sent to ``pacs``."""
    study = f"1.2.826.0.1.3680043.8.498.{n}"
    now = utcnow()
    instances.record_instances(
        sf,
        [instances.ReceivedInstance(
            sop_instance_uid=f"{study}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            study_instance_uid=study, series_instance_uid=f"{study}.2", kept=True,
            path=f"/spool/{study}.dcm", calling_ae="PACS",
        )],
        now=now - timedelta(minutes=2),
    )  # fmt: skip
    instances.schedule_due_studies(sf, 10, now=now - timedelta(minutes=1))
    job_id = job_queue.claim_job(sf)
    assert job_id is not None
    folder = out / f"job{n}"
    outputs = [_object(folder / "seg.dcm", SEG_STORAGE), _object(folder / "sr.dcm", COMPREHENSIVE_SR)]
    destination = SimpleNamespace(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port)
    assert job_queue.finish_job(sf, job_id, status="done", outputs=outputs, destinations=[destination])
    return job_id


def _sends(sf: SessionFactory, job_id: int) -> dict[str, SendInfo]:
    return {Path(s.path).name: s for s in job_queue.get_job(sf, job_id).sends}


@pytest.fixture()
def pacs_factory() -> Iterator[list[CatchingSCP]]:
    started: list[CatchingSCP] = []
    yield started
    for scp in started:
        scp.stop()


def _pacs(started: list[CatchingSCP], **options: object) -> CatchingSCP:
    scp = CatchingSCP(**options).start(free_port())  # type: ignore[arg-type]
    started.append(scp)
    return scp


def _sender(
    sf: SessionFactory, timeout: float = 10.0, backoff: float = 60.0, max_refusals: int = 10
) -> Sender:
    return Sender(
        sf, NodeMetrics(), "SEGNODE", base_seconds=backoff, max_seconds=backoff, timeout=timeout,
        max_refusals=max_refusals,
    )


def test_a_warning_status_is_a_delivery_and_stays_on_the_send(
    sf: SessionFactory,
    tmp_path: Path,
    pacs_factory: list[CatchingSCP],
    caplog: pytest.LogCaptureFixture,
    segnode_home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pacs = _pacs(pacs_factory, status=0xB000)  # Warning: coercion of data elements; stored
    job = _done_job(sf, tmp_path, 1, pacs)
    sender = _sender(sf)
    with caplog.at_level(logging.WARNING, logger="node.sender"):
        assert sender.run_once() == 2
    warning = "stored with status 0xB000 (Warning: coercion of data elements)"
    assert {(s.status, s.last_error) for s in _sends(sf, job).values()} == {("done", warning)}
    assert "delivered to pacs with status 0xB000 (Warning: coercion of data elements)" in caplog.text
    assert sender.run_once() == 0 and len(pacs.received) == 2  # never sent again
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "segnode.db"}"\n')
    show = ["jobs", "show", str(job), "--config", str(config)]
    code, out, _ = run_cli([*show, "--json"], capsys, monkeypatch)
    assert code == 0 and {s["last_error"] for s in json.loads(out)["sends"]} == {warning}
    code, out, _ = run_cli(show, capsys, monkeypatch)
    assert code == 0 and out.count("0xB000") == 2  # a Rich table, wrapped at 80 columns here


def test_a_pacs_that_accepts_only_implicit_vr_gets_the_seg_and_sr(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP]
) -> None:
    """The SEG and SR files are Explicit VR Little Endian; a PACS that accepts only Implicit VR Little
    Endian (the DICOM default, ``storescp +xi``) gets them re-encoded, from the sender and from
    ``store_files`` (``segnode send``)."""
    pacs = _pacs(pacs_factory, transfer_syntaxes=[ImplicitVRLittleEndian])
    job = _done_job(sf, tmp_path, 1, pacs)
    assert _sender(sf).run_once() == 2
    assert {s.status for s in _sends(sf, job).values()} == {"done"}
    assert sorted(ds.Modality for ds in pacs.received) == ["SEG", "SR"]
    assert {ds.file_meta.TransferSyntaxUID for ds in pacs.received} == {ImplicitVRLittleEndian}
    files = [tmp_path / "job1" / "seg.dcm", tmp_path / "job1" / "sr.dcm"]
    results = store_files(files, "127.0.0.1", pacs.port, pacs.ae_title)
    assert [(status, error) for _, status, error in results] == [(0, ""), (0, "")]


def test_uncompressed_objects_are_offered_in_both_little_endian_syntaxes_compressed_in_their_own() -> None:
    mr = "1.2.840.10008.5.1.4.1.1.4"
    assert requested_contexts([
        (SEG_STORAGE, ExplicitVRLittleEndian), (mr, JPEG2000Lossless), (mr, ImplicitVRLittleEndian),
    ]) == [
        (mr, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
        (mr, [JPEG2000Lossless]),
        (SEG_STORAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]  # fmt: skip


def test_a_pacs_without_seg_storage_still_gets_the_sr(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP]
) -> None:
    pacs = _pacs(pacs_factory, sop_classes={COMPREHENSIVE_SR})
    job = _done_job(sf, tmp_path, 1, pacs)
    assert _sender(sf).run_once() == 1
    sends = _sends(sf, job)
    assert sends["sr.dcm"].status == "done" and [ds.Modality for ds in pacs.received] == ["SR"]
    assert sends["seg.dcm"].status == "pending"
    assert "not accepted by the destination" in sends["seg.dcm"].last_error


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_an_unreadable_output_holds_back_only_itself(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP], damage: str
) -> None:
    pacs = _pacs(pacs_factory)
    first, second = _done_job(sf, tmp_path, 1, pacs), _done_job(sf, tmp_path, 2, pacs)
    seg = tmp_path / "job1" / "seg.dcm"
    if damage == "missing":
        seg.unlink()
    else:  # pydicom reads the file meta and stops: no SOP Class UID
        seg.write_bytes(seg.read_bytes()[:200])
    assert _sender(sf).run_once() == 3
    assert _sends(sf, first)["seg.dcm"].status == "pending"
    assert "cannot read the file" in _sends(sf, first)["seg.dcm"].last_error
    assert _sends(sf, first)["sr.dcm"].status == "done"
    assert {s.status for s in _sends(sf, second).values()} == {"done"}


def test_a_pacs_that_stops_answering_leaves_each_send_marked_with_why(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP]
) -> None:
    pacs = _pacs(pacs_factory, stall_seconds=4.0)  # answers its first C-STORE after the sender gave up
    job = _done_job(sf, tmp_path, 1, pacs)
    started = utcnow()
    assert _sender(sf, timeout=1.0).run_once() == 0  # no exception: every send has its outcome
    sends = _sends(sf, job)
    assert {s.status for s in sends.values()} == {"pending"}
    assert all(s.attempts == 1 for s in sends.values())
    assert "no response within the DIMSE timeout" in sends["seg.dcm"].last_error
    assert sends["sr.dcm"].last_error.startswith("not sent:")
    # Backed off (60 s here), not left on the 120 s lease to be resent without a trace.
    assert all(s.next_attempt_at >= started + timedelta(seconds=55) for s in sends.values())


def test_a_send_refused_for_good_ends_refused_and_a_down_pacs_is_tried_for_ever(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP], caplog: pytest.LogCaptureFixture
) -> None:
    """A PACS without SEG Storage: the first association carries both objects (the SR goes, the SEG is
    not accepted), the next offers the SEG alone and is accepted without a presentation context. After
    ``max_refusals`` such refusals the SEG send ends ``refused``, is not tried again, and no longer
    holds the study in the spool; a destination that does not answer at all is retried for ever."""
    pacs = _pacs(pacs_factory, sop_classes={COMPREHENSIVE_SR})
    job = _done_job(sf, tmp_path, 1, pacs)
    sender = _sender(sf, backoff=0.0, max_refusals=2)
    with caplog.at_level(logging.ERROR, logger="node.sender"):
        assert sender.run_once() == 1  # the SR
        assert sender.run_once() == 0  # the SEG alone: no presentation context accepted
    seg = _sends(sf, job)["seg.dcm"]
    assert (seg.status, seg.attempts) == ("refused", 2) and seg.last_error.startswith("not accepted")
    assert "seg.dcm refused by pacs 2 times" in caplog.text
    assert sender.run_once() == 0 and [ds.Modality for ds in pacs.received] == ["SR"]
    assert send_queue.pending_send_count(sf) == 0

    down = SimpleNamespace(ae_title="DOWN", port=free_port())  # nobody listens there
    other = _done_job(sf, tmp_path, 2, down)  # type: ignore[arg-type]
    for _ in range(3):
        _sender(sf, backoff=0.0, max_refusals=1).run_once()
    assert {(s.status, s.attempts) for s in _sends(sf, other).values()} == {("pending", 3)}


def test_sends_queued_before_a_destination_was_corrected_go_to_its_configured_address(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP], caplog: pytest.LogCaptureFixture
) -> None:
    """A destination configured with a wrong port: its sends fail. The administrator corrects the port
    in node.toml and restarts the node; the sends already queued went on to the old port for ever
    (each row kept the address it was queued with), so those studies' results never arrived."""
    pacs = _pacs(pacs_factory)
    wrong = SimpleNamespace(ae_title=pacs.ae_title, port=free_port())  # nobody listens there
    job = _done_job(sf, tmp_path, 1, wrong)  # type: ignore[arg-type]
    assert _sender(sf, backoff=0.0).run_once() == 0
    assert {s.status for s in _sends(sf, job).values()} == {"pending"}
    corrected = Sender(
        sf, NodeMetrics(), "SEGNODE", base_seconds=0.0, max_seconds=0.0,
        addresses={"pacs": (pacs.ae_title, "127.0.0.1", pacs.port), "other": ("X", "127.0.0.1", 1)},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="node.sender"):
        assert corrected.run_once() == 2
    assert {s.status for s in _sends(sf, job).values()} == {"done"}
    assert sorted(ds.Modality for ds in pacs.received) == ["SEG", "SR"]
    assert f"configured at {pacs.ae_title}@127.0.0.1:{pacs.port} now, not" in caplog.text


def test_why_an_association_failed_is_said_in_words(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP]
) -> None:
    """A called AE title the PACS does not know (its A-ASSOCIATE-RJ reason), a port nobody listens on
    (the socket error) and a peer that never answers the request are told apart; before, all were
    'failed (rejected)' or 'failed (aborted)'."""
    pacs = CatchingSCP("PACS")
    pacs.ae.require_called_aet = True
    pacs_factory.append(pacs.start(free_port()))
    job = _done_job(sf, tmp_path, 1, SimpleNamespace(ae_title="WRONG", port=pacs.port))  # type: ignore[arg-type]
    assert _sender(sf).run_once() == 0
    rejected = (
        f"association to WRONG@127.0.0.1:{pacs.port} rejected: Called AE title not recognised "
        "(rejected permanent, by the service user); check the destination's ae_title"
    )
    assert {(s.status, s.last_error) for s in _sends(sf, job).values()} == {("pending", rejected)}

    files = [tmp_path / "job1" / "seg.dcm"]
    down = free_port()  # nobody listens there
    with pytest.raises(ConnectionError) as refused:
        store_files(files, "127.0.0.1", down, "PACS")
    assert str(refused.value) == (
        f"association to PACS@127.0.0.1:{down} failed: cannot connect to 127.0.0.1:{down}: "
        "[Errno 111] Connection refused"
    )
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never answers
        port = silent.getsockname()[1]
        with pytest.raises(ConnectionError) as unanswered:
            store_files(files, "127.0.0.1", port, "PACS", timeout=0.3)
    assert str(unanswered.value) == (
        f"association to PACS@127.0.0.1:{port} failed: no answer to the association request within 0.3 s"
    )
    # A host that never completes the TCP handshake (a firewall that drops, a listener whose backlog is
    # full): the connection gives up after the timeout, not the operating system's ~2 minutes of SYNs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]
        for sock in queued:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        outcome: list[BaseException] = []

        def send() -> None:
            try:
                store_files(files, "127.0.0.1", port, "PACS", timeout=0.5)
            except ConnectionError as exc:
                outcome.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sender.join(15.0)
        for sock in queued:
            sock.close()
    assert not sender.is_alive(), "the connection waited for the operating system's timeout"
    assert [str(e) for e in outcome] == [
        f"association to PACS@127.0.0.1:{port} failed: cannot connect to 127.0.0.1:{port}: timed out"
    ]


def test_a_peer_that_aborts_mid_send_is_said_so(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP]
) -> None:
    pacs = _pacs(pacs_factory, abort_at=2)  # stores the SEG, aborts at the SR
    job = _done_job(sf, tmp_path, 1, pacs)
    assert _sender(sf).run_once() == 1
    sends = _sends(sf, job)
    assert sends["seg.dcm"].status == "done"
    assert (sends["sr.dcm"].status, sends["sr.dcm"].last_error) == (
        "pending", "association aborted by the peer during C-STORE"
    )


def test_which_statuses_refuse_an_object_for_good() -> None:
    assert all(dimse.refused_for_good(s) for s in (0x0122, 0x0124, 0xA900, 0xA9FF, 0xC000, 0xCFFF))
    assert not any(dimse.refused_for_good(s) for s in (None, 0x0000, 0xB000, 0xA700, 0xA7FF, 0x0110, 0xFE00))


def test_a_retried_job_sends_its_new_results_only_not_the_last_runs_still_pending(
    tmp_path: Path, segnode_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`segnode jobs retry` of a job whose SEG and SR still wait for a PACS that is down: the last run's
    sends end ``superseded`` (not pending, not failed) with the retry, and once the PACS answers it gets
    the new run's SEG and SR, once, not both runs'."""
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    pacs_port = free_port()  # nobody listens there until the end: the PACS is down
    settings = node_settings(tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", pacs_port)])
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{settings.database.url}"\n')
    pacs = CatchingSCP()
    try:
        with running_node(settings, model) as node:
            study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
            results = store_files(study.files["FLAIR"], "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
            assert {status for _, status, _ in results} == {0}

            def tried(attempts: int) -> job_queue.JobInfo | None:
                jobs = job_queue.list_jobs(node.sf)
                if not jobs or (jobs[0].status, jobs[0].attempts) != ("done", attempts):
                    return None
                job = job_queue.get_job(node.sf, jobs[0].id)
                pending = [s for s in job.sends if s.status == "pending"]
                return job if pending and all(s.attempts for s in pending) else None

            first = wait_until(lambda: tried(1), 60, "the first run done, its sends tried")
            assert {s.status for s in first.sends} == {"pending"} and len(first.sends) == 2
            retry = ["jobs", "retry", str(first.id), "--config", str(config)]
            code, out, err = run_cli(retry, capsys, monkeypatch)
            assert (code, out.strip()) == (0, f"job {first.id} queued again"), err
            assert send_queue.pending_send_count(node.sf) == 0  # the last run's are withdrawn at once
            second = wait_until(lambda: tried(2), 60, "the retried run done")
            pacs.start(pacs_port)
            wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "the new run delivered")
            sends = job_queue.get_job(node.sf, first.id).sends
    finally:
        pacs.stop()
    new = {o["sop_instance_uid"] for o in second.result["outputs"]}
    assert sorted(ds.Modality for ds in pacs.received) == ["SEG", "SR"]
    assert {str(ds.SOPInstanceUID) for ds in pacs.received} == new
    assert sorted((s.sop_instance_uid in new, s.status) for s in sends) == [
        (False, "superseded"), (False, "superseded"), (True, "done"), (True, "done")
    ]
    code, out, _ = run_cli(["jobs", "show", str(first.id), "--config", str(config)], capsys, monkeypatch)
    assert code == 0 and out.count("superseded") >= 2
    # Which attempt each send belongs to, in the table and the JSON: the retry's beside the first's.
    words = " ".join(out.split())  # Rich wraps the long lines at 80 columns here
    for name in ("seg.dcm", "sr.dcm"):
        assert f"attempt-1/{name}: superseded" in words and f"attempt-2/{name}: done" in words, words
    code, out, _ = run_cli(
        ["jobs", "show", str(first.id), "--config", str(config), "--json"], capsys, monkeypatch
    )
    shown = json.loads(out)["sends"]
    assert sorted((s["attempt"], s["file"], s["status"]) for s in shown) == [
        ("attempt-1", "seg.dcm", "superseded"), ("attempt-1", "sr.dcm", "superseded"),
        ("attempt-2", "seg.dcm", "done"), ("attempt-2", "sr.dcm", "done"),
    ]  # fmt: skip
    assert {s["path"] for s in shown} == {s.path for s in sends}
    assert {str(Path(s["path"]).parent) for s in shown if s["status"] == "done"} == {second.output_dir}


def test_a_send_refused_for_good_shows_in_jobs_list_metrics_and_healthz_until_retried_or_dismissed(
    sf: SessionFactory,
    tmp_path: Path,
    segnode_home: Path,
    pacs_factory: list[CatchingSCP],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A send that ended ``refused`` left no trace an administrator watches: segnode_pending_sends
    dropped to 0, /healthz said nothing, `segnode jobs list` showed the job ``done``. Now the jobs
    list has its sends by state, /metrics a segnode_refused_sends gauge and /healthz the count (still
    200: a restart would not help), and a retry of the job supersedes the refused send.

    `segnode jobs dismiss` acknowledges a refused send (sent by hand): it ends ``dismissed`` with who
    and why before its refusal, and no longer counts. Until then spool retention keeps its study (a
    retry needs it); once dismissed the study may leave, and a retry is then refused."""
    pacs = _pacs(pacs_factory, sop_classes={COMPREHENSIVE_SR})  # no SEG Storage: the SEG is refused
    job = _done_job(sf, tmp_path, 1, pacs)
    gone = _done_job(sf, tmp_path, 2, pacs)  # its study leaves the spool below
    assert _sender(sf, max_refusals=1).run_once() == 2
    assert {s.status for j in (job, gone) for s in _sends(sf, j).values()} == {"done", "refused"}
    url = f"sqlite:///{tmp_path / 'segnode.db'}"  # the sqlite_sf fixture's database
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{url}"\n')

    study = job_queue.get_job(sf, gone).study_instance_uid
    # Not delivered: spool retention keeps the study for a retry until the refusal is dismissed.
    assert retention.begin_removal(sf, study, delivered_before=utcnow() + timedelta(hours=1)) is None
    dismiss = ["jobs", "dismiss", str(gone), "--config", str(config)]
    dismiss += ["--by", "ops", "--reason", "sent by hand"]
    with caplog.at_level(logging.INFO, logger="db.send_queue"):
        code, out, err = run_cli(dismiss, capsys, monkeypatch)
    assert (code, out.strip()) == (0, f"job {gone}: 1 refused sends dismissed by ops"), err
    assert f"job {gone}: 1 refused sends dismissed by ops" in caplog.text
    removal = retention.begin_removal(sf, study, delivered_before=utcnow() + timedelta(hours=1))
    assert removal is not None and retention.forget_instances(sf, removal.instance_ids) == 1
    code, _, err = run_cli(["jobs", "retry", str(gone), "--config", str(config)], capsys, monkeypatch)
    assert code == 2 and "no longer in the spool" in err
    seg = _sends(sf, gone)["seg.dcm"]
    assert seg.status == "dismissed"
    assert seg.last_error.startswith("dismissed by ops: sent by hand; refused: not accepted by the")
    code, out, err = run_cli(dismiss[:5], capsys, monkeypatch)  # nothing refused left: one line, exit 2
    assert (code, out, err.strip()) == (
        2, "", f"error: job {gone} has no refused sends (see `segnode jobs show {gone}`)"
    )  # fmt: skip
    monkeypatch.setenv("COLUMNS", "200")  # the tables on one line per row
    code, out, err = run_cli(["jobs", "show", str(gone), "--config", str(config)], capsys, monkeypatch)
    shown = "dismissed (tried 1 times) dismissed by ops: sent by hand; refused:"
    assert code == 0 and shown in out, out + err

    settings = node_settings(tmp_path, free_port(), db_url=url)
    settings.metrics.port = free_port()
    node = NodeService(settings)
    node.start()
    try:
        base = f"http://127.0.0.1:{settings.metrics.port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as answer:
            code, health = answer.status, json.loads(answer.read())
    finally:
        node.stop()
    assert "segnode_refused_sends 1.0" in metrics and "segnode_pending_sends 0.0" in metrics
    assert (code, health["status"], health["refused_sends"]) == (200, "ok", 1)
    assert "1 sends refused for good" in health["warnings"][0]

    code, out, err = run_cli(["jobs", "list", "--config", str(config), "--json"], capsys, monkeypatch)
    assert code == 0, err
    rows = {row["id"]: row for row in json.loads(out)}
    assert (rows[job]["status"], rows[job]["send_counts"]) == ("done", {"done": 1, "refused": 1})
    assert rows[gone]["send_counts"] == {"done": 1, "dismissed": 1}
    code, out, err = run_cli(["jobs", "list", "--config", str(config)], capsys, monkeypatch)
    assert code == 0 and "1 sent, 1 refused" in out and "1 sent, 1 dismissed" in out, out + err

    code, out, err = run_cli(["jobs", "retry", str(job), "--config", str(config)], capsys, monkeypatch)
    assert code == 0, err
    assert send_queue.refused_send_count(sf) == 0
    seg = _sends(sf, job)["seg.dcm"]
    assert seg.status == "superseded" and "refused: not accepted by the destination" in seg.last_error
    code, out, err = run_cli(["jobs", "list", "--config", str(config)], capsys, monkeypatch)
    assert code == 0 and "1 sent, 1 superseded" in out, out + err


def test_a_delivery_that_outlasts_the_lease_is_not_claimed_and_sent_again_by_another_sender(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two senders on one database (two replicas). The rows are marked once the association ends, and
    the lease was never renewed: a delivery that outlasted it (up to 100 sends, each up to the 30 s
    DIMSE timeout, against a 120 s lease) had its sends claimed by the other sender and stored twice.
    Scaled down: a 2 s lease (renewed every 0.5 s) and a PACS that takes 6 s over its first C-STORE. The
    margins are wide because CI machines run several times slower at times: a 0.6 s lease once missed
    its renewals there (thread start and a SQLite write past 0.6 s) and the second sender claimed."""
    monkeypatch.setattr(sender_module, "LEASE_SECONDS", 2.0)
    pacs = _pacs(pacs_factory, stall_seconds=6.0)
    job = _done_job(sf, tmp_path, 1, pacs)
    first, second = _sender(sf), _sender(sf)
    assert first.run_once(wait=False) == 2
    time.sleep(3.0)  # past the first lease; the PACS has not answered yet
    assert second.run_once() == 0  # still leased to the first sender's running delivery
    first.shutdown(timeout=10)
    assert {(s.status, s.attempts) for s in _sends(sf, job).values()} == {("done", 1)}
    assert len(pacs.received) == 2


def test_a_send_waiting_its_retry_when_the_clock_is_set_back_waits_no_longer_than_the_longest_wait(
    sf: SessionFactory, tmp_path: Path, pacs_factory: list[CatchingSCP], caplog: pytest.LogCaptureFixture
) -> None:
    """A retry scheduled by a clock an hour ahead (NTP then set it back) waited that hour more: the idle
    timers of studies restart after such a step, sends did not. The sender brings it to its longest wait
    (backoff or lease) from now; a send another sender holds on lease keeps it."""
    pacs = _pacs(pacs_factory)
    job = _done_job(sf, tmp_path, 1, pacs)
    waiting, leased = _sends(sf, job).values()
    ahead = utcnow() + timedelta(hours=1)
    send_queue.mark_send_failed(
        sf, waiting.id, "connection refused", base_seconds=60, max_seconds=60, now=ahead
    )
    assert send_queue.claim_send(sf, leased, 120.0)  # another sender delivers it now
    lease_end = _sends(sf, job)[Path(leased.path).name].next_attempt_at
    with caplog.at_level(logging.WARNING, logger="db.send_queue"):
        assert _sender(sf, backoff=60.0).run_once() == 0  # nothing due yet
    now = utcnow()
    after = _sends(sf, job)
    assert after[Path(waiting.path).name].next_attempt_at <= now + timedelta(seconds=121)
    assert after[Path(leased.path).name].next_attempt_at == lease_end
    assert "the clock was set back: 1 pending sends were scheduled" in caplog.text
