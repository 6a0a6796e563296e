"""The receive path's speed levers over real sockets and a real database: the prompt association loop
(node.reactor), the data set stored as it arrived behind our own file header (node.part10), and group
commit (node.committer): nothing is acknowledged before its row is committed and its file is on disk,
and a bad instance or a failed commit costs only the C-STOREs it concerns."""

from __future__ import annotations

import copy
import io
import logging
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import instances
from db.exceptions import DatabaseUnavailableError
from db.node_tables import NodeInstance
from db.session import make_engine, make_session_factory, upgrade
from db.transactions import SessionFactory
from node import dimse, reactor, store_response
from node.metrics import NodeMetrics
from node.scp import StorageSCP
from tests.helpers.dcmtk import DCMTK_ENV, storescu
from tests.helpers.node import count_direct_responses, node_settings
from tests.helpers.peers import require_program
from tests.helpers.ports import free_port


@pytest.fixture(scope="module")
def mr_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    study = write_study(
        make_synthetic_case(5, (32, 32, 12)), tmp_path_factory.mktemp("study"), modalities=["FLAIR", "T1"]
    )
    return study.files["FLAIR"] + study.files["T1"]


@pytest.fixture()
def scp(tmp_path: Path, db_url: str) -> Iterator[StorageSCP]:
    settings = node_settings(tmp_path, free_port(), db_url=db_url)
    upgrade(settings.database.url)
    sf = make_session_factory(make_engine(settings.database.url))
    running = StorageSCP(settings.node, sf, NodeMetrics())
    running.start()
    yield running
    running.stop()


def _rows(sf: SessionFactory) -> list[NodeInstance]:
    with sf() as s:
        return list(s.scalars(select(NodeInstance).order_by(NodeInstance.id)))


def test_prompt_loop_follows_the_installed_pynetdicom() -> None:
    # node.reactor copies pynetdicom's acceptor loop; an upgrade must re-read it.
    assert pynetdicom.__version__ == reactor.PYNETDICOM_VERSION


def test_quick_store_response_follows_the_installed_pynetdicom() -> None:
    assert pynetdicom.__version__ == store_response.PYNETDICOM_VERSION


@pytest.mark.parametrize(
    ("sop_class", "message_id", "status", "sop_uid"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", 1, 0x0000, "1.2.3.4"),  # both UIDs of even length
        ("1.2.840.10008.5.1.4.1.1.4.1", 65535, 0xA700, "1.2.826.0.1.3680043.8.498.123"),  # odd: padded
        ("1.2.840.10008.5.1.4.1.1.4", 7, 0xC000, "2.25.1" + "9" * 57),  # 64 characters
    ],
)
def test_quick_store_response_is_pynetdicoms_encoding(
    sop_class: str, message_id: int, status: int, sop_uid: str
) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert store_response.encode_c_store_rsp(sop_class, message_id, status, sop_uid) == encode(
        message.command_set, True, True
    )


