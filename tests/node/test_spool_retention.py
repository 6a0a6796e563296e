"""Spool retention over real sockets: a delivered study's files leave the spool ``spool_keep_hours``
after its result was acknowledged, a skipped study's ``failed_keep_hours`` after its run, and nothing
that may still be needed does."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from converters.case import Case
from converters.dicom_writer import StudyInfo, write_study
from converters.synthetic import make_synthetic_case
from db import instances, job_queue, retention, send_queue
from db.exceptions import JobStateError
from db.transactions import SessionFactory, utcnow
from node import spool_retention
from node.config import Destination
from node.sender import store_files
from node.service import NodeService
from node.spool_retention import remove_spooled
from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SHAPE = (48, 48, 12)
KEEP_HOURS = 48.0
FAILED_KEEP_HOURS = 240.0


@pytest.fixture(scope="module")
def case() -> Case:
    return make_synthetic_case(11, SHAPE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, case: Case) -> Path:
    return make_threshold_model(
        tmp_path_factory.mktemp("model"), crop=SHAPE[:2], spacing=case.spacing, threshold=1.5
    )


def _node(tmp_path: Path, model_dir: Path, port: int) -> NodeService:
    settings = node_settings(tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", port)])
    settings.node.spool_keep_hours = KEEP_HOURS
    settings.node.failed_keep_hours = FAILED_KEEP_HOURS
    node = NodeService(settings)
    install_model(node.registry, model_dir)
    return node


@pytest.fixture()
def served(tmp_path: Path, model_dir: Path) -> Iterator[tuple[NodeService, CatchingSCP]]:
    catcher = CatchingSCP().start(free_port())
    node = _node(tmp_path, model_dir, catcher.port)
    node.start()
    try:
        yield node, catcher
    finally:
        node.stop()
        catcher.stop()


def _send(node: NodeService, study: StudyInfo) -> None:
    files = [p for fs in study.files.values() for p in fs]
    results = store_files(files, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}


def _finished(node: NodeService, study: StudyInfo, run: int = 1) -> job_queue.JobInfo:
    def job() -> job_queue.JobInfo | None:
        for j in job_queue.list_jobs(node.sf):
            if j.study_instance_uid == study.study_instance_uid and j.run == run and j.status not in (
                "queued", "running"
            ):
                return j
        return None

    return wait_until(job, 60, f"run {run} of study {study.study_instance_uid}")  # type: ignore[no-any-return]


def _spooled(node: NodeService, study: StudyInfo) -> list[Path]:
    return sorted((node.scp.spool_dir / study.study_instance_uid).rglob("*.dcm"))


def test_a_delivered_study_leaves_the_spool_after_keep_hours_and_a_resend_is_analysed_again(
    served: tuple[NodeService, CatchingSCP], case: Case, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node, catcher = served
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    _send(node, study)
    job = _finished(node, study)
    assert job.status == "done"
    catcher.wait_for(lambda r: len(r) == 2, 30)  # SEG and SR
    wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "both sends acknowledged")
    assert len(_spooled(node, study)) == SHAPE[2]
    outputs = node.settings.node.jobs_path() / str(job.id)
    assert {"preview.png", "seg.dcm", "sr.dcm"} <= {p.name for p in outputs.rglob("*.*")}

    assert node.apply_retention(now=utcnow() + timedelta(hours=KEEP_HOURS - 1)) == 0
    assert len(_spooled(node, study)) == SHAPE[2] and outputs.is_dir()

    with caplog.at_level(logging.INFO, logger="node.spool_retention"):
        removed = node.apply_retention(now=utcnow() + timedelta(hours=KEEP_HOURS + 1))
    assert removed == SHAPE[2]
    assert not (node.scp.spool_dir / study.study_instance_uid).exists()  # its directories too
    assert not outputs.exists()  # the delivered SEG, SR and preview too: the disk does not fill up
    assert instances.instance_counts(node.sf)["kept"] == 0
    assert node.metrics.spool_removed.labels("done")._value.get() == SHAPE[2]
    assert f"study {study.study_instance_uid} delivered by job {job.id}" in caplog.text
    assert node.apply_retention(now=utcnow() + timedelta(hours=KEEP_HOURS + 2)) == 0  # nothing twice

    with pytest.raises(JobStateError, match="no longer in the spool"):
        job_queue.retry_job(node.sf, job.id)

    _send(node, study)  # the PACS sends it again: received afresh, analysed again
    again = _finished(node, study, run=2)
    assert again.status == "done" and again.instance_count == SHAPE[2]
    assert (node.settings.node.jobs_path() / str(again.id) / "attempt-1" / "seg.dcm").is_file()
    received = catcher.wait_for(lambda r: sum(ds.Modality in ("SEG", "SR") for ds in r) == 4, 30)
    assert len(_spooled(node, study)) == SHAPE[2]
    # The second run's SEG and SR are series of their own that say so (node/seg.py run_series).
    numbers = sorted((str(ds.Modality), int(ds.SeriesNumber), str(ds.SeriesDescription)) for ds in received)
    assert [(m, n) for m, n, _ in numbers] == [("SEG", 9901), ("SEG", 9911), ("SR", 9902), ("SR", 9912)]
    assert [d.endswith(" run 2") for _, _, d in numbers] == [False, True, False, True]


def test_a_skipped_study_leaves_after_failed_keep_hours_and_held_and_unsent_ones_stay(
    tmp_path: Path, case: Case, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = free_port()  # nothing listens: the result's sends stay pending
    node = _node(tmp_path, model_dir, down)
    node.start()
    try:
        unsent = write_study(case, tmp_path / "unsent", modalities=["FLAIR"])
        _send(node, unsent)
        assert _finished(node, unsent).status == "done"
        skipped = write_study(case, tmp_path / "skipped", modalities=["T2"])  # no FLAIR: skipped
        _send(node, skipped)
        assert _finished(node, skipped).status == "skipped"
        node.settings.qc.min_slices = SHAPE[2] + 1  # the job reads [qc] when it runs: this one is held
        held = write_study(case, tmp_path / "held", modalities=["FLAIR"])
        _send(node, held)
        assert _finished(node, held).status == "review"

        # Past the delivered rule's time, before the failed rule's: everything stays.
        assert node.apply_retention(now=utcnow() + timedelta(hours=FAILED_KEEP_HOURS - 1)) == 0
        assert instances.instance_counts(node.sf)["kept"] == 3 * SHAPE[2]
        # The skipped one can still be retried: its instances are there.
        job = _finished(node, skipped)
        assert job_queue.retry_job(node.sf, job.id).status == "queued"
        wait_until(lambda: job_queue.get_job(node.sf, job.id).status == "skipped", 60, "the retry")

        later = utcnow() + timedelta(hours=FAILED_KEEP_HOURS + 1)
        with caplog.at_level(logging.INFO, logger="node.spool_retention"):
            assert node.apply_retention(now=later) == SHAPE[2]
        assert not _spooled(node, skipped) and not (node.scp.spool_dir / skipped.study_instance_uid).exists()
        assert f"study {skipped.study_instance_uid} skipped (no result sent) in job {job.id}" in caplog.text
        assert node.metrics.spool_removed.labels("skipped")._value.get() == SHAPE[2]
        assert len(_spooled(node, unsent)) == SHAPE[2] and len(_spooled(node, held)) == SHAPE[2]
        assert node.apply_retention(now=later + timedelta(days=3650)) == 0
        with pytest.raises(JobStateError, match="no longer in the spool"):
            job_queue.retry_job(node.sf, job.id)
    finally:
        node.stop()


def test_keep_hours_zero_never_removes(tmp_path: Path, case: Case, model_dir: Path) -> None:
    catcher = CatchingSCP().start(free_port())
    node = _node(tmp_path, model_dir, catcher.port)
    node.settings.node.spool_keep_hours = node.settings.node.failed_keep_hours = 0
    node.start()
    try:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        _send(node, study)
        assert _finished(node, study).status == "done"
        wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "both sends acknowledged")
        skipped = write_study(case, tmp_path / "skipped", modalities=["T2"])
        _send(node, skipped)
        assert _finished(node, skipped).status == "skipped"
        assert node.apply_retention(now=utcnow() + timedelta(days=3650)) == 0
        assert len(_spooled(node, study)) == len(_spooled(node, skipped)) == SHAPE[2]
    finally:
        node.stop()
        catcher.stop()


def test_only_spool_files_are_removed_and_a_directory_with_a_new_file_stays(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    series = spool / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    old, new = series / "1.dcm", series / "2.dcm"
    old.write_bytes(b"old")
    new.write_bytes(b"received since the rows were read")
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"not the spool's")
    assert remove_spooled([str(old), str(outside), str(spool / ".." / "elsewhere.dcm")], spool) == 1
    assert not old.exists() and new.exists() and outside.exists()
    new.unlink()
    # A temporary file a killed receiver left an hour ago goes with its directory; a fresh one is
    # being written and stays.
    stale = series / ".3.dcm.123.456.tmp"
    stale.write_bytes(b"never acknowledged")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = spool / "1.2.3" / "1.2.3.5" / ".4.dcm.123.456.tmp"
    fresh.parent.mkdir()
    fresh.write_bytes(b"being written")
    assert remove_spooled([str(new), str(fresh.parent / "4.dcm")], spool) == 0  # gone already: no error
    assert not (spool / "1.2.3" / "1.2.3.4").exists() and fresh.exists()
    fresh.unlink()
    assert remove_spooled([str(fresh.parent / "4.dcm")], spool) == 0  # empty directories go
    assert spool.is_dir() and not (spool / "1.2.3").exists()


def _failed_study(
    sf: SessionFactory, spool: Path, jobs: Path, n: int, ended: datetime
) -> tuple[int, list[Path]]:
    """A study of three spooled instances (real files) whose one job failed at ``ended``, its output
    folder written; its job id and files."""
    study = f"1.2.826.0.1.3680043.8.498.{n}"
    files = [spool / study / f"{study}.1" / f"{i}.dcm" for i in range(3)]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"received")
    instances.record_instances(sf, [
        instances.ReceivedInstance(
            f"{study}.1.{i}", "1.2.840.10008.5.1.4.1.1.4", study, f"{study}.1", True, str(path), "PACS"
        )
        for i, path in enumerate(files)
    ], now=ended - timedelta(minutes=5))  # fmt: skip
    assert len(instances.schedule_due_studies(sf, 10, now=ended - timedelta(minutes=4))) == 1
    job_id = job_queue.claim_job(sf, now=ended - timedelta(minutes=3))
    assert job_id is not None
    assert job_queue.finish_job(sf, job_id, status="failed", reason="FLAIR: unreadable", now=ended)
    (jobs / str(job_id)).mkdir(parents=True)
    (jobs / str(job_id) / "job.json").write_text("{}")
    return job_id, files


def test_a_retry_accepted_after_the_pass_listed_its_study_keeps_the_files_and_one_during_removal_is_refused(
    sqlite_sf: SessionFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass lists up to 50 studies, then removes them one by one. An administrator's ``segnode jobs
    retry`` accepted after the list was read must keep its study (files, rows, outputs): the job then
    runs over every instance. One arriving while a study's files are being removed is refused. Before,
    the pass removed the retried study's files and rows anyway: the claimed job covered no instance."""
    spool, jobs = tmp_path / "spool", tmp_path / "jobs"
    ended = utcnow() - timedelta(hours=FAILED_KEEP_HOURS + 1)
    retried, kept_files = _failed_study(sqlite_sf, spool, jobs, 1, ended)
    removed, gone_files = _failed_study(sqlite_sf, spool, jobs, 2, ended + timedelta(minutes=1))
    listed = retention.removable_studies

    def then_retry(*args: Any, **kwargs: Any) -> list[retention.RemovableStudy]:
        found = listed(*args, **kwargs)
        assert [s.job_id for s in found] == [retried, removed]
        assert job_queue.retry_job(sqlite_sf, retried).status == "queued"  # after the list was read
        return found

    refusals: list[str] = []
    remove_files = spool_retention.remove_spooled

    def while_removing(paths: Any, spool_dir: Path) -> int:
        with pytest.raises(JobStateError, match="no longer in the spool") as refused:
            job_queue.retry_job(sqlite_sf, removed)
        refusals.append(str(refused.value))
        return remove_files(paths, spool_dir)

    monkeypatch.setattr(retention, "removable_studies", then_retry)
    monkeypatch.setattr(spool_retention, "remove_spooled", while_removing)
    count = spool_retention.apply_retention(sqlite_sf, spool, KEEP_HOURS, FAILED_KEEP_HOURS, jobs_dir=jobs)

    assert count == 3 and len(refusals) == 1
    assert not any(p.exists() for p in gone_files) and not (jobs / str(removed)).exists()
    assert job_queue.get_job(sqlite_sf, removed).status == "failed"
    assert all(p.exists() for p in kept_files) and (jobs / str(retried) / "job.json").is_file()
    claimed = job_queue.claim_job(sqlite_sf)
    assert claimed == retried
    assert job_queue.job_instance_paths(sqlite_sf, retried) == [str(p) for p in kept_files]


