"""A study's idle timer after the wall clock is set back (db/instances.py): a study received across
the step, or before it, becomes due ``study_idle_seconds`` after its last instance by the new clock,
not once the clock has caught up again; two receiving hosts whose clocks differ by seconds still never
move a timer back. A smaller step of the receiving host's own clock, either way, is set right by the
process that received the study (node/idle_timers.py): due the idle time after its last instance.
Real SQLite; both ways of recording (the driver's SQL and SQLAlchemy Core)."""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from db import instances
from db.transactions import SessionFactory, utcnow

IDLE = 10.0
STEP = timedelta(hours=1)
STUDY = "1.2.826.0.1.3680043.8.498.77"
Recorder = Callable[..., list[bool]]
RECORDERS = {"driver": instances.record_instances, "core": instances.record_instances_through_session}


@pytest.fixture()
def sf(sqlite_sf: SessionFactory) -> SessionFactory:
    return sqlite_sf


def _receive(sf: SessionFactory, record: Recorder, first: int, count: int, at: datetime) -> None:
    rows = [
        instances.ReceivedInstance(
            sop_instance_uid=f"{STUDY}.1.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            study_instance_uid=STUDY, series_instance_uid=f"{STUDY}.1", kept=True,
            path=f"/spool/{STUDY}/{n}.dcm", calling_ae="PACS",
        )
        for n in range(first, first + count)
    ]  # fmt: skip
    assert record(sf, rows, now=at) == [True] * count


def _due(sf: SessionFactory, at: datetime) -> int:
    return len(instances.schedule_due_studies(sf, IDLE, now=at))


@pytest.mark.parametrize("recorder", list(RECORDERS))
def test_a_study_received_across_a_backward_step_is_due_after_the_idle_time(
    sf: SessionFactory, recorder: str
) -> None:
    record, start = RECORDERS[recorder], utcnow()
    _receive(sf, record, 0, 2, start)
    back = start - STEP  # NTP steps the clock back an hour in the middle of the study
    _receive(sf, record, 2, 2, back + timedelta(seconds=1))
    assert _due(sf, back + timedelta(seconds=1 + IDLE - 1)) == 0
    assert _due(sf, back + timedelta(seconds=1 + IDLE + 1)) == 1  # not an hour later


def test_a_study_received_before_the_step_restarts_its_timer(sf: SessionFactory) -> None:
    start = utcnow()
    _receive(sf, instances.record_instances, 0, 3, start)
    back = start - STEP + timedelta(seconds=2)
    assert _due(sf, back) == 0  # its timer restarts from the new clock's time
    assert instances.seconds_until_due(sf, IDLE, now=back) == pytest.approx(IDLE, abs=0.01)
    assert _due(sf, back + timedelta(seconds=IDLE + 1)) == 1


@pytest.mark.parametrize("recorder", list(RECORDERS))
def test_hosts_seconds_apart_never_move_a_timer_back(sf: SessionFactory, recorder: str) -> None:
    record, start = RECORDERS[recorder], utcnow()
    _receive(sf, record, 0, 2, start)
    _receive(sf, record, 2, 2, start - timedelta(seconds=5))  # another receiving host, 5 s behind
    assert _due(sf, start + timedelta(seconds=IDLE - 1)) == 0
    instances.touch_studies(sf, [STUDY], now=start - timedelta(seconds=5))
    assert _due(sf, start + timedelta(seconds=IDLE - 1)) == 0
    assert _due(sf, start + timedelta(seconds=IDLE + 1)) == 1


class _Clocks:
    """A wall clock to step and a monotonic clock, both moved by hand (seconds)."""

    def __init__(self, start: datetime) -> None:
        self.start, self.elapsed, self.step = start, 0.0, timedelta(0)

    def wall(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed) + self.step

    def mono(self) -> float:
        return 1000.0 + self.elapsed


def _timers(clocks: _Clocks) -> Any:
    from node.idle_timers import IdleTimers

    return IdleTimers(IDLE, wall=clocks.wall, mono=clocks.mono)