def test_associations_send_quick_store_responses(
    scp: StorageSCP, mr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every C-STORE of a storescu association is answered through the quick path, and storescu reads
    each answer as Success (a malformed response would fail it)."""
    packed: list[int] = []
    original = store_response.encode_c_store_rsp

    def counting(*args: Any) -> bytes:
        packed.append(1)
        return original(*args)

    monkeypatch.setattr(store_response, "encode_c_store_rsp", counting)
    direct = count_direct_responses(monkeypatch)
    proc = storescu(scp.port, mr_files)
    assert proc.returncode == 0, proc.stderr
    assert len(packed) == len(mr_files) == len(_rows(scp.sf))
    assert len(direct) == len(mr_files)  # each sent straight to the socket, none queued for the DUL


@pytest.mark.parametrize("context_id", [1, 3, 255])
@pytest.mark.parametrize("size", [0, 1, 180, 5000])
def test_p_data_tf_is_pynetdicoms_encoding(context_id: int, size: int) -> None:
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    pdv = b"\x03" + bytes(range(256)) * (size // 256) + bytes(size % 256)
    primitive = P_DATA()
    primitive.presentation_data_value_list.append([context_id, pdv])
    assert store_response.encode_p_data_tf(context_id, pdv) == P_DATA_TF(primitive).encode()


def test_an_idle_association_waits_on_its_socket(scp: StorageSCP, monkeypatch: pytest.MonkeyPatch) -> None:
    """An established association's DUL thread waits for the peer's bytes (at most 1 ms a turn)
    instead of looking and sleeping 0.2 ms: about a thousand turns a second while idle, not five
    thousand; a C-ECHO is still answered and the release completes."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    turns: list[float] = []
    original = reactor._waiting_transport_event

    def counting(self: Any) -> bool:
        turns.append(time.monotonic())
        return original(self)

    monkeypatch.setattr(reactor, "_waiting_transport_event", counting)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = reactor.associate(ae, "127.0.0.1", scp.port, "SEGNODE")
    assert assoc.is_established
    try:
        time.sleep(0.3)
        start = time.monotonic()
        time.sleep(1.0)
        idle = [t for t in turns if start <= t < start + 1.0]
        assert 200 <= len(idle) <= 1100, len(idle)  # 1 ms waits (sleeping 0.2 ms: ~4000 or more)
        began = time.perf_counter()
        assert assoc.send_c_echo().Status == 0x0000
        assert time.perf_counter() - began < 0.5
    finally:
        assoc.release()
    assert assoc.is_released


def test_each_association_gets_its_own_copy_of_the_contexts(scp: StorageSCP) -> None:
    """The server's contexts are copied per association without deepcopy's cost; the copy is as
    independent as a deep copy: every attribute but the transfer-syntax list is an immutable value."""
    import copy

    from node.scp import PresentationContexts

    assert scp.server is not None
    original = scp.server.contexts
    assert isinstance(original, PresentationContexts)
    copies = copy.deepcopy(original)
    assert len(copies) == len(original) > 100
    for twin, context in zip(copies, original, strict=True):
        assert twin is not context and twin._transfer_syntax is not context._transfer_syntax
        assert vars(twin) == vars(context)
        for name, value in vars(context).items():
            if name != "_transfer_syntax":
                assert value is None or isinstance(value, str | int), (name, type(value))
    copies[0]._transfer_syntax.append("1.2.3")
    copies[0].result = 0
    assert "1.2.3" not in original[0]._transfer_syntax and original[0].result is None


def test_each_scp_gets_its_own_copy_of_the_contexts_built_once(scp: StorageSCP) -> None:
    """The node's AE holds the contexts that adding them one by one through pynetdicom gives (the same
    abstract syntaxes, transfer syntaxes in the same order, roles), copied from one AE built per process,
    and no context or list of transfer syntaxes is shared with that AE or with another SCP's."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from converters.dicom_series import readable_transfer_syntaxes
    from node.scp import KEPT_SOP_CLASSES, PRIVATE_STORAGE_SOP_CLASSES, node_contexts

    one_by_one = AE()
    one_by_one.add_supported_context(Verification)
    readable = list(readable_transfer_syntaxes(tuple(ALL_TRANSFER_SYNTAXES)))
    for context in AllStoragePresentationContexts:
        uid = str(context.abstract_syntax)
        one_by_one.add_supported_context(uid, readable if uid in KEPT_SOP_CLASSES else ALL_TRANSFER_SYNTAXES)
    for _, uid in PRIVATE_STORAGE_SOP_CLASSES:
        one_by_one.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)

    def table(ae: AE) -> list[tuple[str, list[str], bool | None, bool | None]]:
        return [
            (cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role)
            for cx in ae.supported_contexts
        ]

    assert table(scp.ae) == table(one_by_one)
    assert len(scp.ae.supported_contexts) > 150 and len(readable) < len(ALL_TRANSFER_SYNTAXES)
    other = StorageSCP(scp.settings, scp.sf, NodeMetrics())
    other.stop()  # never started: only its AE is looked at
    built = node_contexts()
    assert node_contexts() is built  # once per process
    mine, theirs, template = (ae._supported_contexts for ae in (scp.ae, other.ae, built))
    for uid, context in mine.items():
        for elsewhere in (theirs[uid], template[uid]):
            assert context is not elsewhere and context._transfer_syntax is not elsewhere._transfer_syntax
    first = next(iter(mine.values()))
    first._transfer_syntax.append("1.2.3")
    assert "1.2.3" not in next(iter(theirs.values()))._transfer_syntax
    assert "1.2.3" not in next(iter(template.values()))._transfer_syntax


def test_associations_run_the_prompt_loop(
    scp: StorageSCP, mr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    turns: list[int] = []
    original = reactor._prompt_reactor

    def counting(self: Any) -> None:
        turns.append(1)
        original(self)

    monkeypatch.setattr(reactor, "_prompt_reactor", counting)
    proc = storescu(scp.port, mr_files)
    assert proc.returncode == 0, proc.stderr
    assert turns == [1]  # the one association was served by the prompt loop, and released normally
    rows = _rows(scp.sf)
    assert len(rows) == len(mr_files)
    assert {pydicom.dcmread(r.path or "").SOPInstanceUID for r in rows} == {
        pydicom.dcmread(f).SOPInstanceUID for f in mr_files
    }


def _until_queued(assoc: Any, limit: float) -> None:
    """Return once ``assoc`` holds a decoded DIMSE message, or after ``limit`` seconds."""
    end = time.monotonic() + limit
    while not assoc.dimse.msg_queue.qsize() and time.monotonic() < end:
        time.sleep(0.0005)


class _LingeringCheckpoint(threading.Event):
    """An association loop's pause event whose ``wait()`` returns only once a reply has arrived (at
    most 0.5 s late): as if the loop's thread lost the CPU right after the wait."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self.assoc = assoc

    def wait(self, timeout: float | None = None) -> bool:
        ready = super().wait(timeout)
        _until_queued(self.assoc, 0.5)
        return ready


