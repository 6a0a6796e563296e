"""Each destination is delivered on its own: one that accepts TCP and never answers (a blackholed or
hung PACS) holds only its own sends, and neither blocks the others nor loses its results (issue 5)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from converters.case import Case
from converters.dicom_writer import StudyInfo, write_study
from converters.synthetic import make_synthetic_case
from db import job_queue, send_queue
from db.exceptions import DatabaseUnavailableError
from db.transactions import utcnow
from node import sender as sender_module
from node.config import Destination
from node.metrics import NodeMetrics
from node.sender import Sender, store_files
from node.service import NodeService
from tests.helpers.node import CatchingSCP, make_threshold_model, node_settings, running_node
from tests.helpers.ports import free_port, silent_listener
from tests.helpers.waiting import wait_until

SHAPE = (64, 64, 24)

#: The blackhole's association timeout (the sender's default, set explicitly here).
HOLE_TIMEOUT = 30.0

#: Job done to SEG and SR received at the healthy destination: well inside ``HOLE_TIMEOUT``.
HEALTHY_WITHIN = 15.0


@pytest.fixture(scope="module")
def case() -> Case:
    return make_synthetic_case(11, SHAPE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, case: Case) -> Path:
    return make_threshold_model(
        tmp_path_factory.mktemp("model"), crop=SHAPE[:2], spacing=case.spacing, threshold=1.5
    )


@dataclass
class Env:
    node: NodeService
    catcher: CatchingSCP
    hole: socket.socket


@pytest.fixture()
def env(tmp_path: Path, model_dir: Path) -> Iterator[Env]:
    hole = silent_listener()  # the kernel completes the handshakes; nobody ever accepts or reads
    catcher = CatchingSCP().start(free_port())
    # The blackhole first: its sends come first in every job, so a sender that delivers destination
    # after destination in one thread makes the healthy one wait for the blackhole's timeout.
    destinations = [
        Destination("hole", "HOLE", "127.0.0.1", hole.getsockname()[1]),
        Destination("pacs", catcher.ae_title, "127.0.0.1", catcher.port),
    ]
    try:
        with running_node(node_settings(tmp_path, free_port(), destinations), model_dir) as node:
            node.sender.timeout = HOLE_TIMEOUT  # read per delivery; nothing is sent yet
            try:
                yield Env(node, catcher, hole)
            finally:
                hole.close()  # resets the queued connections: a hanging delivery ends at once
    finally:
        catcher.stop()


def _send_study(env: Env, study: StudyInfo) -> None:
    results = store_files(study.files["FLAIR"], "127.0.0.1", env.node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}


def _done_job(env: Env, study: StudyInfo) -> job_queue.JobInfo:
    def done() -> job_queue.JobInfo | None:
        for job in job_queue.list_jobs(env.node.sf):
            finished = job.status in ("done", "failed", "skipped")
            if finished and job.study_instance_uid == study.study_instance_uid:
                return job
        return None

    job = wait_until(done, 60, f"the job of study {study.study_instance_uid}")
    assert job.status == "done", job.reason
    return job_queue.get_job(env.node.sf, job.id)


def _sends(env: Env, job_id: int, destination: str) -> list[send_queue.SendInfo]:
    return [s for s in job_queue.get_job(env.node.sf, job_id).sends if s.destination == destination]


def _wait_done(env: Env, job_id: int, timeout: float) -> None:
    """Wait until the healthy destination's sends of ``job_id`` are marked done."""
    wait_until(
        lambda: all(s.status == "done" for s in _sends(env, job_id, "pacs")),
        max(timeout, 0.0),
        f"job {job_id}'s sends to the healthy destination marked done",
    )


def _received_uids(env: Env) -> list[str]:
    with env.catcher.changed:
        return [str(ds.SOPInstanceUID) for ds in env.catcher.received]


