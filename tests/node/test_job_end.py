"""A job always reaches an end state: when the record of its outputs cannot be written (a full disk, a
path taken), it ends ``failed`` with the reason, instead of staying ``running`` to be re-queued every
``stale_job_seconds`` and fail the same way for ever."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import job_queue
from db.exceptions import DatabaseOperationError, DatabaseUnavailableError
from db.transactions import utcnow
from node.cli.commands import _result_rows
from node.config import Destination
from node.sender import store_files
from tests.helpers.node import CatchingSCP, make_threshold_model, node_settings, running_node
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SHAPE = (48, 48, 12)


def _first_job_ended(node: Any) -> job_queue.JobInfo:
    """The node's first job, once it has ended (waits up to 60 s)."""

    def ended() -> job_queue.JobInfo | None:
        jobs = job_queue.list_jobs(node.sf)
        return jobs[0] if jobs and jobs[0].status not in ("queued", "running") else None

    return wait_until(ended, 60, "the job's end")  # type: ignore[no-any-return]


def test_a_job_whose_record_cannot_be_written_ends_failed(tmp_path: Path) -> None:
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    settings = node_settings(tmp_path, free_port())
    # The first job's job.json path is taken by a directory: its write fails after SEG, SR and preview.
    (settings.node.jobs_path() / "1" / "attempt-1" / "job.json").mkdir(parents=True)
    with running_node(settings, model) as node:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        results = store_files(study.files["FLAIR"], "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {0}

        job = _first_job_ended(node)
        assert job.id == 1 and job.status == "failed", (job.status, job.reason)
        assert "job.json" in job.reason


@pytest.mark.parametrize("error", [ValueError, RuntimeError], ids=["library ValueError", "unexpected"])
def test_a_library_message_quoting_a_value_is_scrubbed_in_the_log_and_kept_in_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: type[Exception]
) -> None:
    """A job that fails on a library's exception whose text quotes a value of the study (pydicom's
    "Invalid value for VR PN: '...'"): the node's log line and traceback say <scrubbed> where the value
    was; the job's reason, which `segnode jobs show` gives an administrator, keeps the text."""
    import node.sr

    def refuse(*args: object, **kwargs: object) -> None:
        raise error("Invalid value for VR PN: 'QZXLEAKNAME'")

    monkeypatch.setattr(node.sr, "build_sr", refuse)
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    with caplog.at_level(logging.INFO), running_node(node_settings(tmp_path, free_port()), model) as node:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        results = store_files(study.files["FLAIR"], "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {0}
        job = wait_until(
            lambda: next((j for j in job_queue.list_jobs(node.sf) if j.status == "failed"), None),
            60,
            "the job's failure",
        )
    assert "QZXLEAKNAME" in job.reason
    assert "job 1 failed: " in caplog.text and "<scrubbed>" in caplog.text
    assert "QZXLEAKNAME" not in caplog.text


@pytest.mark.parametrize(
    "error", [DatabaseUnavailableError, DatabaseOperationError], ids=["unavailable", "operation"]
)
def test_a_database_fault_mid_job_does_not_fail_the_job_it_runs_again_once_the_database_answers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: type[Exception],
) -> None:
    """A heartbeat the database does not answer (a dropped PostgreSQL connection, an SQLite lock
    timeout) is no fault of the study: the job is not ended failed but left running, the worker
    reports the outage and, once the database answers, queues the job again; it runs and is delivered,
    once."""
    heartbeat, requeue = job_queue.heartbeat, job_queue.requeue_interrupted
    beats: list[int] = []
    found: list[str] = []  # the job's state when the worker queued it again

    def blip(sf: Any, job_id: int, *args: Any, **kwargs: Any) -> bool:
        beats.append(job_id)
        if len(beats) == 2:  # the heartbeat after the FLAIR's load, in the first run
            raise error("OperationalError: server closed the connection unexpectedly")
        return heartbeat(sf, job_id, *args, **kwargs)

    def requeue_spy(sf: Any, job_id: int, *args: Any, **kwargs: Any) -> str | None:
        found.append(job_queue.get_job(sf, job_id).status)
        return requeue(sf, job_id, *args, **kwargs)

    monkeypatch.setattr(job_queue, "heartbeat", blip)
    monkeypatch.setattr(job_queue, "requeue_interrupted", requeue_spy)
    catcher = CatchingSCP().start(free_port())
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    pacs = Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)
    settings = node_settings(tmp_path, free_port(), [pacs])
    try:
        with caplog.at_level(logging.INFO), running_node(settings, model) as node:
            study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
            results = store_files(study.files["FLAIR"], "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
            assert {status for _, status, _ in results} == {0}

            job = _first_job_ended(node)
            assert (job.status, job.attempts, job.requeues) == ("done", 2, 1), job.reason
            catcher.wait_for(lambda r: len(r) >= 2, 30)
    finally:
        catcher.stop()
    assert found == ["running"]
    assert sorted(ds.Modality for ds in catcher.received) == ["SEG", "SR"]  # the second run's, once
    assert "worker: database unreachable (OperationalError: server closed" in caplog.text or (
        error is DatabaseOperationError and "worker loop error" in caplog.text
    )
    assert "job 1 failed" not in caplog.text
    assert "job 1: the database failed while it ran; queued again (cut short 1 of" in caplog.text


def test_a_run_superseded_in_the_same_process_ends_nothing_the_later_run_ends_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers. While worker 1 runs a job, worker 2's periodic stale check finds its heartbeat old
    (a long stage, a hung thread) and queues it again, and worker 2 claims it. Both runs record the
    same owner, this process's host:pid. Worker 1's run, superseded, ends first: it must not end the
    job (before, it did, with its stale result, and worker 2's run was refused its end and dropped)."""
    from node import pipeline, service

    segment, run = pipeline.segment_study, service.run_job
    second_started, first_returned = threading.Event(), threading.Event()
    segments: list[int] = []
    returned: list[str] = []

    def gated_segment(study: Any, plan: Any) -> Any:
        segments.append(1)
        if len(segments) == 1:  # run 1: the other worker's stale check (STALE_CHECK_SECONDS) runs now
            later = utcnow() + timedelta(seconds=301)
            assert job_queue.requeue_stale(study.ctx.sf, 300.0, now=later) == [study.job_id]
            assert second_started.wait(30), "the job was not claimed again"
        else:  # run 2 goes on once run 1 has returned
            second_started.set()
            assert first_returned.wait(30), "the first run did not return"
        return segment(study, plan)

    def tracked_run(*args: Any, **kwargs: Any) -> str:
        state = run(*args, **kwargs)
        returned.append(state)
        first_returned.set()
        return state

    monkeypatch.setattr(pipeline, "segment_study", gated_segment)
    monkeypatch.setattr(service, "run_job", tracked_run)
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    settings = node_settings(tmp_path, free_port())
    settings.node.workers = 2
    with caplog.at_level(logging.INFO), running_node(settings, model) as served:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        results = store_files(study.files["FLAIR"], "127.0.0.1", served.scp.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {0}
        wait_until(lambda: len(returned) == 2, 60, "both runs' return")
        job = job_queue.get_job(served.sf, 1)
    assert (job.status, job.attempts, job.requeues) == ("done", 2, 1), job.reason
    assert job.output_dir is not None and job.output_dir.endswith("attempt-2"), job.output_dir  # run 2's
    assert returned == ["superseded", "done"]
    assert "job 1 was claimed again while this run (attempt 1) ran; this run stops" in caplog.text


def test_instances_recorded_without_their_spool_file_are_left_out_and_the_study_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver commits an instance's row while its spool file is written, so a SIGKILL in between
    leaves a row without a file; if the PACS never sends it again the study's job failed whole with
    FileNotFoundError in the series scan. Now those instances are left out with one warning naming
    them (the first 10, and how many more: a lost series of hundreds made a line of hundreds of UIDs),
    the job's result lists them all, and a series left without any file counts as absent."""
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    study = write_study(case, tmp_path / "study", modalities=["FLAIR", "T2"])
    t2 = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.files["T2"]}
    original = job_queue.job_series_paths
    lost: list[str] = []  # in the order the job meets them

    def rows_without_files(sf: Any, job_id: int) -> dict[str, list[str]]:
        groups = original(sf, job_id)
        if not lost:  # as a crash mid-write leaves them: every T2 file and the FLAIR's first
            for paths in groups.values():
                for path in paths if Path(paths[0]).stem in t2 else paths[:1]:
                    Path(path).unlink()
                    lost.append(Path(path).stem)
        return groups

    monkeypatch.setattr(job_queue, "job_series_paths", rows_without_files)
    with caplog.at_level(logging.WARNING, logger="node.pipeline"), running_node(
        node_settings(tmp_path, free_port()), model
    ) as node:
        files = study.files["FLAIR"] + study.files["T2"]
        results = store_files(files, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {0}
        job = _first_job_ended(node)
    assert job.status == "done", job.reason
    assert len(lost) == 13 and job.result["instances_missing"] == lost
    assert list(job.result["series"]) == ["FLAIR"]
    (line,) = [r.getMessage() for r in caplog.records if "without their spool file" in r.getMessage()]
    assert "13 instance(s)" in line and line.endswith(f"left out: {', '.join(lost[:10])} and 3 more")
    shown = ("instances missing", f"13 without a spool file, left out: {', '.join(lost)}")
    assert shown in _result_rows(job.result)  # segnode jobs show
