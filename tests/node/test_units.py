"""Unit tests of the node's parts: job store (SQLite and PostgreSQL), series selection, model runtime."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from db import instances, job_queue, send_queue
from db.exceptions import JobNotFoundError, JobStateError
from db.job_queue import OutputObject
from db.registry import Registry
from db.session import make_engine, make_session_factory, upgrade
from db.transactions import SessionFactory, as_utc, utcnow
from node.config import Destination
from node.exceptions import ModelLoadError, SelectionError
from node.runtime import ModelRuntime, check_device
from node.selection import SeriesInfo, SeriesSelector, exam_protocols, scan_series, series_info
from node.uids import validated_uid
from tests.helpers.node import install_model, make_threshold_model
from tests.helpers.peers import require_shared

T0 = utcnow().replace(microsecond=0)


@pytest.fixture()
def sf(db_url: str) -> SessionFactory:
    upgrade(db_url)
    return make_session_factory(make_engine(db_url))


def _receive(sf: SessionFactory, study: str, n: int, at: object, start: int = 0) -> None:
    for i in range(start, start + n):
        instances.record_instance(
            sf,
            sop_instance_uid=f"{study}.{i}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            study_instance_uid=study,
            series_instance_uid=f"{study}.100",
            kept=True,
            path=f"/spool/{study}/{i}.dcm",
            calling_ae="PACS",
            now=at,  # type: ignore[arg-type]
        )


# -- job store ---------------------------------------------------------------------------------------------


def test_seconds_until_the_next_study_is_due(sf: SessionFactory) -> None:
    assert instances.seconds_until_due(sf, 10.0, now=T0) is None  # no study waits
    _receive(sf, "1.2.3", 3, T0)
    _receive(sf, "1.2.4", 1, T0 + timedelta(seconds=4))
    assert instances.seconds_until_due(sf, 10.0, now=T0 + timedelta(seconds=3)) == 7.0
    # a study still being received is not counted; the other one is
    assert instances.seconds_until_due(sf, 10.0, ["1.2.3"], now=T0 + timedelta(seconds=3)) == 11.0
    assert instances.seconds_until_due(sf, 10.0, now=T0 + timedelta(seconds=12)) == -2.0  # due now
    instances.schedule_due_studies(sf, 10.0, now=T0 + timedelta(seconds=12))  # 1.2.3 gets its job
    assert instances.seconds_until_due(sf, 10.0, now=T0 + timedelta(seconds=12)) == 2.0


def test_study_completes_after_idle_time_and_late_instances_make_a_new_run(sf: SessionFactory) -> None:
    _receive(sf, "1.2.3", 3, T0)
    assert instances.schedule_due_studies(sf, 10.0, now=T0 + timedelta(seconds=9)) == []
    [job] = instances.schedule_due_studies(sf, 10.0, now=T0 + timedelta(seconds=11))
    assert (
        instances.schedule_due_studies(sf, 10.0, now=T0 + timedelta(seconds=30)) == []
    )  # one job per completion
    assert job_queue.claim_job(sf, now=T0 + timedelta(seconds=12)) == job
    assert job_queue.get_job(sf, job).instance_count == 3
    _receive(sf, "1.2.3", 2, T0 + timedelta(seconds=13), start=3)  # arrives while the job runs
    assert job_queue.claim_job(sf) is None
    [rerun] = instances.schedule_due_studies(sf, 10.0, now=T0 + timedelta(seconds=24))
    info = job_queue.get_job(sf, rerun)
    assert (info.run, info.status) == (2, "queued")
    assert job_queue.claim_job(sf, now=T0 + timedelta(seconds=25)) is None  # run 1 still runs
    assert job_queue.finish_job(sf, job, status="done")
    assert job_queue.claim_job(sf, now=T0 + timedelta(seconds=26)) == rerun
    assert job_queue.get_job(sf, rerun).instance_count == 5
    assert len(job_queue.job_instance_paths(sf, rerun)) == 5


def test_recorded_rows_read_back_through_the_orm(sf: SessionFactory) -> None:
    """record_instances writes through the driver in its own SQL: what it writes reads back through
    SQLAlchemy's models as written (types, booleans, aware times), repeats are refused in and across
    batches, and a study's idle timer never moves backwards."""
    from db.node_tables import NodeInstance, NodeStudy

    def row(uid: str, kept: bool = True, study: str | None = "1.2.3") -> instances.ReceivedInstance:
        return instances.ReceivedInstance(
            sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_instance_uid=study,
            series_instance_uid="1.2.3.4" if study else None, kept=kept,
            path=f"/spool/{uid}.dcm" if kept else None, calling_ae="PACS",
        )

    later = T0 + timedelta(seconds=5)
    first_batch = [row("1.1"), row("1.2"), row("1.1")]
    assert instances.record_instances(sf, first_batch, now=later) == [True, True, False]
    assert instances.record_instances(sf, [row("1.2"), row("1.3", kept=False, study=None)], now=T0) == [
        False, True,
    ]
    assert instances.record_instances(sf, [row("1.4")], now=T0) == [True]  # arrived late, stamped early
    with sf() as s:
        got = {r.sop_instance_uid: r for r in s.query(NodeInstance)}
        study = s.query(NodeStudy).one()
    assert sorted(got) == ["1.1", "1.2", "1.3", "1.4"]
    first = got["1.1"]
    assert (first.kept, first.path, first.calling_ae, first.series_instance_uid) == (
        True, "/spool/1.1.dcm", "PACS", "1.2.3.4",
    )
    assert as_utc(first.received_at) == later
    assert (got["1.3"].kept, got["1.3"].path, got["1.3"].study_instance_uid) == (False, None, None)
    assert study.study_instance_uid == "1.2.3" and study.pending is True and study.runs == 0
    assert as_utc(study.first_received_at) == later
    assert as_utc(study.last_received_at) == later  # not moved back to T0 by 1.4


def test_driver_record_matches_the_session_reference(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same batches recorded through the driver and through SQLAlchemy's session
    (record_instances_through_session, the node's path before) leave the same rows and answers, on
    each backend."""
    from db.node_tables import NodeInstance, NodeStudy

    if db_url.startswith("sqlite"):
        reference_url = f"sqlite:///{tmp_path / 'reference' / 'segnode.db'}"
    else:
        reference_url = str(request.getfixturevalue("postgres_server").new_database())

    def fresh(url: str) -> SessionFactory:
        upgrade(url)
        return make_session_factory(make_engine(url))

    def row(uid: str, study: str, kept: bool = True) -> instances.ReceivedInstance:
        return instances.ReceivedInstance(
            sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_instance_uid=study,
            series_instance_uid=f"{study}.9", kept=kept, path=f"/spool/{uid}.dcm", calling_ae="PACS",
        )

    batches = [
        ([row("1.1", "7.1"), row("1.2", "7.1"), row("1.1", "7.1")], T0 + timedelta(seconds=3)),
        ([row("1.3", "7.2"), row("1.2", "7.1"), row("1.4", "7.1", kept=False)], T0 + timedelta(seconds=1)),
        ([row("1.5", "7.1")], T0 + timedelta(seconds=9)),
    ]

    def run(sf: SessionFactory, record: object) -> tuple[object, ...]:
        answers = [record(sf, rows, now=at) for rows, at in batches]  # type: ignore[operator]
        with sf() as s:
            got = sorted(
                (r.sop_instance_uid, r.study_instance_uid, r.series_instance_uid, r.kept, r.path,
                 r.calling_ae, as_utc(r.received_at))
                for r in s.query(NodeInstance)
            )
            studies = sorted(
                (r.study_instance_uid, as_utc(r.first_received_at), as_utc(r.last_received_at), r.pending,
                 r.runs)
                for r in s.query(NodeStudy)
            )
        return answers, got, studies

    assert run(fresh(db_url), instances.record_instances) == run(
        fresh(reference_url), instances.record_instances_through_session
    )


def test_a_driver_error_while_recording_is_a_database_error(sf: SessionFactory) -> None:
    from db.exceptions import DatabaseUnavailableError

    with sf.begin() as s:
        s.connection().exec_driver_sql("DROP TABLE node_instances")
    with pytest.raises(DatabaseUnavailableError, match="node_instances"):
        _receive(sf, "1.2.3", 1, T0)


def test_queued_job_waits_while_its_study_is_still_receiving(sf: SessionFactory) -> None:
    _receive(sf, "1.2.4", 1, T0)
    [job] = instances.schedule_due_studies(sf, 5.0, now=T0 + timedelta(seconds=6))
    _receive(sf, "1.2.4", 1, T0 + timedelta(seconds=7), start=1)  # before any worker claimed it
    assert job_queue.claim_job(sf) is None  # not half a study
    assert (
        instances.schedule_due_studies(sf, 5.0, now=T0 + timedelta(seconds=13)) == []
    )  # the queued job covers it
    assert job_queue.claim_job(sf) == job
    assert job_queue.get_job(sf, job).instance_count == 2


def test_claim_is_atomic(sf: SessionFactory) -> None:
    for n, study in enumerate(["1.5.1", "1.5.2", "1.5.3"]):
        _receive(sf, study, 1, T0 + timedelta(seconds=n))
    instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=10))
    claimed = [job_queue.claim_job(sf, owner=f"host:{i}") for i in range(5)]
    assert sorted(c for c in claimed if c is not None) == [1, 2, 3]
    assert claimed[3:] == [None, None]
    assert {j.owner for j in job_queue.list_jobs(sf)} == {"host:0", "host:1", "host:2"}


def test_jobs_of_dead_processes_are_requeued(sf: SessionFactory) -> None:
    for study in ("1.6.1", "1.6.2", "1.6.3"):
        _receive(sf, study, 1, T0)
    instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=5))
    host = socket.gethostname()
    dead = job_queue.claim_job(sf, owner=f"{host}:999999999")
    alive_here = job_queue.claim_job(sf, owner=f"{host}:{os.getppid()}")
    elsewhere = job_queue.claim_job(sf, owner="otherhost:1", now=utcnow() - timedelta(seconds=1000))
    requeued = job_queue.requeue_stale(sf, stale_seconds=300)
    assert sorted(requeued) == sorted([dead, elsewhere])
    assert job_queue.get_job(sf, dead or 0).status == "queued"
    assert "stopped while the job was running" in job_queue.get_job(sf, dead or 0).reason
    assert job_queue.get_job(sf, alive_here or 0).status == "running"


def test_a_superseded_claim_of_this_live_process_can_neither_heartbeat_nor_end_its_job(
    sf: SessionFactory,
) -> None:
    """A job of this live process whose heartbeat looks stale is queued again (a hung worker thread
    would otherwise hold its study until a restart) and claimed again, late instances included; both
    claims record the same owner, host:pid. Only the later claim's run heartbeats and ends the job."""
    _receive(sf, "1.6.5", 3, T0)
    [job] = instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=5))
    first = job_queue.claim(sf, now=T0 + timedelta(seconds=6))
    assert first == job_queue.Claim(job, 1)
    assert job_queue.requeue_stale(sf, 300.0, now=T0 + timedelta(seconds=307)) == [job]
    assert "no heartbeat from owner" in job_queue.get_job(sf, job).reason
    _receive(sf, "1.6.5", 2, T0 + timedelta(seconds=310), start=3)  # late instances
    assert instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=312)) == []  # the queued job
    second = job_queue.claim(sf, now=T0 + timedelta(seconds=313))
    assert second == job_queue.Claim(job, 2) and job_queue.get_job(sf, job).instance_count == 5
    assert not job_queue.heartbeat(sf, job, attempt=first.attempt)
    assert job_queue.heartbeat(sf, job, attempt=second.attempt)
    assert not job_queue.finish_job(sf, job, status="done", result={"covers": 3}, attempt=first.attempt)
    assert job_queue.finish_job(sf, job, status="done", result={"covers": 5}, attempt=second.attempt)
    assert job_queue.get_job(sf, job).result == {"covers": 5}