@pytest.mark.slow  # ~35 s: the blackhole's 30 s timeout runs out in the test
def test_a_hanging_destination_blocks_no_other_and_keeps_its_sends(
    env: Env, case: Case, tmp_path: Path
) -> None:
    first = write_study(case, tmp_path / "first", modalities=["FLAIR"])
    _send_study(env, first)
    job1 = _done_job(env, first)
    done_at = time.monotonic()
    expected1 = {s.sop_instance_uid for s in _sends(env, job1.id, "pacs")}
    assert len(expected1) == 2

    env.catcher.wait_for(lambda r: {str(ds.SOPInstanceUID) for ds in r} >= expected1, HEALTHY_WITHIN)
    _wait_done(env, job1.id, done_at + HEALTHY_WITHIN - time.monotonic())
    assert time.monotonic() - done_at < HEALTHY_WITHIN
    assert sorted(ds.Modality for ds in env.catcher.received) == ["SEG", "SR"]
    # The blackhole's delivery is still running: its sends leased (not due), pending, no attempt yet.
    hole1 = _sends(env, job1.id, "hole")
    assert len(hole1) == 2
    assert env.node.sender.in_flight() == ["hole"]
    assert all(s.status == "pending" and s.attempts == 0 for s in hole1)
    assert all(s.next_attempt_at > utcnow() for s in hole1)

    # A second study while the blackhole still hangs reaches the healthy destination too.
    second = write_study(case, tmp_path / "second", modalities=["FLAIR"])
    _send_study(env, second)
    job2 = _done_job(env, second)
    expected2 = {s.sop_instance_uid for s in _sends(env, job2.id, "pacs")}
    env.catcher.wait_for(lambda r: {str(ds.SOPInstanceUID) for ds in r} >= expected2, HEALTHY_WITHIN)
    _wait_done(env, job2.id, HEALTHY_WITHIN)
    assert env.node.sender.in_flight() == ["hole"], "the first delivery to the blackhole still hangs"
    # ... and the blackhole's new sends are not claimed while its first delivery runs: still due.
    hole2 = _sends(env, job2.id, "hole")
    assert len(hole2) == 2
    assert all(s.status == "pending" and s.attempts == 0 for s in hole2)
    assert all(s.next_attempt_at <= utcnow() for s in hole2)

    # The blackhole's timeout ends its delivery: an attempt recorded, the sends still pending.
    def hole1_attempted() -> list[send_queue.SendInfo]:
        sends = _sends(env, job1.id, "hole")
        return sends if all(s.attempts == 1 for s in sends) else []

    hole1 = wait_until(hole1_attempted, HOLE_TIMEOUT + 15, "the blackhole's delivery to time out")
    assert all(s.status == "pending" and "HOLE@127.0.0.1" in s.last_error for s in hole1)
    # Then its later sends are claimed (a new delivery hangs in its turn); none were lost.
    wait_until(
        lambda: all(s.next_attempt_at > utcnow() for s in _sends(env, job2.id, "hole")),
        10,
        "the blackhole's second job's sends claimed once the first delivery ended",
    )
    assert send_queue.pending_send_count(env.node.sf) == 4

    # The healthy destination got every object exactly once, each send done after one attempt.
    uids = _received_uids(env)
    assert sorted(uids) == sorted(expected1 | expected2)
    for job in (job1, job2):
        assert all(s.status == "done" and s.attempts == 1 for s in _sends(env, job.id, "pacs"))
    assert env.node.metrics.sends.labels("pacs")._value.get() == 4


# --- the Sender alone, with the database calls replaced -------------------------------------------------


def _send(send_id: int, destination: str, port: int = 1) -> send_queue.SendInfo:
    return send_queue.SendInfo(
        id=send_id,
        job_id=1,
        destination=destination,
        ae_title=destination.upper(),
        host="127.0.0.1",
        port=port,
        path=f"/nonexistent/{send_id}.dcm",
        sop_instance_uid=f"1.2.3.{send_id}",
        status="pending",
        attempts=0,
        next_attempt_at=utcnow() - timedelta(seconds=1),
        last_error="",
    )


