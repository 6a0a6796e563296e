"""A study's idle timer after the wall clock is set back (db/instances.py): a study received across
the step, or before it, becomes due ``study_idle_seconds`` after its last instance by the new clock,
not once the clock has caught up again; two receiving hosts whose clocks differ by seconds still never
move a timer back. Real SQLite; both ways of recording (the driver's SQL and SQLAlchemy Core)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

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