def _linger(assoc: Any) -> None:
    """Slow ``assoc`` the way a loaded 2-core machine now and then does: its loop thread just after
    the pause event's wait, and the sending thread before it takes its reply (20 ms after it came)."""
    assoc._reactor_checkpoint = _LingeringCheckpoint(assoc)
    assoc._reactor_checkpoint.set()
    get_msg = assoc.dimse.get_msg

    def late_get_msg(block: bool = False) -> Any:
        if block:
            _until_queued(assoc, 1.0)
            time.sleep(0.02)
        return get_msg(block)

    assoc.dimse.get_msg = late_get_msg


@pytest.mark.parametrize("loop", ["pynetdicom", "prompt"])
def test_no_reply_is_lost_to_the_requestors_loop(
    scp: StorageSCP,
    mr_files: list[Path],
    loop: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A requestor's send_c_store pauses its association loop; pynetdicom's loop can take the node's
    quick reply for a request in between (the send then waits out its DIMSE timeout and the
    association is aborted). The associations the node opens (node.reactor.associate) lose none."""
    datasets = [pydicom.dcmread(f) for f in mr_files]
    ae = AE(ae_title="PACS")
    ae.dimse_timeout = 2
    for ds in datasets[:1]:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    if loop == "prompt":
        make_prompt = reactor.make_prompt
        monkeypatch.setattr(reactor, "make_prompt", lambda assoc: (_linger(assoc), make_prompt(assoc)))
        assoc = reactor.associate(ae, "127.0.0.1", scp.port, "SEGNODE")
    else:
        handlers = [(evt.EVT_CONN_OPEN, lambda event: _linger(event.assoc))]
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SEGNODE", evt_handlers=handlers)
    assert assoc.is_established
    statuses: list[int] = []
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        for ds in datasets:
            rsp = assoc.send_c_store(ds) if assoc.is_established else None
            if not rsp or "Status" not in rsp:
                break
            statuses.append(int(rsp.Status))
        if assoc.is_established:
            assoc.release()
    taken = [r for r in caplog.records if "unexpected C-STORE" in r.getMessage()]
    if loop == "prompt":
        assert statuses == [dimse.SUCCESS] * len(datasets) and not taken
    else:  # the race is there to lose: this setup provokes it
        assert len(statuses) < len(datasets) and taken


def _dataset_bytes(part10: bytes) -> bytes:
    """What follows the File Meta Information of a DICOM file (PS3.10 7.1)."""
    assert part10[128:132] == b"DICM"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length :]


def test_stored_files_are_the_received_bytes(scp: StorageSCP, mr_files: list[Path]) -> None:
    proc = storescu(scp.port, mr_files)
    assert proc.returncode == 0, proc.stderr
    for row in _rows(scp.sf):
        stored = Path(row.path or "").read_bytes()
        source = next(f for f in mr_files if pydicom.dcmread(f).SOPInstanceUID == row.sop_instance_uid)
        # The data set byte for byte as storescu sent it (the same transfer syntax: nothing re-encoded) ...
        assert _dataset_bytes(stored) == _dataset_bytes(source.read_bytes())
        # ... behind the header pynetdicom's encoded_dataset() would have written.
        syntax = pydicom.dcmread(source).file_meta.TransferSyntaxUID
        meta = create_file_meta(
            sop_class_uid=row.sop_class_uid, sop_instance_uid=row.sop_instance_uid, transfer_syntax=syntax
        )
        assert stored.startswith(b"\x00" * 128 + b"DICM" + encode_file_meta(meta))
        assert pydicom.dcmread(io.BytesIO(stored)).SOPInstanceUID == row.sop_instance_uid


def _committed(sf: SessionFactory, sop_uid: str) -> bool:
    """Whether another session (a fresh connection) sees the row."""
    with sf() as s:
        return s.scalar(select(NodeInstance.id).where(NodeInstance.sop_instance_uid == sop_uid)) is not None


def test_group_commit_answers_only_after_the_commit(
    tmp_path: Path, db_url: str, mr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four associations at once against a slow database: rows share transactions, and at the moment
    each handler hands its status to pynetdicom the row is visible to another session and the file is
    in place."""
    batches: list[int] = []
    original = instances.record_instances

    def slow(sf: SessionFactory, rows: Any, now: Any = None) -> list[bool]:
        time.sleep(0.02)  # a slow commit, so that the other associations' C-STOREs queue behind it
        batches.append(len(rows))
        return original(sf, rows, now)

    monkeypatch.setattr(instances, "record_instances", slow)
    early: list[str] = []
    handled = StorageSCP._on_store

    def checked(self: StorageSCP, event: Any) -> int:
        status = handled(self, event)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if status == dimse.SUCCESS and not _committed(self.sf, sop_uid):
            early.append(sop_uid)
        return status

    monkeypatch.setattr(StorageSCP, "_on_store", checked)
    settings = node_settings(tmp_path, free_port(), db_url=db_url)
    upgrade(db_url)
    running = StorageSCP(settings.node, make_session_factory(make_engine(db_url)), NodeMetrics())
    running.start()
    try:
        groups = [mr_files[i::4] for i in range(4)]
        procs = [
            subprocess.Popen(
                [require_program("storescu"), "-aet", "PACS", "-aec", "SEGNODE", "127.0.0.1",
                 str(running.port), *map(str, group)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=DCMTK_ENV,
            )
            for group in groups
        ]
        for proc in procs:
            assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        running.stop()
    assert early == []
    rows = _rows(running.sf)
    assert len(rows) == len(mr_files) and all(Path(r.path or "").is_file() for r in rows)
    assert sum(batches) == len(mr_files) and max(batches) > 1  # transactions were shared
    assert running.committer.batch_sizes == batches


def _send_each(port: int, datasets: list[Dataset]) -> list[int]:
    """C-STORE each data set over one pynetdicom association; the statuses."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = reactor.associate(ae, "127.0.0.1", port, "SEGNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_a_malformed_instance_fails_alone(
    scp: StorageSCP, mr_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Four associations at once, one of them with a truncated instance in the middle: that one gets
    Cannot understand with the reason logged, every other instance is stored and recorded."""
    datasets = [pydicom.dcmread(f) for f in mr_files]
    bad = copy.deepcopy(datasets[5])
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 2]
    plans = [[*datasets[0:5], bad, *datasets[6:8]], datasets[8:12], datasets[12:16], datasets[16:]]
    results: dict[int, list[int]] = {}
    with caplog.at_level(logging.WARNING, logger="node.scp"):
        threads = [
            threading.Thread(target=lambda i=i, plan=plan: results.__setitem__(i, _send_each(scp.port, plan)))
            for i, plan in enumerate(plans)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results[0][5] == dimse.CANNOT_UNDERSTAND
    assert [s for i, plan in results.items() for j, s in enumerate(plan) if (i, j) != (0, 5)] == [
        dimse.SUCCESS
    ] * (len(datasets) - 1)
    assert f"instance {bad.SOPInstanceUID}: PixelData is" in caplog.text and "(truncated)" in caplog.text
    stored = {r.sop_instance_uid for r in _rows(scp.sf)}
    assert bad.SOPInstanceUID not in stored
    assert stored == {ds.SOPInstanceUID for ds in datasets} - {bad.SOPInstanceUID}


def test_a_failed_group_commit_fails_every_c_store_in_it(
    scp: StorageSCP, mr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first transaction fails (the database went away) while three more C-STOREs queue behind it:
    the ones it held get Out of resources and have no row; the next transaction is whole."""
    original = instances.record_instances
    first = threading.Event()
    queued = threading.Semaphore(0)
    calls: list[int] = []

    def failing_once(sf: SessionFactory, rows: Any, now: Any = None) -> list[bool]:
        calls.append(len(rows))
        if len(calls) == 1:
            first.set()
            for _ in range(3):  # hold the transaction until the other three have queued
                assert queued.acquire(timeout=30)
            raise DatabaseUnavailableError("OperationalError: connection failed")
        return original(sf, rows, now)

    monkeypatch.setattr(instances, "record_instances", failing_once)
    record = scp.committer.record

    def counting(row: instances.ReceivedInstance) -> bool:
        if first.is_set():
            queued.release()
        return record(row)

    monkeypatch.setattr(scp.committer, "record", counting)
    datasets = [pydicom.dcmread(f) for f in mr_files[:4]]
    statuses: dict[int, int] = {}

    def send(i: int) -> None:
        if i:
            assert first.wait(30)
        statuses[i] = _send_each(scp.port, [datasets[i]])[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses[0] == dimse.OUT_OF_RESOURCES
    assert calls[0] == 1 and calls[1:] == [3]  # the three that queued shared the next transaction
    assert [statuses[i] for i in (1, 2, 3)] == [dimse.SUCCESS] * 3
    assert {r.sop_instance_uid for r in _rows(scp.sf)} == {ds.SOPInstanceUID for ds in datasets[1:]}
    # A failed C-STORE's spool file may stay behind without a row: the PACS sends it again.
    assert _send_each(scp.port, [datasets[0]]) == [dimse.SUCCESS]


@pytest.mark.parametrize("timers", ["monotonic", "wall clock"])
def test_a_step_of_the_wall_clock_leaves_open_associations_alone(
    timers: str,
    scp: StorageSCP,
    mr_files: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pynetdicom's DUL timers read the wall clock: a step of it (NTP, a resumed VM) by more than
    ``network_timeout`` expired every open association's idle timer at once, and the node aborted
    healthy associations mid-study. With node.reactor's monotonic timers on both
    ends (the node's and reactor.associate's), an hour's step changes nothing; without them (the
    second case: both ends' timers put back on the wall clock) the step aborts the association."""
    if timers == "wall clock":
        monkeypatch.setattr(reactor, "make_monotonic", lambda dul: None)
        monkeypatch.setattr("node.scp.make_monotonic", lambda dul: None)
    datasets = [pydicom.dcmread(f) for f in mr_files[:2]]
    ae = AE(ae_title="PACS")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = reactor.associate(ae, "127.0.0.1", scp.port, "SEGNODE")
    assert assoc.is_established
    assert int(assoc.send_c_store(datasets[0]).Status) == dimse.SUCCESS
    wall = time.time
    with caplog.at_level(logging.ERROR):
        monkeypatch.setattr(time, "time", lambda: wall() + 3600.0)  # the host's clock set an hour ahead
        time.sleep(0.2)  # many turns of both ends' DUL loops, which look at their idle timers
        established = assoc.is_established
        rsp = assoc.send_c_store(datasets[1]) if established else None
        monkeypatch.setattr(time, "time", wall)
    timed_out = [r for r in caplog.records if "network timeout" in r.getMessage()]
    if timers == "monotonic":
        assert established and int(rsp.Status) == dimse.SUCCESS and not timed_out
        assoc.release()
    else:
        assert not established or rsp is None or "Status" not in rsp
        assert timed_out