def test_a_job_that_stops_the_node_every_time_ends_failed_and_the_next_study_runs(
    sf: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A study whose run kills the node (OOM killer, a crash in a native library) is re-queued at each
    start, and the oldest, claimed first: after MAX_REQUEUES such stops it ends failed with a reason
    that says how to run it again, and the study after it is analysed; a retry starts the count anew."""
    _receive(sf, "1.6.7", 1, T0)
    _receive(sf, "1.6.8", 1, T0)
    poison, later = instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=5))
    dead = f"{socket.gethostname()}:999999999"  # no such process: the node that ran it is gone
    for stop in range(1, job_queue.MAX_REQUEUES):
        assert job_queue.claim_job(sf, owner=dead) == poison
        assert job_queue.requeue_stale(sf, 300.0, at_start=True) == [poison]
        assert job_queue.get_job(sf, poison).requeues == stop
    assert job_queue.claim_job(sf, owner=dead) == poison
    with caplog.at_level("WARNING", logger="db.job_queue"):
        assert job_queue.requeue_stale(sf, 300.0, at_start=True) == []
    job = job_queue.get_job(sf, poison)
    assert job.status == "failed" and job.finished_at is not None
    assert job.reason.startswith(f"the node stopped {job_queue.MAX_REQUEUES} times while running this job")
    assert f"`segnode jobs retry {poison}` runs it again" in job.reason
    [line] = [r.getMessage() for r in caplog.records if "ended failed" in r.getMessage()]
    assert f"job {poison}: the node stopped {job_queue.MAX_REQUEUES} times" in line and "1.6.7" not in line
    assert job_queue.claim_job(sf) == later  # the later study is no longer held up
    retried = job_queue.retry_job(sf, poison)
    assert (retried.status, retried.requeues) == ("queued", 0)


def test_finish_queues_sends_and_backoff_doubles(sf: SessionFactory) -> None:
    _receive(sf, "1.7", 1, T0)
    instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=5))
    job = job_queue.claim_job(sf)
    assert job is not None
    dests = [Destination("a", "A", "127.0.0.1", 1), Destination("b", "B", "127.0.0.1", 2)]
    outputs = [OutputObject("/jobs/1/seg.dcm", "1.9.1"), OutputObject("/jobs/1/sr.dcm", "1.9.2")]
    assert job_queue.finish_job(sf, job, status="done", outputs=outputs, destinations=dests, now=T0)
    assert not job_queue.finish_job(sf, job, status="done", outputs=outputs, destinations=dests)  # not twice
    sends = send_queue.due_sends(sf, now=T0)
    assert len(sends) == 4
    # A destination being delivered now is left out in the query, so its rows take none of the limit.
    others = send_queue.due_sends(sf, now=T0, limit=2, exclude_destinations={"a"})
    assert {s.destination for s in others} == {"b"}
    assert len(others) == 2
    first = sends[0]
    assert send_queue.claim_send(sf, first, 60, now=T0)
    assert not send_queue.claim_send(sf, first, 60, now=T0)  # leased
    delays = []
    for _ in range(5):
        when = send_queue.mark_send_failed(sf, first.id, "refused", base_seconds=2, max_seconds=10, now=T0)
        delays.append((as_utc(when) - T0).total_seconds())  # type: ignore[operator]
    assert delays == [2, 4, 8, 10, 10]
    send_queue.mark_sent(sf, sends[1].id)
    assert send_queue.pending_send_count(sf) == 3
    assert [s.status for s in job_queue.get_job(sf, job).sends].count("done") == 1


def test_retry_and_not_found(sf: SessionFactory) -> None:
    with pytest.raises(JobNotFoundError, match="job 42 does not exist"):
        job_queue.get_job(sf, 42)
    _receive(sf, "1.8", 1, T0)
    [job] = instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=5))
    with pytest.raises(JobStateError, match=f"job {job} is queued; only a finished job can be retried"):
        job_queue.retry_job(sf, job)
    job_queue.claim_job(sf)
    job_queue.finish_job(sf, job, status="failed", reason="boom")
    assert job_queue.retry_job(sf, job).status == "queued"


def test_retry_supersedes_the_last_runs_pending_sends_only(sf: SessionFactory) -> None:
    _receive(sf, "1.8.2", 1, T0)
    [job] = instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=5))
    job_queue.claim_job(sf)
    outputs = [OutputObject("/jobs/1/seg.dcm", "1.9.3"), OutputObject("/jobs/1/sr.dcm", "1.9.4")]
    pacs = [Destination("a", "A", "h", 1)]
    job_queue.finish_job(sf, job, status="done", outputs=outputs, destinations=pacs)
    sr = next(s for s in job_queue.get_job(sf, job).sends if s.path.endswith("sr.dcm"))
    send_queue.mark_sent(sf, sr.id)  # the SR went, the SEG waits for the PACS
    job_queue.retry_job(sf, job)
    statuses = {s.path.rsplit("/", 1)[1]: s.status for s in job_queue.get_job(sf, job).sends}
    assert statuses == {"seg.dcm": "superseded", "sr.dcm": "done"}
    assert send_queue.pending_send_count(sf) == 0 and send_queue.due_sends(sf) == []


# -- UIDs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "1..2", "1.2.", "../1", "1.2.3a", "1.2.3\n", "1." + "2" * 64, None])
def test_bad_uids_are_refused(bad: object) -> None:
    with pytest.raises(Exception, match="is not a valid DICOM UID"):
        validated_uid(bad, "SOPInstanceUID")


# -- selection -----------------------------------------------------------------------------------------------


def _series(description: str, **attrs: object) -> SeriesInfo:
    ds = Dataset()
    ds.SeriesInstanceUID = f"1.2.{abs(hash(description)) % 10**8}"
    ds.SeriesDescription = description
    ds.ImageOrientationPatient = attrs.pop("iop", [1, 0, 0, 0, 1, 0])
    for key, value in attrs.items():
        setattr(ds, key, value)
    from node.selection import series_info

    return series_info(ds, [], int(attrs.get("slices", 30)))  # type: ignore[arg-type]


FLAIR = {"ScanningSequence": "SE\\IR", "RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2500}
MPRAGE = {"ScanningSequence": "GR\\IR", "RepetitionTime": 2300, "EchoTime": 2.9, "InversionTime": 900}


def test_a_double_inversion_recovery_is_no_flair() -> None:
    """A 3D DIR (white matter nulled as well as fluid) has a FLAIR's long TI and TE and covers more
    than a 2D axial FLAIR: only its name tells it apart."""
    flair = _series("t2_tirm_tra_dark-fluid", slices=28, SliceThickness=5, **FLAIR)
    for name in ("t2_spc_dir_sag_p2_iso", "3D DIR", "Double IR sag", "double_inversion_recovery"):
        dir_ = _series(name, iop=[0, 1, 0, 0, 0, -1], slices=176, SliceThickness=1, **FLAIR)
        assert SeriesSelector().select([dir_, flair], ["FLAIR"])["FLAIR"] is flair, name
    assert SeriesSelector().matches("FLAIR", _series("t2_flair_dirty_sag", **FLAIR))  # not a word "dir"


def test_angiograms_and_perfusion_named_so_serve_no_role() -> None:
    """A time-of-flight angiogram whose headers do not say angio (AngioFlag absent, as Philips writes
    it) is a short-TE, short-TR gradient echo: a T1 by its attributes. In a protocol whose only other T1 is
    post-contrast, it took the native T1 role and the four-series model read an angiogram as T1. Its name
    (TOF, MRA, angio, TWIST/TRICKS) excludes it, as perfusion's (perf, DSC, DCE, PWI, ASL) do, beside a
    sequence's name too ("AX 3D TOF SPGR", "t1_vibe_dce_tra") and in its own ProtocolName; not after a
    word of timing: a structural series is often named for the run it followed ("T2 FLAIR post DSC" is
    a FLAIR). Reviews of the day's diff found each of these cases wrong in a first version."""
    from node.selection import ANGIO_PERFUSION_NAME

    gre = {"ScanningSequence": "GR", "RepetitionTime": 22, "EchoTime": 3.6, "MRAcquisitionType": "3D"}
    sagittal = [0, 1, 0, 0, 0, -1]
    post = _series("t1_mprage_sag_p2_iso post", slices=176, SliceThickness=1, iop=sagittal, **MPRAGE)
    selector = SeriesSelector()
    reason = "named as an angiogram or a perfusion series: serves no role"
    angio_or_perfusion = [
        _series(name, slices=150, SliceThickness=0.5, **gre)
        for name in ("tof_fl3d_tra_p2_multi-slab", "3D TOF COW", "MRA head", "Angio 3D", "fl3d TWIST",
                     "ep2d_perf", "ep2d_DSC", "PWI", "pCASL", "ASL 3D", "ep2d_pasl", "eASL", "AX 3D TOF SPGR",
                     "3D TOF FSPGR COW", "t1_vibe_dce_tra", "AX T1 LAVA DCE", "t1_fl3d_twist_dyn")
    ]  # fmt: skip
    tof = "tof_fl3d_tra_p2_multi-slab"
    angio_or_perfusion.append(_series("sequence 12", ProtocolName=tof, slices=150, SliceThickness=0.5, **gre))
    for other in angio_or_perfusion:
        assert selector.excluded(other) == ANGIO_PERFUSION_NAME, other.label
        assignment = selector.assign([post, other], ["T1GD", "T1"])
        assert "T1" not in assignment.chosen and assignment.chosen.get("T1GD") is post, other.label
        assert selector.not_used([post, other], assignment) == [{"series": other.label, "reason": reason}]
    # Names of T1s stay T1s, and so do structural series named for the run they followed.
    for name in ("t1_fl3d_tra", "AX T1 FSPGR 3D", "T1 TFE sag", "3D T1 Gd", "AX T1 POST PERF",
                 "t1_mprage_tra_p2_iso_post_DSC", "T1_3D_TFE_pre_DCE", "T1 after DCE"):  # fmt: skip
        assert selector.excluded(_series(name, slices=150, SliceThickness=1, **gre)) == "", name
    flair = _series("T2 FLAIR post DSC", slices=30, **FLAIR)
    assert selector.excluded(flair) == "" and selector.assign([flair], ["FLAIR"]).chosen == {"FLAIR": flair}
    # A series' description naming its sequence outweighs an angiogram's name in its ProtocolName alone
    # (an exam-wide name on a study whose PACS routes the FLAIR by itself: exam_protocols needs two).
    routed = _series("AX FLAIR", ProtocolName="BRAIN W WO MRA", slices=30, **FLAIR)
    assert selector.excluded(routed) == ""
    assert selector.assign([routed], ["FLAIR"]).chosen == {"FLAIR": routed}


@pytest.mark.filterwarnings("ignore:The value length")  # the vendor series has an over-long SH
def test_real_ge_mprage_is_never_flair() -> None:
    folder = require_shared("dicom", "ge_t1_mprage_healthy")
    [series] = scan_series(sorted(folder.iterdir()))
    selector = SeriesSelector()
    assert series.inversion_recovery and series.axial and series.slices == 130
    assert not selector.matches("FLAIR", series)
    assert selector.matches("T1", series)
    with pytest.raises(SelectionError) as info:
        selector.select([series], ["FLAIR"])
    assert str(info.value) == (
        f"no FLAIR series in the study (considered: series {series.series_instance_uid} "
        "(3D Ax T1 MP-RAGE_R22, 130 slices))"
    )


def test_attributes_beat_descriptions() -> None:
    selector = SeriesSelector()
    assert not selector.matches("FLAIR", _series("AX FLAIR (mislabelled)", **MPRAGE))
    assert selector.matches("FLAIR", _series("sequence 7", **FLAIR))
    assert selector.matches("FLAIR", _series("AX T2 FLAIR"))  # no attributes: the description decides
    assert not selector.matches(
        "FLAIR", _series("AX T2", ScanningSequence="SE", EchoTime=100, RepetitionTime=4000)
    )
    post = _series(
        "AX T1", ScanningSequence="SE", EchoTime=10, RepetitionTime=500, ContrastBolusAgent="Gadovist"
    )
    assert selector.matches("T1GD", post) and not selector.matches("T1", post)
    assert selector.matches(
        "T1GD", _series("AX T1 POST GD", ScanningSequence="SE", EchoTime=10, RepetitionTime=500)
    )
    assert not selector.matches("T1", _series("localizer T1", EchoTime=2, RepetitionTime=8))
    # A FLAIR whose ScanningSequence and ScanOptions do not say IR (and whose description the
    # pattern does not know): its TI says inversion, so it is the FLAIR and never the T2 (by TE it is).
    unflagged = _series("AX T2 FL 5mm", ScanningSequence="SE", EchoTime=120, RepetitionTime=9000,
                        InversionTime=2500)  # fmt: skip
    assert selector.matches("FLAIR", unflagged) and not selector.matches("T2", unflagged)
    # A vendor's TI of 0 on a series without inversion changes nothing.
    assert selector.matches("T2", _series("AX T2", InversionTime=0, **T2))


def test_axial_preferred_then_most_slices() -> None:
    sagittal = _series("SAG FLAIR", iop=[0, 1, 0, 0, 0, -1], slices=200, **FLAIR)
    small = _series("AX FLAIR small", slices=20, **FLAIR)
    big = _series("AX FLAIR", slices=40, **FLAIR)
    chosen = SeriesSelector().select([sagittal, small, big], ["FLAIR"])
    assert chosen["FLAIR"] is big


def test_finer_slices_win_over_axial_among_series_that_cover_the_brain() -> None:
    sagittal_3d = _series("SAG 3D FLAIR", iop=[0, 1, 0, 0, 0, -1], slices=176, SliceThickness=1, **FLAIR)
    axial_2d = _series("AX T2 FLAIR", slices=28, SliceThickness=5, SpacingBetweenSlices=6, **FLAIR)
    assert axial_2d.slice_mm == 6 and axial_2d.extent_mm == 168
    selector = SeriesSelector()
    assignment = selector.assign([axial_2d, sagittal_3d], ["FLAIR"])
    assert assignment.chosen["FLAIR"] is sagittal_3d
    assert assignment.reasons() == {"FLAIR": f"over {axial_2d.label}: finer slices"}
    # A fine slab through the lesion (60 mm) is no whole-brain series: the 2D one wins over it.
    slab = _series("AX 3D FLAIR slab", slices=60, SliceThickness=1, **FLAIR)
    assignment = selector.assign([slab, axial_2d], ["FLAIR"])
    assert assignment.chosen["FLAIR"] is axial_2d
    assert assignment.preferred["FLAIR"] == f"over {slab.label}: covers more"
    # 0.5 mm and 1 mm are one class (both read on ~1 mm blocks): then axial, as before.
    fine = _series("SAG 3D FLAIR 0.5", iop=[0, 1, 0, 0, 0, -1], slices=352, SliceThickness=0.5, **FLAIR)
    axial_3d = _series("AX 3D FLAIR", slices=150, SliceThickness=1, **FLAIR)
    assert selector.select([fine, axial_3d], ["FLAIR"])["FLAIR"] is axial_3d
    # Overlapping slices resolve their thickness, not their spacing; GE writes a spacing negative.
    overlapping = _series("COR FLAIR", iop=[1, 0, 0, 0, 0, -1], slices=40, SliceThickness=4,
                          SpacingBetweenSlices=-2, **FLAIR)  # fmt: skip
    assert overlapping.slice_mm == 4
    assert selector.select([axial_2d, overlapping], ["FLAIR"])["FLAIR"] is overlapping
    # The order holds for every role: a 3D post-contrast MP-RAGE over a 2D axial post-contrast T1 SE.
    mprage = _series("t1_mprage_sag_KM", iop=[0, 1, 0, 0, 0, -1], slices=176, SliceThickness=1,
                     ContrastBolusAgent="Gadovist", **MPRAGE)  # fmt: skip
    t1_se = _series("AX T1 SE KM", slices=24, SliceThickness=5, ContrastBolusAgent="Gadovist", **T1)
    assert selector.select([t1_se, mprage], ["T1GD"])["T1GD"] is mprage


T2 = {"ScanningSequence": "SE", "RepetitionTime": 4500, "EchoTime": 95}
T1 = {"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 10}


def test_diffusion_angiography_and_phase_series_serve_no_role_by_their_attributes() -> None:
    """Vendor headers as scanners write them; no description here says DWI, TOF or phase in a way the
    exclude pattern knows, so only the attributes can keep each series out of the T2 and T1 roles."""
    selector = SeriesSelector()
    not_structural = [
        # Siemens trace-weighted DWI: ImageType DIFFUSION, a *ep_b SequenceName.
        _series("ep2d_diff_3scan_trace_p2", slices=48, ScanningSequence="EP", EchoTime=89,
                RepetitionTime=6600, ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"],
                SequenceName="*ep_b1000t"),
        # GE: b=0 and b=1000 in one series, the header read first a b=0 one; only the b-value says so.
        _series("AX DIFFUSION", slices=50, ScanningSequence=["SE", "EP"], EchoTime=80,
                RepetitionTime=7000, ImageType=["ORIGINAL", "PRIMARY", "OTHER"], DiffusionBValue=0.0),
        # Philips: a spin-echo scanning sequence, the b-value and directionality in the header.
        _series("DWI_SSh", slices=40, ScanningSequence="SE", EchoTime=90, RepetitionTime=3000,
                ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"], DiffusionBValue=1000.0,
                DiffusionDirectionality="ISOTROPIC"),
        # An echo-planar T2-weighted series without b-values: a b=0 image or perfusion, not a T2.
        _series("ep2d T2", slices=60, ScanningSequence="EP", EchoTime=70, RepetitionTime=5000),
        # The phase images of a T2 (Siemens 'P', Philips 'P_SE', an Enhanced MR ComplexImageComponent).
        _series("t2_tse_tra", slices=48, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"], **T2),
        _series("T2W_TSE", slices=48, ImageType=["ORIGINAL", "PRIMARY", "P_SE", "P", "SE"], **T2),
        _series("T2 enhanced", slices=48, ComplexImageComponent="PHASE", **T2),
    ]  # fmt: skip
    for series in not_structural:
        assert selector.assign([series], ["T2"]).missing == ["T2"], series.label
    # Underscores count as spaces for the patterns: "DWI_SSh" is excluded by its name too.
    assert not selector.matches("T2", _series("DWI_SSh", **T2))
    # Magnitude images of every vendor stay T2s.
    magnitudes = (["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"])
    for image_type in magnitudes:
        assert selector.matches("T2", _series("t2", ImageType=image_type, **T2))
    # Beside a real T2 with fewer slices, none of them takes the role.
    t2 = _series("AX T2", slices=24, **T2)
    assert selector.select([*not_structural, t2], ["T2"])["T2"] is t2

    # A time-of-flight angiogram is T1-weighted by TE and TR; AngioFlag (or the Enhanced MR flavour
    # ANGIO) says what it is, and the real T1 keeps its role however many more slices the TOF has.
    tof = _series("3D multi-slab", slices=160, ScanningSequence="GR", EchoTime=3.4, RepetitionTime=22,
                  AngioFlag="Y")  # fmt: skip
    flavour = _series("fl3d", slices=160, ScanningSequence="GR", EchoTime=3.4, RepetitionTime=22,
                      ImageType=["ORIGINAL", "PRIMARY", "ANGIO", "NONE"])  # fmt: skip
    t1 = _series("AX T1", slices=24, **T1)
    assert tof.special == flavour.special == "angiography"
    assert selector.select([tof, flavour, t1], ["T1"])["T1"] is t1
    assert sorted(selector.assign([tof, flavour], ["T1", "T1GD"]).missing) == ["T1", "T1GD"]


def test_susceptibility_weighted_series_are_never_t1_or_t2() -> None:
    """A T2* gradient echo and an SWI have a short TR and a TE under ``t1_max_te_ms``: by those alone
    they are T1s, and an axial SWI of 3D slices outnumbers any T1. Vendor headers as scanners write
    them, none described in words the exclude pattern knows."""
    selector = SeriesSelector()
    gre = {"ScanningSequence": "GR", "SequenceVariant": "SP\\OSP"}
    t2star = [
        # A 2D T2* GRE ("hemo" sequence): TE 20 ms, TR 650 ms, flip 20 degrees.
        _series("AX GRE", slices=30, EchoTime=20, RepetitionTime=650, FlipAngle=20, **gre),
        # Siemens SWI magnitude: TE 20, TR 27, ImageType SWI, SequenceName *swi3d1r.
        _series("SWI_Images", slices=144, EchoTime=20, RepetitionTime=27, SequenceName="*swi3d1r",
                ImageType=["ORIGINAL", "PRIMARY", "M", "SWI", "ND", "NORM"], **gre),
        # Its minimum-intensity projection.
        _series("mIP_Images(SW)", slices=136, EchoTime=20, RepetitionTime=27,
                ImageType=["DERIVED", "PRIMARY", "MNIP", "ND"], **gre),
        # GE SWAN (several echoes combined): the first echo's TE in the header, SequenceName swan.
        _series("Ax SWAN", slices=120, EchoTime=4.5, RepetitionTime=40, SequenceName="swan",
                ImageType=["ORIGINAL", "PRIMARY", "OTHER"], **gre),
        # Philips SWIp magnitude: a gradient echo by its TE alone.
        _series("SWIp", slices=130, EchoTime=18, RepetitionTime=31,
                ImageType=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"], **gre),
        # An Enhanced MR T2* image: EchoPulseSequence GRADIENT, AcquisitionContrast T2_STAR.
        _series("enhanced", slices=60, EffectiveEchoTime=25, RepetitionTime=700, EchoPulseSequence="GRADIENT",
                AcquisitionContrast="T2_STAR"),
        # The same without AcquisitionContrast: its echo pulse sequence and TE tell.
        _series("enhanced 2", slices=60, EffectiveEchoTime=25, RepetitionTime=700,
                EchoPulseSequence="GRADIENT"),
        # A long-TE gradient echo is no T2 either.
        _series("AX T2 FFE", slices=40, EchoTime=70, RepetitionTime=3000, **gre),
    ]  # fmt: skip
    for series in t2star:
        missing = selector.assign([series], ["T1", "T1GD", "T2"]).missing
        assert sorted(missing) == ["T1", "T1GD", "T2"], series.label
    assert [s.special for s in t2star[1:4]] == ["susceptibility-weighted"] * 3
    # Beside them the real T1s keep their roles: a sagittal MP-RAGE (fewer axial slices than the SWI)
    # as the native T1, and an axial T1 SE described +C acquired after it as the post-contrast one, the
    # T2* series acquired later still (an SWI after contrast, as many protocols have it).
    mprage = _series("t1_mprage_sag", iop=[0, 1, 0, 0, 0, -1], slices=176, AcquisitionTime="090000",
                     StudyDate="20261202", **MPRAGE)  # fmt: skip
    post = _series("AX T1 SE +C", slices=24, AcquisitionTime="093000", StudyDate="20261202", **T1)
    later = [dataclasses.replace(s, acquired=(post.acquired or 0) + 600.0 + n) for n, s in enumerate(t2star)]
    chosen = selector.select([*later, mprage, post], ["T1", "T1GD"])
    assert chosen == {"T1": mprage, "T1GD": post}
    # Gradient echoes that are T1s stay T1s: FLASH, SPGR, VIBE (short TE) and an Enhanced MR one.
    for t1 in (
        _series("t1_fl2d_tra", EchoTime=2.5, RepetitionTime=250, FlipAngle=70, **gre),
        _series("Ax 3D FSPGR", EchoTime=3.1, RepetitionTime=8, **gre),
        _series("t1_vibe", EchoTime=1.4, RepetitionTime=4.1, **gre),
        _series("T1 enhanced", EffectiveEchoTime=4.6, RepetitionTime=9, EchoPulseSequence="GRADIENT"),
    ):
        assert selector.matches("T1", t1) and not t1.special, t1.label


def _vendor_series(vendor: str, description: str, slices: int, **attrs: object) -> SeriesInfo:
    """A series from a real vendor header (its first file), with its own UID and description and the
    attributes ``attrs`` (None deletes one), as the scanner would write them for another sequence; of one
    patient whatever the vendor (a study of one scanner)."""
    source = sorted(require_shared("dicom", vendor).iterdir())[0]
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    ds.SeriesInstanceUID, ds.SeriesDescription = pydicom.uid.generate_uid(), description
    ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SELECTION-1", "19700101", "O"
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return series_info(ds, [], slices)


@pytest.mark.filterwarnings("ignore:The value length")  # the GE series has an over-long SH
def test_an_mp2rage_gives_its_uni_image_and_a_balanced_ssfp_is_no_t1() -> None:
    """A Siemens MP2RAGE sends four series: INV1 and INV2 (ORIGINAL; INV2, TI 2500 ms, is proton-density
    -like), the UNI image (DERIVED from them, the T1 a reader uses) and a T1 map. The inversions won the
    native T1 role by ORIGINAL, tied with each other (the order received chose), and the map was a
    candidate. A whole-brain axial balanced SSFP (T2/T1 contrast, TR ~5 ms) beat a sagittal MP-RAGE by
    being axial. Real Siemens, GE and Philips headers, changed to these sequences as the scanners write
    them."""
    selector = SeriesSelector()
    sag = [0, 1, 0, 0, 0, -1]
    mp2rage = {"ScanningSequence": "GR\\IR", "SequenceVariant": "SK\\SP\\MP", "RepetitionTime": 5000,
               "EchoTime": 2.9, "SliceThickness": 1, "SpacingBetweenSlices": None,
               "SequenceName": "*tfl3d1_16", "ProtocolName": "t1_mp2rage_sag_p3",
               "ImageOrientationPatient": sag}  # fmt: skip
    inv1, inv2, uni, t1_map = mp2 = [
        _vendor_series(
            "siemens_t1_fl2d_sag_healthy", f"t1_mp2rage_sag_p3_{name}", 176, InversionTime=ti,
            ImageType=image_type, **mp2rage
        )
        for name, ti, image_type in (
            ("INV1", 700, "ORIGINAL\\PRIMARY\\M\\ND"),
            ("INV2", 2500, "ORIGINAL\\PRIMARY\\M\\ND"),
            ("UNI_Images", 700, "DERIVED\\PRIMARY\\M\\ND\\UNI"),
            ("T1_Images", 700, "DERIVED\\PRIMARY\\T1 MAP\\ND"),
        )
    ]
    for order in (mp2, mp2[::-1]):
        assignment = selector.assign(order, ["T1"])
        assert assignment.chosen == {"T1": uni} and assignment.alternatives["T1"] == []
    assert not selector.matches("T1", inv1) and not selector.matches("T1", inv2) and t1_map.derived_map
    assert {n["series"]: n["reason"] for n in selector.not_used(mp2, assignment)} == {
        inv1.label: "an MP2RAGE inversion image (INV1, INV2): no T1, serves no role",
        inv2.label: "an MP2RAGE inversion image (INV1, INV2): no T1, serves no role",
        t1_map.label: "derived map (ImageType T1 MAP): serves no role",
    }
    # The UNI image ranks as an acquisition: a 2D axial T1 of 5 mm does not win over it.
    t1_se = _vendor_series("siemens_t1_fl2d_sag_healthy", "t1_se_tra", 28, ScanningSequence="SE",
                           SequenceVariant="SP\\OSP", SequenceName="*se2d1", RepetitionTime=550,
                           EchoTime=10, SliceThickness=5, SpacingBetweenSlices=6,
                           ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ProtocolName="t1_se_tra")  # fmt: skip
    assert selector.select([t1_se, *mp2], ["T1"])["T1"] is uni

    mprage = _vendor_series("siemens_t1_fl2d_sag_healthy", "t1_mprage_sag_p2_iso", 176,
                            ScanningSequence="GR\\IR", SequenceVariant="SK\\SP\\MP",
                            SequenceName="*tfl3d1_16ns", RepetitionTime=2300, EchoTime=2.3, InversionTime=900,
                            SliceThickness=1, SpacingBetweenSlices=None,
                            ProtocolName="t1_mprage_sag_p2_iso")  # fmt: skip
    ax = [1, 0, 0, 0, 1, 0]
    bssfp = [
        # GE 3D FIESTA, described neutrally: SequenceVariant SS alone at TR 5, TE 2.2 says it.
        _vendor_series("ge_t1_mprage_healthy", "Ax 3D high res", 180, ScanningSequence="GR",
                       SequenceVariant="SS", ScanOptions="FAST_GEMS", RepetitionTime=5.0, EchoTime=2.2,
                       InversionTime=None, SliceThickness=0.8, SpacingBetweenSlices=0.8,
                       ImageOrientationPatient=ax, ImageType="ORIGINAL\\PRIMARY\\OTHER"),
        # Siemens CISS: its SequenceName says it.
        _vendor_series("siemens_t1_fl2d_sag_healthy", "3d tra iso", 176, ScanningSequence="GR",
                       SequenceVariant="SK", SequenceName="*ci3d1", RepetitionTime=5.4, EchoTime=2.4,
                       SliceThickness=0.7, SpacingBetweenSlices=None, ImageOrientationPatient=ax,
                       ProtocolName="3d tra iso"),
        # Siemens TrueFISP.
        _vendor_series("siemens_t1_fl2d_sag_healthy", "t2_trufi3d_tra", 176, ScanningSequence="GR",
                       SequenceVariant="SK\\SS", SequenceName="*tfi3d1_16", RepetitionTime=4.6,
                       EchoTime=2.3, SliceThickness=0.7, SpacingBetweenSlices=None,
                       ImageOrientationPatient=ax, ProtocolName="t2_trufi3d_tra"),
        # A PSIF (time-reversed steady state).
        _vendor_series("siemens_t1_fl2d_sag_healthy", "3d psif tra", 176, ScanningSequence="GR",
                       SequenceVariant="TRSS", SequenceName="*psif3d1", RepetitionTime=9, EchoTime=4,
                       SliceThickness=1, SpacingBetweenSlices=None, ImageOrientationPatient=ax,
                       ProtocolName="3d psif tra"),
        # Philips balanced FFE, by its name.
        _vendor_series("philips_t1_sag3d_mprage_healthy", "3D B-FFE tra", 200, ScanningSequence="GR",
                       SequenceVariant="SK", RepetitionTime=5.5, EchoTime=2.7, ProtocolName="3D B-FFE tra",
                       ImageOrientationPatient=ax),
    ]  # fmt: skip
    for series in bssfp:
        assert selector.balanced_ssfp(series), series.label
        assignment = selector.assign([series, mprage], ["T1"])
        assert assignment.chosen == {"T1": mprage} and assignment.alternatives["T1"] == [], series.label
        assert selector.not_used([series, mprage], assignment)[0]["reason"] == (
            "balanced steady-state free precession (FIESTA, CISS, TrueFISP...): no T1, serves no role"
        )
    # Spoiled and prepared gradient echoes stay T1s: the MP-RAGE (*tfl3d1), the real Philips MP-RAGE
    # (SequenceVariant MP, TR 6.5 ms), a GE FSPGR (SS and SP, TR 8 ms).
    fspgr = _vendor_series("ge_t1_mprage_healthy", "Ax 3D FSPGR", 160, ScanningSequence="GR",
                           SequenceVariant="SS\\SP", RepetitionTime=8, EchoTime=3.1, InversionTime=None)
    philips = _vendor_series("philips_t1_sag3d_mprage_healthy", "ADNI_Sag3D MPRAGE", 170)
    for t1 in (mprage, philips, fspgr):
        assert selector.matches("T1", t1) and not selector.balanced_ssfp(t1), t1.label


def test_dynamic_series_serve_no_role() -> None:
    """A DCE series is a contrast-enhanced T1 gradient echo with many time points at each position: by
    its attributes and slice count the best T1GD. NumberOfTemporalPositions says what it is."""
    selector = SeriesSelector()
    dce = _series("t1_vibe_dyn", slices=1200, ScanningSequence="GR", EchoTime=1.5, RepetitionTime=4.1,
                  ContrastBolusAgent="Gadobutrol", NumberOfTemporalPositions=60)  # fmt: skip
    post = _series("AX T1 +C", slices=24, ContrastBolusAgent="Gadobutrol", **T1)
    assert dce.special == "dynamic (60 time points)"
    assert selector.select([dce, post], ["T1GD"])["T1GD"] is post
    # One time point (as vendors write it on every series) changes nothing.
    assert not _series("AX T1", NumberOfTemporalPositions=1, **T1).special


def test_a_repeated_series_wins_over_the_first_and_the_others_are_kept_in_order() -> None:
    first = _series("AX FLAIR", AcquisitionTime="091000", StudyDate="20261202", **FLAIR)
    repeat = _series("AX FLAIR repeat", AcquisitionTime="093000", StudyDate="20261202", **FLAIR)
    sagittal = _series("SAG FLAIR", iop=[0, 1, 0, 0, 0, -1], slices=200, **FLAIR)
    assignment = SeriesSelector().assign([first, sagittal, repeat], ["FLAIR"])
    assert assignment.chosen["FLAIR"] is repeat
    assert assignment.alternatives["FLAIR"] == [first, sagittal]
    # A FLAIR after contrast, acquired later still, does not replace the native one.
    post = _series(
        "AX FLAIR +C", AcquisitionTime="095000", StudyDate="20261202", ContrastBolusAgent="Gd", **FLAIR
    )
    assert SeriesSelector().select([post, first, repeat], ["FLAIR"])["FLAIR"] is repeat


def test_a_flair_after_contrast_by_its_description_or_timing_does_not_replace_the_native_one() -> None:
    """A post-contrast FLAIR often has no Contrast/Bolus attributes: its description says so, or it was
    acquired after a T1 given contrast. The native FLAIR wins (as BraTS has it) and the basis says why;
    a post-contrast FLAIR alone is still used, and the basis says that too."""
    day = {"StudyDate": "20261202"}
    native = _series("AX FLAIR", AcquisitionTime="091000", **day, **FLAIR)
    described = _series("AX FLAIR POST GD", AcquisitionTime="093000", **day, **FLAIR)
    selector = SeriesSelector()
    assignment = selector.assign([described, native], ["FLAIR"])
    assert assignment.chosen["FLAIR"] is native
    assert assignment.reasons()["FLAIR"] == (
        f"over {described.label}: not given contrast (the other: description (no contrast attributes))"
    )
    # The same description, acquired after a T1 given contrast (contrast stays for the rest).
    t1gd = _series("AX T1", AcquisitionTime="092000", ContrastBolusAgent="Gadovist", **day, **T1)
    timed = _series("AX T2 FLAIR", AcquisitionTime="093000", **day, **FLAIR)
    assignment = selector.assign([timed, native, t1gd], ["FLAIR", "T1GD"])
    assert assignment.chosen == {"FLAIR": native, "T1GD": t1gd}
    assert assignment.reasons()["FLAIR"].endswith(
        "not given contrast (the other: acquired after a series given contrast (no contrast attributes or "
        "description))"
    )
    # The only FLAIR is post-contrast: used, and said so.
    assignment = selector.assign([described], ["FLAIR"])
    assert assignment.chosen["FLAIR"] is described
    assert assignment.reasons()["FLAIR"] == (
        "given contrast: description (no contrast attributes); no FLAIR candidate without contrast"
    )


def _ge_exam(protocol: str) -> list[SeriesInfo]:
    """A GE tumour exam from the real GE header: ProtocolName is the exam's protocol-library name on every
    series, as GE writes it; each series its own description and acquisition attributes."""
    source = sorted(require_shared("dicom", "ge_t1_mprage_healthy").iterdir())[0]
    sag = [0, 1, 0, 0, 0, -1]
    series = [
        ("Ax T2 FLAIR", "100500", 28, {"ScanningSequence": "SE\\IR", "RepetitionTime": 9000, "EchoTime": 120,
                                       "InversionTime": 2500, "SliceThickness": 5}),
        ("Ax T2 FSE", "101000", 28, {"ScanningSequence": "SE", "RepetitionTime": 5000, "EchoTime": 100,
                                     "SliceThickness": 5}),
        ("Ax T1 SE", "101500", 28, {"ScanningSequence": "SE", "RepetitionTime": 550, "EchoTime": 10,
                                    "SliceThickness": 5}),
        ("3D Ax T1 MP-RAGE_R22", "103000", 130, {}),  # the header's own series, after contrast here
        ("Sag CUBE FLAIR", "103500", 160, {"ScanningSequence": "SE\\IR", "RepetitionTime": 6000,
                                           "EchoTime": 110, "InversionTime": 1800, "iop": sag}),
    ]  # fmt: skip
    out = []
    for description, time, slices, attrs in series:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        ds.SeriesInstanceUID, ds.SeriesDescription = pydicom.uid.generate_uid(), description
        ds.ProtocolName = protocol
        ds.AcquisitionTime = ds.SeriesTime = time
        ds.ImageOrientationPatient = attrs.pop("iop", ds.ImageOrientationPatient)
        if description != "3D Ax T1 MP-RAGE_R22":
            ds.ScanOptions = "FAST_GEMS\\IR_GEMS" if "InversionTime" in attrs else "FAST_GEMS"
            if "InversionTime" not in attrs:
                del ds.InversionTime
        for key, value in attrs.items():
            setattr(ds, key, value)
        if "SliceThickness" in attrs:  # 2D: 5 mm slices 6 mm apart
            ds.SpacingBetweenSlices = 6
        out.append(series_info(ds, [], slices))
    out[3].description += " +C"  # post-contrast by its description alone, as GE names it
    return out


@pytest.mark.filterwarnings("ignore:The value length")  # the vendor series has an over-long SH
def test_a_ge_exam_wide_protocol_name_neither_excludes_nor_sets_the_contrast_of_a_series() -> None:
    """GE writes the exam's protocol-library name in ProtocolName on every series. "BRAIN TUMOR
    PERFUSION" excluded every series (exclude_pattern "perfusion"), "W/WO CONTRAST" made every T1
    pre-contrast, "WITH CONTRAST" every T1 post-contrast. A ProtocolName shared by series of different
    descriptions is the exam's: the series' own description and attributes decide."""
    selector = SeriesSelector()
    for protocol in ("BRAIN TUMOR PERFUSION", "MR BRAIN W/WO CONTRAST", "MR BRAIN WITH CONTRAST",
                     "Brain Advanced Sequences"):  # fmt: skip
        flair_2d, t2, t1, mprage_post, flair_3d = series = _ge_exam(protocol)
        assert exam_protocols(series) == {protocol.casefold()}
        assignment = selector.assign(series, ["FLAIR", "T1", "T1GD", "T2"])
        assert assignment.chosen == {"FLAIR": flair_3d, "T1GD": mprage_post, "T1": t1, "T2": t2}, protocol
        assert assignment.basis["T1GD"] == "description (no contrast attributes)"
        assert assignment.basis["T1"] == "no contrast attributes or description"
        assert assignment.basis["FLAIR"] == (
            "given contrast: acquired after a series given contrast (no contrast attributes or description)"
        )
        assert selector.not_used(series, assignment) == [
            {"series": flair_2d.label,
             "reason": f"a FLAIR candidate ranked below {flair_3d.label}: finer slices"},
        ]  # fmt: skip
    # A ProtocolName of one series (Siemens, Philips) is still its hint: excluded by it, and said so.
    perfusion = _series("sequence 12", ProtocolName="ep2d_perfusion", **T2)
    t2 = _series("AX T2", ProtocolName="AX T2", **T2)
    assert exam_protocols([perfusion, t2]) == frozenset()
    assignment = selector.assign([perfusion, t2], ["T2"])
    assert assignment.chosen == {"T2": t2}
    assert selector.not_used([perfusion, t2], assignment) == [
        {"series": perfusion.label,
         "reason": "excluded by its ProtocolName (exclude_pattern): serves no role"},
    ]  # fmt: skip
    post = _series("t1 se tra", ProtocolName="t1_se_tra_KM", **T1)
    assert selector.contrast_evidence([post, t2])[post.series_instance_uid] == (
        True, "ProtocolName (no contrast attributes)"
    )
    # A study the PACS routes as its FLAIR alone: exam_protocols cannot tell GE's exam-wide name from
    # one series, and a description naming the sequence outweighs a ProtocolName alone (found by review
    # of the day's diff: "BRAIN TUMOR PERFUSION" still excluded that FLAIR).
    flair_alone = _ge_exam("BRAIN TUMOR PERFUSION")[0]
    assert exam_protocols([flair_alone]) == frozenset()
    assert selector.assign([flair_alone], ["FLAIR"]).chosen == {"FLAIR": flair_alone}
    assert selector.excluded(perfusion) == "ProtocolName"  # a description naming no sequence: excluded


def test_the_series_not_used_are_listed_with_why_and_bounded() -> None:
    flair = _series("AX FLAIR", slices=30, **FLAIR)
    screen = _series("AX FLAIR screen", slices=1, ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"], **FLAIR)
    adc = _series("ADC", ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "ADC"], ScanningSequence="EP")
    dwi = _series("ep2d_diff", ScanningSequence="EP", EchoTime=89, DiffusionBValue=1000.0)
    scout = _series("AAHead_Scout", EchoTime=2, RepetitionTime=8)
    t2 = _series("AX T2", **T2)
    pd = _series("AX PD", ScanningSequence="SE", EchoTime=15, RepetitionTime=3000)
    series = [flair, screen, adc, dwi, scout, t2, pd]
    selector = SeriesSelector()
    assignment = selector.assign(series, ["FLAIR"])
    assert selector.not_used(series, assignment) == [
        {"series": screen.label,
         "reason": f"a FLAIR candidate ranked below {flair.label}: ORIGINAL, not DERIVED"},
        {"series": adc.label, "reason": "derived map (ImageType ADC): serves no role"},
        {"series": dwi.label, "reason": "diffusion: serves no role"},
        {"series": scout.label, "reason": "excluded by its description (exclude_pattern): serves no role"},
        {"series": t2.label, "reason": "a T2 candidate; the model that ran has no T2 input"},
        {"series": pd.label, "reason": "no role: not FLAIR, T1, T1GD or T2 by its attributes or description"},
    ]
    # The chosen series could not be read and the next one was used (node/pipeline.py _load_role).
    assignment.replaced.append(f"FLAIR {flair.label} could not be read (duplicate positions); ...")
    assignment.chosen["FLAIR"] = screen
    assert selector.not_used(series, assignment)[0] == {
        "series": flair.label, "reason": "the FLAIR chosen first, could not be read (see series replaced)"
    }
    # At most `limit` entries, then a count.
    assert selector.not_used(series, assignment, limit=2)[2:] == [
        {"series": "4 more series", "reason": "not listed (at most 2 are)"}
    ]


def test_selection_reads_the_converter_study(tmp_path: Path) -> None:
    from converters.dicom_writer import write_study
    from converters.synthetic import make_synthetic_case

    study = write_study(make_synthetic_case(2, (16, 16, 8)), tmp_path)
    series = scan_series(p for files in study.files.values() for p in files)
    chosen = SeriesSelector().select(series, ["FLAIR", "T1", "T1GD", "T2"])
    assert {m: s.series_instance_uid for m, s in chosen.items()} == study.series_uids


# -- model runtime -------------------------------------------------------------------------------------------


def test_device_check() -> None:
    assert check_device("CPU", ["CPU"]) == "CPU"
    assert check_device("GPU", ["CPU", "GPU.0"]) == "GPU"
    assert check_device("AUTO", []) == "AUTO"
    with pytest.raises(
        ModelLoadError, match=r"node.inference_device 'NPU' is not available .*OpenVINO sees: CPU"
    ):
        check_device("NPU", ["CPU"])


def test_tampered_model_is_refused_and_previous_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    registry = Registry(make_session_factory(make_engine(url)))
    v1 = install_model(registry, make_threshold_model(tmp_path / "v1"))
    runtime = ModelRuntime(registry, "whole_tumor", "CPU")
    assert runtime.refresh() is not None and runtime.current and runtime.current.info.id == v1.id
    v2_dir = make_threshold_model(tmp_path / "v2", version="2.0.0")
    v2 = install_model(registry, v2_dir)
    with open(v2_dir / "model_fp32.bin", "r+b") as fh:  # tampered after promotion
        fh.seek(0)
        fh.write(b"\xff\xff\xff\xff")
    loaded = runtime.refresh()
    assert loaded is not None and loaded.info.id == v1.id
    assert (
        f"model #{v2.id} test-threshold 2.0.0 ir/fp32: file {v2_dir / 'model_fp32.bin'} sha256"
        in runtime.last_error
    )
    assert "(tampered or corrupt); not loaded" in runtime.last_error
    assert "keeping the previous model" in caplog.text
    v3 = install_model(registry, make_threshold_model(tmp_path / "v3", version="3.0.0"))
    loaded = runtime.refresh()
    assert loaded is not None and loaded.info.id == v3.id and runtime.last_error == ""


def test_a_card_the_node_cannot_run_is_reported_as_a_card_error(
    tmp_path: Path, sqlite_sf: SessionFactory
) -> None:
    """The runtime said "OpenVINO cannot compile" whatever failed; a bad card is named as one."""
    registry = Registry(sqlite_sf)
    info = install_model(registry, make_threshold_model(tmp_path / "m", crop=(32, 32)))
    assert info.card is not None
    card = json.loads(json.dumps(info.card))
    card["preprocessing"]["orientation"] = "LPS"
    runtime = ModelRuntime(registry, "whole_tumor", "CPU")
    with pytest.raises(ModelLoadError) as refused:
        runtime.load(dataclasses.replace(info, card=card))
    message = str(refused.value)
    assert message.startswith(f"model {info.label}: its model card is not one this node can run: ")
    assert "preprocessing.orientation 'LPS' is not supported" in message
    assert "cannot compile" not in message
    assert runtime.load(info).info.id == info.id  # the same files with their own card load


def test_after_a_refused_model_a_rollback_clears_the_error_and_a_retired_model_never_serves(
    tmp_path: Path, sqlite_sf: SessionFactory
) -> None:
    registry = Registry(sqlite_sf)
    v1 = install_model(registry, make_threshold_model(tmp_path / "v1"))
    runtime = ModelRuntime(registry, "whole_tumor", "CPU")
    assert runtime.refresh() is not None

    def refused_v2(name: str) -> int:
        directory = make_threshold_model(tmp_path / name, version=f"2.0.{len(name)}")
        v2 = install_model(registry, directory)
        (directory / "model_fp32.bin").write_bytes(b"\0" * 8)  # broken after promotion
        loaded = runtime.refresh()
        assert loaded is not None and loaded.info.id == v1.id and runtime.last_error
        return int(v2.id)

    refused_v2("v2")
    assert registry.rollback("whole_tumor").id == v1.id
    loaded = runtime.refresh()
    assert loaded is not None and loaded.info.id == v1.id
    assert runtime.last_error == ""  # the refusal of a model no longer active is not the health's concern

    refused_v2("v2b")  # v1 serves in its place again, a candidate in the model table
    registry.retire(v1.id, by="admin")
    assert runtime.refresh() is None and runtime.current is None
    assert "was retired" in runtime.last_error


def test_int8_model_without_overflow_fix_on_a_cpu_without_vnni_is_logged_as_a_caveat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An INT8 model quantized without NNCF's overflow fix (the shipped 2.1.0 was) loads either way; on
    a CPU whose flags lack VNNI and AMX the node says once, at the swap, that its accuracy may fall
    below the FP32 parent's. The shipped model (quantized with the fix), an FP32 model, or a VNNI CPU
    get no such line."""
    from node import runtime as runtime_module
    from node.bootstrap import SHIPPED_MODEL_DIR, install_and_promote

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    registry = Registry(make_session_factory(make_engine(url)))
    assert runtime_module.cpu_flags()  # the real reader: this machine's flags
    avx2, vnni = frozenset({"avx2", "fma"}), frozenset({"avx2", "avx512_vnni"})
    unfixed_dir = tmp_path / "unfixed"
    shutil.copytree(SHIPPED_MODEL_DIR, unfixed_dir)
    card = json.loads((unfixed_dir / "model.json").read_text())
    shipped_version = card["version"]
    assert card["calibration"]["overflow_fix"] == "enable"
    del card["calibration"]["overflow_fix"]
    card["version"] = "0.0.1-unfixed"
    (unfixed_dir / "model.json").write_text(json.dumps(card))
    for model_dir, flags, warned in (
        (SHIPPED_MODEL_DIR, avx2, False),
        (unfixed_dir, avx2, True),
        (None, vnni, False),  # the same unfixed model, still active
    ):
        if model_dir is not None:
            install_and_promote(registry, model_dir, by="test", reason="test")
        monkeypatch.setattr(runtime_module, "cpu_flags", lambda flags=flags: flags)
        caplog.clear()
        loaded = ModelRuntime(registry, "whole_tumor", "CPU").refresh()
        assert loaded is not None and loaded.info.precision == "int8"
        assert ("quantized without NNCF's overflow fix" in caplog.text) is warned, (model_dir, flags)
        assert loaded.info.version == (shipped_version if model_dir == SHIPPED_MODEL_DIR else "0.0.1-unfixed")
    fp32 = install_model(registry, make_threshold_model(tmp_path / "fp32"))
    monkeypatch.setattr(runtime_module, "cpu_flags", lambda: avx2)
    caplog.clear()
    loaded = ModelRuntime(registry, "whole_tumor", "CPU").refresh()
    assert loaded is not None and loaded.info.id == fp32.id and "no VNNI" not in caplog.text


def test_no_active_model(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    runtime = ModelRuntime(Registry(make_session_factory(make_engine(url))), "whole_tumor")
    assert runtime.refresh() is None
    assert runtime.last_error == "no active model for task 'whole_tumor' (segnode models promote ID)"


def test_dcmread_of_spooled_instance_round_trip(tmp_path: Path) -> None:
    from node.spool import write_atomic

    ds = Dataset()
    ds.PatientID = "x"
    path = tmp_path / "a" / "b.dcm"
    import io

    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    write_atomic(path, buf.getvalue())
    assert pydicom.dcmread(path, force=True).PatientID == "x"
    assert [p.name for p in path.parent.iterdir()] == ["b.dcm"]


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    from node.exceptions import NodeError
    from node.scp import StorageSCP
    from tests.helpers.node import node_settings
    from tests.helpers.ports import silent_listener

    with silent_listener() as busy:
        port = busy.getsockname()[1]
        settings = node_settings(tmp_path, port)
        upgrade(settings.database.url)
        scp = StorageSCP(settings.node, make_session_factory(make_engine(settings.database.url)))
        with pytest.raises(
            NodeError, match=rf"^node.port: cannot listen on 127.0.0.1:{port}: Address already in use$"
        ):
            scp.start()


def test_a_spool_folder_that_cannot_be_created_is_a_one_line_error(tmp_path: Path) -> None:
    """A spool_dir under /sys (sysfs: no folder can be made there, even as root) names node.spool_dir."""
    from node.exceptions import NodeError
    from node.scp import StorageSCP
    from tests.helpers.node import node_settings

    settings = node_settings(tmp_path, 0)
    settings.node.spool_dir = "/sys/segnode-test-spool"
    upgrade(settings.database.url)
    scp = StorageSCP(settings.node, make_session_factory(make_engine(settings.database.url)))
    with pytest.raises(
        NodeError, match=r"^node.spool_dir: cannot create the spool folder /sys/segnode-test-spool: \w"
    ):
        scp.start()
    assert scp.server is None  # refused before listening


#: Start a StorageSCP on spool folder argv[1], database argv[2]; print its NodeError, or "started".
_START_SCP = """
import sys
from pathlib import Path
from db.session import make_engine, make_session_factory
from node.exceptions import NodeError
from node.scp import StorageSCP
from tests.helpers.node import node_settings
settings = node_settings(Path(sys.argv[1]), 0, db_url=sys.argv[2])
settings.node.spool_dir = sys.argv[1]
scp = StorageSCP(settings.node, make_session_factory(make_engine(settings.database.url)))
try:
    scp.start()
except NodeError as exc:
    print(exc)
else:
    print("started")
    scp.stop()
"""


def _start_scp_on(spool: Path, db_url: str, wrapper: list[str]) -> str:
    """The first line ``_START_SCP`` prints, run under ``wrapper`` (e.g. a read-only mount namespace)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [*wrapper, sys.executable, "-c", _START_SCP, str(spool), db_url],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120,
    )
    assert done.stdout, done.stderr
    return done.stdout.splitlines()[0]


@pytest.mark.parametrize("case", ["sysfs", "mode_0555", "read_only_mount"])
def test_a_spool_folder_the_node_cannot_write_is_refused_at_start(tmp_path: Path, case: str) -> None:
    """An existing spool folder that refuses new files stops the start with one line naming
    node.spool_dir, not one 0xA700 per C-STORE. Cases: /sys (no file can be made there, root included);
    a folder of mode 0555 (skipped as root, whom mode bits do not stop); a read-only bind mount in a user
    and mount namespace of its own (``unshare -Urm``; skipped where the kernel or sandbox forbids one) —
    the volume mounted readOnly of a container, which stops root too."""
    import subprocess

    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(db_url)
    spool = tmp_path / "spool"
    spool.mkdir()
    wrapper: list[str] = []
    if case == "sysfs":
        spool = Path("/sys")
    elif case == "mode_0555":
        if os.geteuid() == 0:
            pytest.skip("root writes in a folder of mode 0555; the sysfs and read_only_mount cases cover it")
        spool.chmod(0o555)
    else:
        mount = f"mount --bind {spool} {spool} && mount -o remount,bind,ro {spool} && exec \"$@\""
        wrapper = ["unshare", "-Urm", "sh", "-c", mount, "sh"]
        if shutil.which("unshare") is None or subprocess.run([*wrapper, "true"]).returncode != 0:
            pytest.skip("no user and mount namespace here (unshare -Urm) to mount the spool read-only")
    try:
        line = _start_scp_on(spool, db_url, wrapper)
    finally:
        if case == "mode_0555":
            spool.chmod(0o755)
    assert line.startswith(f"node.spool_dir: cannot write in the spool folder {spool}: "), line
    assert line.endswith(("Permission denied", "Read-only file system")), line
    assert not any(p.name.startswith(".write-probe") for p in Path(spool).iterdir())


def test_a_dual_echo_series_is_split_in_the_order_a_pacs_may_send_it(tmp_path: Path) -> None:
    """The job path (scan_grouped_series) reads a few files' echoes only: a received order whose
    first, middle and last files are all the short echo must still give two series, as scan_series
    does reading every header."""
    from node.selection import scan_grouped_series

    sources = sorted(require_shared("dicom", "siemens_t1_fl2d_sag_healthy").iterdir())
    short, long = [], []
    for n, source in enumerate(sources):
        for echo, te, out in (("1", "12", short), ("2", "100", long)):
            ds = pydicom.dcmread(source)
            ds.EchoNumbers, ds.EchoTime = echo, te
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            path = tmp_path / f"{n:03d}-{echo}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
    # Short echoes where the old two probes looked (the middle and the last file), the long ones
    # spread over the rest.
    order = short[: len(short) // 2] + long + short[len(short) // 2 :]
    order.insert(len(order) // 2, order.pop(0))
    assert {str(pydicom.dcmread(order[i]).EchoNumbers) for i in (0, len(order) // 2, -1)} == {"1"}
    grouped = scan_grouped_series({"series": order})
    assert sorted((s.echo_time, s.slices) for s in grouped) == [(12.0, len(sources)), (100.0, len(sources))]
    assert sorted(s.echo_time or 0 for s in scan_series(order)) == [12.0, 100.0]


def test_magnitude_and_real_images_of_one_series_are_two_candidates(tmp_path: Path) -> None:
    """Philips reconstructs an IR sequence's magnitude and real images into one series (ImageType
    M_IR / R_IR): read whole it has two images at each position and was refused, and when its first
    file was a real image the whole series served no role. The magnitude images are a candidate of
    their own, the real ones serve no role, on both scanning paths."""
    from converters.dicom_series import load_series
    from node.selection import scan_grouped_series

    sources = sorted(require_shared("dicom", "siemens_t1_fl2d_sag_healthy").iterdir())
    paths = []
    for n, source in enumerate(sources):
        for part in ("R", "M"):  # the real image first: it used to decide for the whole series
            ds = pydicom.dcmread(source)
            ds.ImageType = ["ORIGINAL", "PRIMARY", f"{part}_IR", part, "IR"]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            path = tmp_path / f"{n:03d}-{part}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    for scanned in (scan_grouped_series({"series": paths}), scan_series(paths)):
        by_part = {s.echo: s for s in scanned}
        assert set(by_part) == {"", "R_IR image"}, by_part
        magnitude, real = by_part[""], by_part["R_IR image"]
        assert magnitude.slices == real.slices == len(sources)
        assert not magnitude.serves_no_role and real.serves_no_role
        assert load_series(magnitude.paths).array.shape[0] == len(sources)


def _restacked(
    source: Path,
    path: Path,
    orientation: list[float] | None = None,
    position: list[float] | None = None,
    **attrs: object,
) -> Path:
    """``source`` (one image of the Siemens sagittal T1) saved as a new instance of the same series at
    ``path``, in another plane and place when given, with ``attrs`` set."""
    ds = pydicom.dcmread(source)
    if orientation is not None:
        ds.ImageOrientationPatient = orientation
    if position is not None:
        ds.ImagePositionPatient = position
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_series_of_an_axial_and_a_sagittal_stack_gives_each_stack_as_a_candidate(tmp_path: Path) -> None:
    """One SeriesInstanceUID holding a sagittal stack, an axial one and 3 coronal images (a vendor's
    "AX+SAG" reformats, a localizer's plane): read whole it was refused (mixed orientations) and the
    study had no such series. Each stack is a candidate of its own on both scanning paths, the axial
    one wins the role as an axial series would, and it loads; the 3 coronal images serve no role, as a
    stack too short to be a series."""
    from converters.dicom_series import load_series
    from converters.exceptions import InvalidSeriesError
    from node.pipeline import assemble_coregistered, load_chosen
    from node.selection import scan_grouped_series

    sources = sorted(require_shared("dicom", "siemens_t1_fl2d_sag_healthy").iterdir())
    axial, coronal = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    paths = [_restacked(source, tmp_path / f"sag-{n:03d}.dcm") for n, source in enumerate(sources)]
    paths += [
        _restacked(source, tmp_path / f"ax-{n:03d}.dcm", axial, [-130.0, -130.0, -70.0 + 4.8 * n])
        for n, source in enumerate(sources[:30])
    ]
    paths += [
        _restacked(source, tmp_path / f"cor-{n:03d}.dcm", coronal, [-130.0, -20.0 + 4.8 * n, 130.0])
        for n, source in enumerate(sources[:3])
    ]
    with pytest.raises(InvalidSeriesError, match="mixed orientations"):
        load_series(paths)
    selector = SeriesSelector()
    for scanned in (scan_grouped_series({"series": paths}), scan_series(paths)):
        by_stack = {s.stack: s for s in scanned}
        assert {k: s.slices for k, s in by_stack.items()} == {
            "sagittal stack": len(sources), "axial stack": 30, "coronal stack": 3
        }, by_stack
        localizer_like = by_stack["coronal stack"]
        assert localizer_like.serves_no_role and "fewer than 8" in localizer_like.special
        assignment = selector.assign(scanned, ["T1"])
        chosen = assignment.chosen["T1"]
        assert chosen.stack == "axial stack" and "axial stack" in chosen.label
        assert assignment.alternatives["T1"] == [by_stack["sagittal stack"]]
        reasons = {entry["series"]: entry["reason"] for entry in selector.not_used(scanned, assignment)}
        assert set(reasons) == {by_stack["sagittal stack"].label, by_stack["coronal stack"].label}
        assert reasons[by_stack["sagittal stack"].label].endswith(": axial")
        loaded = load_chosen(chosen, "T1")
        assert loaded.volume.array.shape[0] == 30
        # One copy of the voxels in memory: the volume's (slice, row, column) array is a view of the RAS one.
        assert np.shares_memory(loaded.volume.array, loaded.array) and not loaded.array.flags.writeable
        # The SEG's and SR's sources: the axial stack's instances only.
        sources_used = assemble_coregistered({"T1": loaded}, "T1").sources
        assert {str(ds.SOPInstanceUID) for ds in sources_used} == {
            str(pydicom.dcmread(p).SOPInstanceUID) for p in paths if p.name.startswith("ax-")
        }


def test_two_acquisitions_at_the_same_positions_in_one_series_are_two_candidates(tmp_path: Path) -> None:
    """A series repeated at the same positions under one SeriesInstanceUID (AcquisitionNumber 1 and 2:
    a repeat after motion) was refused whole for its duplicate positions. Each acquisition is a
    candidate, received interleaved or one after the other, and the one chosen loads."""
    from converters.dicom_series import load_series
    from converters.exceptions import InvalidSeriesError
    from node.pipeline import load_chosen
    from node.selection import scan_grouped_series

    sources = sorted(require_shared("dicom", "siemens_t1_fl2d_sag_healthy").iterdir())
    first, second = [], []
    for n, source in enumerate(sources):
        for number, time_, out in (("1", "150441", first), ("2", "151441", second)):
            path = tmp_path / f"{n:03d}-{number}.dcm"
            out.append(_restacked(source, path, AcquisitionNumber=number, AcquisitionTime=time_))
    interleaved = [p for pair in zip(first, second, strict=True) for p in pair]
    with pytest.raises(InvalidSeriesError, match="duplicate positions"):
        load_series(interleaved)
    for order in (interleaved, first + second):
        for scanned in (scan_grouped_series({"series": order}), scan_series(order)):
            by_stack = {s.stack: s for s in scanned}
            assert {k: s.slices for k, s in by_stack.items()} == {
                "acquisition 1": len(sources), "acquisition 2": len(sources)
            }, by_stack
            assert set(by_stack["acquisition 2"].paths) == set(second)
            chosen = SeriesSelector().assign(scanned, ["T1"]).chosen["T1"]
            assert chosen.stack == "acquisition 1"  # the native T1 role takes the one acquired first
            assert load_chosen(chosen, "T1").volume.array.shape[0] == len(sources)
    # Three acquisitions at the same positions are the phases of a dynamic series (a DCE whose headers
    # give no NumberOfTemporalPositions; its first phases precede the contrast its header names): kept
    # whole, refused by the loader as before, no phase a candidate of its own.
    third = [
        _restacked(source, tmp_path / f"{n:03d}-3.dcm", AcquisitionNumber="3", AcquisitionTime="152441")
        for n, source in enumerate(sources)
    ]
    phases = first + second + third
    for scanned in (scan_grouped_series({"series": phases}), scan_series(phases)):
        assert [(s.stack, s.slices) for s in scanned] == [("", 3 * len(sources))], scanned
        assert scanned[0].special == f"dynamic ({3 * len(sources)} images at {len(sources)} positions)"


def test_a_dynamic_series_that_does_not_say_so_serves_no_role(tmp_path: Path) -> None:
    """A Philips SE-EPI perfusion (ScanningSequence SE, contrast attributes, no NumberOfTemporalPositions,
    one AcquisitionNumber for all its time points) is a T2 by its TE, and took the T2 role from the real
    T2 by its image count ("covers more"), then to be refused by the loader for its repeated positions.
    More than two images to a position make it dynamic on both scanning paths, received one time point
    after the other or one position after the other (20 positions: the probes of the grouped scan then
    meet no position twice); the T2 is chosen and loads. Real Philips headers."""
    from node.pipeline import load_chosen
    from node.selection import scan_grouped_series

    sources = sorted(require_shared("dicom", "philips_t1_sag3d_mprage_healthy").iterdir())[:20]
    se = {"ScanningSequence": "SE", "SequenceVariant": "SK", "MRAcquisitionType": "2D",
          "ImageType": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]}  # fmt: skip

    def series(name: str, dynamics: int, **attrs: object) -> list[Path]:
        folder = tmp_path / name
        folder.mkdir()
        uid, paths = pydicom.uid.generate_uid(), []
        for t in range(dynamics):
            for n, source in enumerate(sources):
                ds = pydicom.dcmread(source)
                del ds.NumberOfTemporalPositions, ds.TemporalPositionIdentifier
                ds[0x2005, 0x140F].value[0].EchoPulseSequence = "SPIN"  # Philips' private copy of it
                ds.SeriesInstanceUID, ds.SeriesDescription, ds.ProtocolName = uid, name, f"WIP {name}"
                for keyword, value in {**se, **attrs}.items():
                    setattr(ds, keyword, value)
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
                path = folder / f"{n:03d}-{t:02d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
        return paths

    t2 = series("T2W_TSE", 1, EchoTime=100, RepetitionTime=5000)
    pwi = series("PWI_SE", 3, EchoTime=75, RepetitionTime=1600, ContrastBolusAgent="Gadovist")
    by_position = sorted(pwi, key=lambda p: p.name)  # time-major as made; this: one position after another
    selector = SeriesSelector()
    for order in (pwi, by_position):
        for scanned in (scan_grouped_series({"t2": t2, "pwi": order}), scan_series(t2 + order)):
            real, dynamic = scanned
            assert (real.description, dynamic.description) == ("T2W_TSE", "PWI_SE")
            assert dynamic.special == f"dynamic ({3 * len(sources)} images at {len(sources)} positions)"
            assignment = selector.assign(scanned, ["T2"])
            assert assignment.chosen == {"T2": real} and assignment.alternatives["T2"] == []
            assert {n["series"]: n["reason"] for n in selector.not_used(scanned, assignment)} == {
                dynamic.label: f"{dynamic.special}: serves no role"
            }
            assert not real.special and real.slices == len(sources)
    assert load_chosen(real, "T2").volume.array.shape[0] == len(sources)


def test_a_philips_dwi_whose_first_image_is_b0_is_diffusion_by_any_image(tmp_path: Path) -> None:
    """A Philips DWI says EP nowhere (ScanningSequence SE) and writes DiffusionBValue 0 on every image,
    diffusion or not (as on the real T1 here); its b-value is in the private Diffusion B-Factor
    (2001,1003), the standard one often absent. Its first image is b=0: judged on that header alone it
    was a T2 by its TE. Any image that says diffusion makes the series diffusion, on both scanning
    paths; the same series without b-values stays a T2."""
    from node.selection import scan_grouped_series

    sources = sorted(require_shared("dicom", "philips_t1_sag3d_mprage_healthy").iterdir())[:12]
    assert pydicom.dcmread(sources[0]).DiffusionBValue == 0  # written outside diffusion too

    def dwi(folder: Path, b_values: tuple[float, ...]) -> list[Path]:
        folder.mkdir()
        paths, uid = [], pydicom.uid.generate_uid()
        for b in b_values:  # b=0 at every position first, then the diffusion-weighted images
            for n, source in enumerate(sources):
                ds = pydicom.dcmread(source)
                ds.SeriesInstanceUID, ds.SeriesDescription, ds.ProtocolName = uid, "sequence 9", "WIP seq 9"
                ds.ScanningSequence, ds.SequenceVariant, ds.EchoTime, ds.RepetitionTime = "SE", "SK", 90, 3000
                ds.ImageType, ds.MRAcquisitionType = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"], "2D"
                ds[0x2005, 0x140F].value[0].EchoPulseSequence = "SPIN"  # Philips' private copy of it
                ds.private_block(0x2001, "Philips Imaging DD 001")[0x03].value = b
                if b:
                    del ds.DiffusionBValue  # only the private b-value says it
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
                path = folder / f"{b:g}-{n:03d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
        return paths

    selector = SeriesSelector()
    paths = dwi(tmp_path / "dwi", (0.0, 1000.0))
    for [series] in (scan_grouped_series({"dwi": paths}), scan_series(paths)):
        assert series.special == "diffusion", series.label
        assert selector.assign([series], ["T2"]).missing == ["T2"]
    paths = dwi(tmp_path / "t2", (0.0,))
    for [series] in (scan_grouped_series({"t2": paths}), scan_series(paths)):
        assert not series.special and selector.matches("T2", series)


@pytest.mark.filterwarnings("ignore:The value length")  # the vendor series has an over-long SH
def test_a_ge_3_plane_localizer_in_one_series_is_a_localizer_not_a_t1(tmp_path: Path) -> None:
    """A GE 3-plane loc: three slices in each of three planes in one series, ImageType without LOCALIZER,
    a description the exclude pattern does not know, a short TE and TR. It was the T1 candidate, then
    failed to load (mixed orientations). Several orientations with few slices each make a localizer at
    scan time, as does ImageType LOCALIZER or SCOUT in any image; two stacks of many slices do not."""
    from node.selection import scan_grouped_series

    sources = sorted(require_shared("dicom", "ge_t1_mprage_healthy").iterdir())
    axial, sagittal, coronal = [1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]

    def series(name: str, planes: list[tuple[list[int], int]], scout_at: int = -1) -> list[Path]:
        folder = tmp_path / name
        folder.mkdir()
        paths, uid = [], pydicom.uid.generate_uid()
        images = [iop for iop, count in planes for _ in range(count)]
        for n, (source, iop) in enumerate(zip(sources, images, strict=False)):
            ds = pydicom.dcmread(source)
            ds.SeriesInstanceUID, ds.SeriesDescription, ds.ImageOrientationPatient = uid, "3-Plane Loc", iop
            ds.ScanningSequence, ds.ScanOptions, ds.EchoTime, ds.RepetitionTime = "GR", "FAST_GEMS", 1.6, 5.1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "SCOUT" if n == scout_at else "OTHER"]
            del ds.InversionTime
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            path = folder / f"{n:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    selector = SeriesSelector()
    # Judged a localizer on the series' images together, it stays one candidate, not one per plane:
    # also with 10 slices a plane, which a stack alone would have enough of to be a series.
    for count in (3, 10):
        loc = series(f"loc{count}", [(axial, count), (sagittal, count), (coronal, count)])
        kind = f"localizer (3 orientations, {3 * count} slices)"
        for scanned in (scan_grouped_series({"loc": loc}), scan_series(loc)):
            assert [(s.special, s.slices, s.stack) for s in scanned] == [(kind, 3 * count, "")], scanned
            assert sorted(selector.assign(scanned, ["T1", "T1GD"]).missing) == ["T1", "T1GD"]
            assert selector.not_used(scanned, selector.assign(scanned, ["T1"])) == [
                {"series": scanned[0].label, "reason": f"{kind}: serves no role"}
            ]
    # One orientation, a later image of it a SCOUT: a localizer too.
    scout = series("scout", [(axial, 9)], scout_at=6)
    for [scanned] in (scan_grouped_series({"scout": scout}), scan_series(scout)):
        assert scanned.special == "localizer (ImageType LOCALIZER or SCOUT)"
    # Two stacks of 18 slices in one series are no localizer, and one stack is a T1 as before.
    for planes in ([(axial, 18), (coronal, 18)], [(axial, 18)]):
        paths = series(f"stacks{len(planes)}", planes)
        for scanned in (scan_grouped_series({"stacks": paths}), scan_series(paths)):
            assert len(scanned) == len(planes)
            assert all(not s.special and selector.matches("T1", s) for s in scanned), scanned


def test_a_lease_is_renewed_only_while_still_held(sf: SessionFactory) -> None:
    """renew_leases extends a send's lease while it is ours; one that ended (another sender may have
    claimed the send since) or a send marked meanwhile is left alone."""
    _receive(sf, "1.11", 1, T0)
    instances.schedule_due_studies(sf, 1.0, now=T0 + timedelta(seconds=5))
    job = job_queue.claim_job(sf)
    assert job is not None
    outputs = [OutputObject("/jobs/1/seg.dcm", "1.9.1"), OutputObject("/jobs/1/sr.dcm", "1.9.2")]
    destinations = [Destination("a", "A", "127.0.0.1", 1)]
    job_queue.finish_job(sf, job, status="done", outputs=outputs, destinations=destinations, now=T0)
    seg, sr = send_queue.due_sends(sf, now=T0)
    assert send_queue.claim_send(sf, seg, 10, now=T0) and send_queue.claim_send(sf, sr, 10, now=T0)
    send_queue.mark_send_failed(sf, sr.id, "no answer", base_seconds=1, max_seconds=1, now=T0)
    assert send_queue.renew_leases(sf, [seg, sr], 10, now=T0 + timedelta(seconds=5)) == 1  # not the marked
    assert not send_queue.claim_send(sf, seg, 10, now=T0 + timedelta(seconds=12))  # renewed to T0 + 15
    assert send_queue.renew_leases(sf, [seg], 10, now=T0 + timedelta(seconds=16)) == 0  # ended: not ours
    assert send_queue.claim_send(sf, seg, 10, now=T0 + timedelta(seconds=16))
