"""A job always reaches an end state: when the record of its outputs cannot be written (a full disk, a
path taken), it ends ``failed`` with the reason, instead of staying ``running`` to be re-queued every
``stale_job_seconds`` and fail the same way for ever."""

from __future__ import annotations

from pathlib import Path

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import job_queue
from node.sender import store_files
from tests.helpers.node import make_threshold_model, node_settings, running_node
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SHAPE = (48, 48, 12)


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

        def ended() -> job_queue.JobInfo | None:
            jobs = job_queue.list_jobs(node.sf)
            return jobs[0] if jobs and jobs[0].status not in ("queued", "running") else None

        job = wait_until(ended, 60, "the job's end")
        assert job.id == 1 and job.status == "failed", (job.status, job.reason)
        assert "job.json" in job.reason
