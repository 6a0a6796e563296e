"""A served node on real sockets with a catching PACS: the base of the world tests' fixtures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converters.case import Case
from converters.dicom_writer import StudyInfo, write_study
from db import job_queue
from node.service import NodeService
from tests.helpers.dcmtk import storescu
from tests.helpers.node import CatchingSCP
from tests.helpers.waiting import wait_until

#: Job states a world test waits for: the job has stopped running.
ENDED = ("done", "failed", "skipped", "review")


@dataclass
class World:
    """A started node, the SCP that catches what it sends, a tmp folder, a case and the model it serves."""

    node: NodeService
    catcher: CatchingSCP
    tmp: Path
    case: Case
    model_dir: Path

    @property
    def port(self) -> int:
        """The node's DICOM port."""
        return self.node.scp.port

    def study(self, name: str, modalities: tuple[str, ...] = ("FLAIR",)) -> StudyInfo:
        """The world's case written as a DICOM study under ``tmp/name``."""
        return write_study(self.case, self.tmp / name, modalities=list(modalities))

    def send(self, files: list[Path]) -> None:
        """C-STORE ``files`` to the node with storescu; every one must be accepted."""
        result = storescu(self.port, files)
        assert result.returncode == 0, result.stdout + result.stderr

    def job(self, study_uid: str, timeout: float = 60) -> job_queue.JobInfo:
        """The job of a study, once it has ended (:data:`ENDED`)."""

        def finished() -> job_queue.JobInfo | None:
            return next(
                (
                    j
                    for j in job_queue.list_jobs(self.node.sf)
                    if j.study_instance_uid == study_uid and j.status in ENDED
                ),
                None,
            )

        job: job_queue.JobInfo = wait_until(finished, timeout, f"the job of study {study_uid}")
        return job