def test_a_refused_result_keeps_its_study_until_the_refusal_is_dismissed(
    tmp_path: Path, case: Case, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination refused the SEG and SR for good (0xC000): spool retention took the study for
    delivered after spool_keep_hours, removed its files and outputs and logged "delivered by job 1",
    and `segnode jobs retry`, which /healthz advises, was then refused. The study stays until the
    refusal is dismissed, and the log line then says so."""
    catcher = CatchingSCP(status=0xC000).start(free_port())  # the PACS cannot understand the objects
    node = _node(tmp_path, model_dir, catcher.port)
    node.sender.max_refusals = 1
    node.start()
    try:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        _send(node, study)
        job = _finished(node, study)
        assert job.status == "done"
        wait_until(lambda: send_queue.refused_send_count(node.sf) == 2, 60, "both sends refused")
        outputs = node.settings.node.jobs_path() / str(job.id)

        assert node.apply_retention(now=utcnow() + timedelta(days=3650)) == 0
        assert len(_spooled(node, study)) == SHAPE[2] and (outputs / "attempt-1" / "seg.dcm").is_file()
        assert job_queue.retry_job(node.sf, job.id).status == "queued"  # what /healthz advises
        wait_until(lambda: send_queue.refused_send_count(node.sf) == 2, 60, "the retry's sends refused")

        assert send_queue.dismiss_refused_sends(node.sf, job.id, by="admin", reason="sent by hand") == 2
        with caplog.at_level(logging.INFO, logger="node.spool_retention"):
            assert node.apply_retention(now=utcnow() + timedelta(hours=KEEP_HOURS + 1)) == SHAPE[2]
        assert not outputs.exists() and not _spooled(node, study)
        line = f"study {study.study_instance_uid} done in job {job.id}, its result refused by a destination"
        assert line in caplog.text and "delivered" not in caplog.text
    finally:
        node.stop()
        catcher.stop()


def test_without_destinations_the_spool_files_go_and_the_results_stay(
    tmp_path: Path, case: Case, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No [[destinations]]: the node said at start that results stay in its jobs directory, but spool
    retention took the study for delivered and removed its SEG and SR, their only copy, after
    spool_keep_hours. The received files go; the outputs of its done run stay."""
    settings = node_settings(tmp_path, free_port(), [])
    settings.node.spool_keep_hours = KEEP_HOURS
    node = NodeService(settings)
    install_model(node.registry, model_dir)
    node.start()
    try:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        _send(node, study)
        job = _finished(node, study)
        assert job.status == "done" and job.sends == []
        outputs = settings.node.jobs_path() / str(job.id)
        written = sorted(p.name for p in outputs.rglob("*.*"))
        assert {"seg.dcm", "sr.dcm", "preview.png"} <= set(written)

        with caplog.at_level(logging.INFO, logger="node.spool_retention"):
            assert node.apply_retention(now=utcnow() + timedelta(hours=KEEP_HOURS + 1)) == SHAPE[2]
        assert not _spooled(node, study) and not (node.scp.spool_dir / study.study_instance_uid).exists()
        assert sorted(p.name for p in outputs.rglob("*.*")) == written
        assert f"study {study.study_instance_uid} done in job {job.id}, nothing sent (no destination)" in (
            caplog.text
        )
        assert "delivered" not in caplog.text
    finally:
        node.stop()


def test_rows_of_ignored_ct_instances_leave_with_the_failed_rule(
    served: tuple[NodeService, CatchingSCP], case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PACS routing a CT study to the node: acknowledged, not kept, one row each that no pass ever
    deleted. A pass forgets them failed_keep_hours after they arrived, in bounded batches."""
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    node, _ = served
    study = write_study(case, tmp_path / "mr", modalities=["FLAIR"])
    ct_study, ct_series, ct = generate_uid(), generate_uid(), []
    for n, path in enumerate(p for fs in study.files.values() for p in fs):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", ct_study, ct_series
        ds.save_as(tmp_path / f"ct{n}.dcm")
        ct.append(tmp_path / f"ct{n}.dcm")
    assert {status for _, status, _ in store_files(ct, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")} == {0}
    assert instances.instance_counts(node.sf)["ignored"] == SHAPE[2]

    assert node.apply_retention(now=utcnow() + timedelta(hours=FAILED_KEEP_HOURS - 1)) == 0
    assert instances.instance_counts(node.sf)["ignored"] == SHAPE[2]
    monkeypatch.setattr(spool_retention, "IGNORED_BATCH", 5, raising=False)
    monkeypatch.setattr(spool_retention, "IGNORED_BATCHES_PER_PASS", 2, raising=False)
    later = utcnow() + timedelta(hours=FAILED_KEEP_HOURS + 1)
    node.apply_retention(now=later)
    assert instances.instance_counts(node.sf)["ignored"] == SHAPE[2] - 10  # two batches of five
    node.apply_retention(now=later)
    assert instances.instance_counts(node.sf)["ignored"] == 0


def test_the_node_sweeps_stale_temporaries_that_no_study_leads_to(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver killed while writing the first file of a series (or of a study) left a temporary file
    with no instance row: a pass removes temporaries only beside the files of a study it removes, so
    this one, and its directories, stayed for ever. The node sweeps the whole spool at start."""
    node = _node(tmp_path, model_dir, free_port())
    spool = node.scp.spool_dir
    kept = spool / "1.2.3" / "1.2.3.1" / "1.dcm"
    lone_series = spool / "1.2.3" / "1.2.3.2" / ".5.dcm.1.2.tmp"
    lone_study = spool / "1.2.9" / "1.2.9.1" / ".7.dcm.1.2.tmp"
    fresh = spool / "1.2.8" / "1.2.8.1" / ".8.dcm.1.2.tmp"  # being written now
    for path in (kept, lone_series, lone_study, fresh):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    hour_ago = time.time() - spool_retention.STALE_TEMPORARY_SECONDS - 60
    for path in (lone_series, lone_study):
        os.utime(path, (hour_ago, hour_ago))
    with caplog.at_level(logging.INFO, logger="node.spool_retention"):
        node.start()
        try:
            wait_until(lambda: not lone_series.exists() and not lone_study.exists(), 30, "the sweep")
        finally:
            node.stop()
    assert not lone_series.parent.exists() and not (spool / "1.2.9").exists()
    assert kept.is_file() and fresh.is_file()
    assert "2 temporary files left by killed processes removed" in caplog.text