class FakeSendQueue:
    """The send-row functions of ``db.send_queue``: rows due until claimed, marks recorded."""

    def __init__(self, sends: list[send_queue.SendInfo], *, mark_error: Exception | None = None) -> None:
        self.due = list(sends)
        self.sent: list[int] = []
        self.failed: list[int] = []
        self.mark_error = mark_error

    def due_sends(self, sf: object, exclude_destinations: Collection[str] = ()) -> list[send_queue.SendInfo]:
        return [s for s in self.due if s.destination not in exclude_destinations]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(sender_module.send_queue, "due_sends", self.due_sends)
        monkeypatch.setattr(sender_module.send_queue, "claim_send", self.claim)
        monkeypatch.setattr(sender_module.send_queue, "mark_sent", self.mark_sent)
        monkeypatch.setattr(sender_module.send_queue, "mark_send_failed", self.mark_failed)
        monkeypatch.setattr(
            sender_module.send_queue, "restart_sends_after_a_clock_step", lambda sf, horizon: 0
        )

    def claim(self, sf: Any, send: send_queue.SendInfo, lease: float) -> bool:
        self.due.remove(send)
        return True

    def mark_sent(self, sf: Any, send_id: int, warning: str = "") -> None:
        if self.mark_error is not None:
            raise self.mark_error
        self.sent.append(send_id)

    def mark_failed(self, sf: Any, send_id: int, error: str, **backoff: float) -> Any:
        self.failed.append(send_id)
        return utcnow()


#: Names of the threads the fake C-STOREs ran in.
SENT_FROM: list[str] = []


def _success(paths: list[Path], *args: Any, **kwargs: Any) -> list[tuple[Path, int | None, str]]:
    SENT_FROM.append(threading.current_thread().name)
    return [(p, 0, "") for p in paths]


def test_run_once_waiting_returns_the_acknowledged_count(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSendQueue([_send(1, "a"), _send(2, "b"), _send(3, "a")])
    fake.install(monkeypatch)
    monkeypatch.setattr(sender_module, "store_files", _success)
    sender = Sender(None, NodeMetrics(), "SEGNODE")  # type: ignore[arg-type]
    SENT_FROM.clear()
    assert sender.run_once() == 3
    assert sorted(fake.sent) == [1, 2, 3]
    assert sorted(SENT_FROM) == ["segnode-send-a", "segnode-send-b"]  # one delivery per destination
    assert sender.in_flight() == []
    assert sender.run_once() == 0


def test_a_background_database_error_reaches_the_caller_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # what db.send_queue raises for a driver error (db.transactions.database_errors)
    down = DatabaseUnavailableError("OperationalError: database is locked")
    fake = FakeSendQueue([_send(1, "a")], mark_error=down)
    fake.install(monkeypatch)
    monkeypatch.setattr(sender_module, "store_files", _success)
    sender = Sender(None, NodeMetrics(), "SEGNODE")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="node.sender"):
        assert sender.run_once(wait=False) == 1
        wait_until(lambda: sender.in_flight() == [], 10, "the background delivery to end")
        with pytest.raises(DatabaseUnavailableError, match="database is locked"):
            sender.run_once(wait=False)
    assert sender.run_once(wait=False) == 0  # reported once, and the destination is free again
    line = "delivery to a stopped: DatabaseUnavailableError: OperationalError: database is locked"
    assert any(line in r.getMessage() for r in caplog.records)


def test_the_service_logs_a_database_outage_met_in_a_background_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    down = DatabaseUnavailableError("OperationalError: connection refused")
    fake = FakeSendQueue([_send(1, "a")], mark_error=down)
    node = NodeService(node_settings(tmp_path, free_port()))
    fake.install(monkeypatch)
    monkeypatch.setattr(sender_module, "store_files", _success)
    with caplog.at_level(logging.INFO):
        node.start()
        try:
            wait_until(
                lambda: any("sender: database unreachable" in r.getMessage() for r in caplog.records),
                10,
                "the sender's outage line",
            )
            wait_until(
                lambda: any("sender: database reachable again" in r.getMessage() for r in caplog.records),
                10,
                "the sender's recovery line",
            )
        finally:
            node.stop()