@pytest.mark.parametrize("step_seconds", [-290, -30, 60], ids=["290 s back", "30 s back", "60 s forward"])
def test_a_study_received_here_is_due_the_idle_time_after_its_last_instance_across_a_small_step(
    sf: SessionFactory, step_seconds: int
) -> None:
    """The reviewer's case: 290 s back (under CLOCK_STEP_SECONDS) with 10 s idle made a study due 301 s
    after its last instance; forward, early. The receiving process's own timer, on the monotonic
    clock, sets it right: due IDLE s after the last instance, not before."""
    clocks = _Clocks(utcnow())
    timers = _timers(clocks)
    _receive(sf, instances.record_instances, 0, 3, clocks.wall())
    timers.recorded(STUDY, f"{STUDY}.1.2")
    clocks.elapsed, clocks.step = 1.0, timedelta(seconds=step_seconds)  # NTP steps the clock
    for elapsed, due in ((IDLE - 1, 0), (IDLE + 1, 1)):
        clocks.elapsed = elapsed
        timers.reconcile(sf)  # the worker's refresh_idle_timers, before it looks for due studies
        assert _due(sf, clocks.wall()) == due, f"{elapsed} s after the last instance"


def test_a_later_instance_from_elsewhere_keeps_the_shared_timer(sf: SessionFactory) -> None:
    """After a step back, an instance another host (or receiving process) recorded later may hide
    behind this process's stamp from before the step: its own timer then leaves the study alone, and
    the shared rule (never back, save past CLOCK_STEP_SECONDS) stands."""
    clocks = _Clocks(utcnow())
    timers = _timers(clocks)
    _receive(sf, instances.record_instances, 0, 2, clocks.wall())
    timers.recorded(STUDY, f"{STUDY}.1.1")
    clocks.elapsed, clocks.step = 5.0, timedelta(seconds=-290)
    _receive(sf, instances.record_instances, 2, 1, clocks.wall())  # another host, a correct clock
    clocks.elapsed = IDLE + 6
    assert timers.reconcile(sf) == 0
    assert _due(sf, clocks.wall()) == 0  # not idle after this host's instance: the other one is later


def test_an_acknowledged_object_of_the_study_recorded_later_leaves_the_timer_to_this_process(
    sf: SessionFactory,
) -> None:
    """An object the node does not process (a KOS, an SR) is recorded in its study too, but stamps no
    timer: one recorded after this process's last instance does not keep it from setting its timer
    right after a step."""
    clocks = _Clocks(utcnow())
    timers = _timers(clocks)
    _receive(sf, instances.record_instances, 0, 3, clocks.wall())
    timers.recorded(STUDY, f"{STUDY}.1.2")
    kos = instances.ReceivedInstance(
        sop_instance_uid=f"{STUDY}.9.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.59",
        study_instance_uid=STUDY, series_instance_uid=f"{STUDY}.9", kept=False, path=None, calling_ae="PACS",
    )  # fmt: skip
    assert instances.record_instances(sf, [kos], now=clocks.wall()) == [True]
    clocks.elapsed, clocks.step = 1.0, timedelta(seconds=-290)
    for elapsed, due in ((IDLE - 1, 0), (IDLE + 1, 1)):
        clocks.elapsed = elapsed
        timers.reconcile(sf)
        assert _due(sf, clocks.wall()) == due, f"{elapsed} s after the last instance"


def test_a_node_that_received_a_study_takes_it_up_the_idle_time_after_a_small_step_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node itself: its clock steps back 290 s just after a study arrived; the job is queued about
    study_idle_seconds (1 s) later, not 290 s later."""
    from converters.dicom_writer import write_study
    from converters.synthetic import make_synthetic_case
    from db import job_queue
    from node.sender import store_files
    from tests.helpers.node import make_threshold_model, node_settings, running_node
    from tests.helpers.ports import free_port
    from tests.helpers.waiting import wait_until

    step = timedelta(0)

    def stepped() -> datetime:
        return utcnow() - step

    for name in ("db.instances", "node.idle_timers"):  # where the node reads the wall clock
        if importlib.util.find_spec(name) is not None:
            monkeypatch.setattr(importlib.import_module(name), "utcnow", stepped)
    case = make_synthetic_case(3, (32, 32, 8))
    model = make_threshold_model(tmp_path / "model", crop=(32, 32), spacing=case.spacing, threshold=1.5)
    with running_node(node_settings(tmp_path, free_port(), idle=1.0), model) as node:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        results = store_files(study.files["FLAIR"], "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
        assert {status for _, status, _ in results} == {0}
        received = time.monotonic()
        step = timedelta(seconds=290)
        wait_until(lambda: job_queue.list_jobs(node.sf), 10, "the study's job")
        assert time.monotonic() - received > 0.5  # and not before its idle time
