"""Which studies may leave the spool (db/retention.py), on a real SQLite database: each end state of a
study's latest run against the two rules' cut-offs."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from db import instances, job_queue, send_queue
from db.exceptions import JobStateError
from db.retention import removable_studies
from db.transactions import SessionFactory, utcnow

DELIVERED_HOURS, FAILED_HOURS = 24.0, 240.0


@pytest.fixture()
def sf(sqlite_sf: SessionFactory) -> SessionFactory:
    return sqlite_sf


def _study(sf: SessionFactory, n: int, status: str, ended: datetime, **finish: Any) -> int:
    """A study of two instances received just before ``ended``, its one job ended ``status`` then."""
    study = f"1.2.826.0.1.3680043.8.498.{n}"
    received = ended - timedelta(minutes=5)
    rows = [
        instances.ReceivedInstance(
            sop_instance_uid=f"{study}.1.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            study_instance_uid=study, series_instance_uid=f"{study}.1", kept=True,
            path=f"/spool/{study}/{study}.1/{i}.dcm", calling_ae="PACS",
        )
        for i in range(2)
    ]  # fmt: skip
    instances.record_instances(sf, rows, now=received)
    assert len(instances.schedule_due_studies(sf, 10, now=received + timedelta(minutes=1))) == 1
    job_id = job_queue.claim_job(sf, now=received + timedelta(minutes=2))
    assert job_id is not None
    if status != "running":
        assert job_queue.finish_job(sf, job_id, status=status, now=ended, **finish)
    return job_id


def _removable(sf: SessionFactory, now: datetime, failed: bool = True) -> dict[int, str]:
    found = removable_studies(
        sf, now - timedelta(hours=DELIVERED_HOURS), now - timedelta(hours=FAILED_HOURS) if failed else None
    )
    assert all(len(s.paths) == len(s.instance_ids) == 2 for s in found)
    return {s.job_id: s.status for s in found}


def test_each_end_state_leaves_by_its_own_rule(sf: SessionFactory, tmp_path: Path) -> None:
    start = utcnow() - timedelta(days=30)
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(b"x")
    output = [job_queue.OutputObject(str(seg), "1.2.3.9")]
    pacs = [SimpleNamespace(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112)]
    delivered = _study(sf, 1, "done", start, outputs=output, destinations=pacs)
    unsent = _study(sf, 2, "done", start, outputs=output, destinations=pacs)
    failed = _study(sf, 3, "failed", start, reason="FLAIR: unreadable")
    skipped = _study(sf, 4, "skipped", start, reason="no FLAIR")
    held = _study(sf, 5, "review", start, reason="qc min_slices")
    _study(sf, 6, "running", start)
    recent_failure = _study(sf, 7, "failed", start + timedelta(days=29))
    for send in send_queue.due_sends(sf, now=utcnow()):
        if send.job_id == delivered:
            send_queue.mark_sent(sf, send.id)

    # Delivered a day and more ago: the delivered study only.
    assert _removable(sf, start + timedelta(hours=DELIVERED_HOURS + 1)) == {delivered: "done"}
    # Failed and skipped ones wait for their own, longer cut-off; held, unsent and running ones stay.
    later = start + timedelta(hours=FAILED_HOURS + 1)
    assert _removable(sf, later) == {delivered: "done", failed: "failed", skipped: "skipped"}
    assert _removable(sf, later, failed=False) == {delivered: "done"}
    assert unsent not in _removable(sf, utcnow() + timedelta(days=3650))
    assert held not in _removable(sf, utcnow() + timedelta(days=3650))
    assert recent_failure not in _removable(sf, later)
    assert removable_studies(sf, None, None) == []



def test_a_latest_run_that_sent_nothing_again_waits_for_the_earlier_runs_delivery(
    sf: SessionFactory, tmp_path: Path
) -> None:
    """A run over unchanged inputs ends done without sends (node/pipeline.py): the study's result is
    the earlier run's, and the study keeps its files while that run's send is pending."""
    start = utcnow() - timedelta(days=30)
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(b"x")
    pacs = [SimpleNamespace(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112)]
    output = [job_queue.OutputObject(str(seg), "1.2.3.9")]
    first = _study(sf, 1, "done", start, outputs=output, destinations=pacs)
    study = "1.2.826.0.1.3680043.8.498.1"
    late = instances.ReceivedInstance(
        sop_instance_uid=f"{study}.2.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_instance_uid=study,
        series_instance_uid=f"{study}.2", kept=True, path=f"/spool/{study}/{study}.2/1.dcm",
        calling_ae="PACS",
    )  # fmt: skip
    instances.record_instances(sf, [late], now=start + timedelta(minutes=1))
    assert len(instances.schedule_due_studies(sf, 10, now=start + timedelta(minutes=2))) == 1
    second = job_queue.claim_job(sf, now=start + timedelta(minutes=3))
    assert second is not None and second != first
    ended = start + timedelta(minutes=4)
    assert job_queue.finish_job(sf, second, status="done", reason="unchanged", now=ended)
    found = removable_studies(sf, start + timedelta(hours=DELIVERED_HOURS + 1))
    assert found == []
    (send,) = send_queue.due_sends(sf, now=utcnow())
    send_queue.mark_sent(sf, send.id)
    (study_found,) = removable_studies(sf, start + timedelta(hours=DELIVERED_HOURS + 1))
    assert study_found.job_id == second and len(study_found.paths) == 3


def _next_run(sf: SessionFactory, n: int, status: str, ended: datetime, **finish: Any) -> int:
    """A later run of study ``n`` (see :func:`_study`): one more instance received, its job ended
    ``status`` at ``ended``."""
    study = f"1.2.826.0.1.3680043.8.498.{n}"
    late = instances.ReceivedInstance(
        sop_instance_uid=f"{study}.2.{ended.timestamp():.0f}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid=study, series_instance_uid=f"{study}.2",
        kept=True, path=f"/spool/{study}/{study}.2/late.dcm", calling_ae="PACS",
    )  # fmt: skip
    instances.record_instances(sf, [late], now=ended - timedelta(minutes=5))
    assert len(instances.schedule_due_studies(sf, 10, now=ended - timedelta(minutes=4))) == 1
    job_id = job_queue.claim_job(sf, now=ended - timedelta(minutes=3))
    assert job_id is not None
    assert job_queue.finish_job(sf, job_id, status=status, now=ended, **finish)
    return job_id


def test_a_held_result_keeps_its_study_when_a_later_run_failed_and_is_not_released_once_its_outputs_go(
    sf: SessionFactory, tmp_path: Path
) -> None:
    """Run 1 held by QC, run 2 of the same study skipped: the failed rule removed the spool and run 1's
    SEG and SR after failed_keep_hours, while /healthz still counted run 1 held; `segnode jobs retry 1
    --send-anyway` was then accepted and its sends failed "cannot read the file" for ever. The study
    stays while its held job can be released; a release whose outputs are gone is refused."""
    start = utcnow() - timedelta(days=30)
    seg = tmp_path / "seg.dcm"
    seg.write_bytes(b"x")
    output = [job_queue.OutputObject(str(seg), "1.2.3.9")]
    pacs = [SimpleNamespace(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112)]
    result = {"outputs": [{"path": str(seg), "sop_instance_uid": "1.2.3.9"}]}
    held = _study(sf, 1, "review", start, reason="qc series_slices", result=result, outputs=output)
    _next_run(sf, 1, "skipped", start + timedelta(hours=1), reason="no usable FLAIR")
    assert job_queue.held_job_count(sf) == 1
    assert _removable(sf, utcnow() + timedelta(days=3650)) == {}

    seg.unlink()  # gone all the same (removed by hand, or by the node before this fix)
    with pytest.raises(JobStateError, match=f"job {held}: 1 of its 1 outputs are gone .*nothing was sent"):
        job_queue.release_job(sf, held, by="admin", destinations=pacs)
    info = job_queue.get_job(sf, held)
    assert info.status == "review" and info.sends == []

    # A later run that delivered supersedes the held one: nothing can send it, the study may go.
    done = _next_run(sf, 1, "done", start + timedelta(hours=2), outputs=output, destinations=pacs)
    for send in send_queue.due_sends(sf, now=utcnow()):
        send_queue.mark_sent(sf, send.id)
    assert job_queue.held_job_count(sf) == 0
    found = removable_studies(sf, utcnow(), utcnow())
    assert [(s.job_id, len(s.paths)) for s in found] == [(done, 4)]


def test_rows_of_ignored_instances_are_forgotten_in_batches_once_old(migrated_db_url: str) -> None:
    """A PACS routing CT to the node: each instance is acknowledged and recorded not kept, with no file
    (node/scp.py _ignore), and nothing ever deleted those rows. They go once received before the
    cut-off, oldest first, ``limit`` per call; rows spool retention marked (their path still set) and
    kept ones stay."""
    from db.retention import forget_ignored_instances
    from db.session import make_engine, make_session_factory

    sf = make_session_factory(make_engine(migrated_db_url))
    start = utcnow() - timedelta(days=60)

    def row(uid: str, kept: bool, path: str | None) -> instances.ReceivedInstance:
        return instances.ReceivedInstance(
            sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4", kept=kept, path=path, calling_ae="PACS",
        )  # fmt: skip

    for i in range(5):
        instances.record_instances(sf, [row(f"1.2.3.4.{i}", False, None)], now=start + timedelta(hours=i))
    instances.record_instances(sf, [row("1.2.3.4.9", False, "/spool/1.2.3/1.2.3.4/9.dcm")], now=start)
    instances.record_instances(sf, [row("1.2.3.4.8", True, "/spool/1.2.3/1.2.3.4/8.dcm")], now=start)
    instances.record_instances(sf, [row("1.2.3.4.7", False, None)], now=utcnow())
    assert instances.instance_counts(sf)["ignored"] == 7

    cutoff = start + timedelta(days=1)
    assert forget_ignored_instances(sf, cutoff, limit=2) == 2
    assert forget_ignored_instances(sf, cutoff, limit=2) == 2
    assert forget_ignored_instances(sf, cutoff, limit=2) == 1
    assert forget_ignored_instances(sf, cutoff, limit=2) == 0
    counts = instances.instance_counts(sf)
    assert (counts["ignored"], counts["kept"]) == (2, 1)  # the marked row and the recent one
    assert instances.instance_kept(sf, "1.2.3.4.8")


def test_forgetting_ignored_rows_reads_an_index_not_the_whole_table(sqlite_sf: SessionFactory) -> None:
    """Every retention pass forgets ignored rows by age (10 batches at most, the last one finding
    fewer): without an index each query scanned the whole of node_instances in a write transaction,
    about 1 s at 2 million rows on SQLite, holding up the receivers' commits. The query's plan, taken
    as SQLite runs it, searches ix_node_instances_kept_received (migration 0005)."""
    from sqlalchemy import event

    from db.retention import forget_ignored_instances

    engine = sqlite_sf.kw["bind"]
    selects: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "node_instances" in statement:
            selects.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        assert forget_ignored_instances(sqlite_sf, utcnow(), limit=1000) == 0
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(selects) == 1, selects
    statement, parameters = selects[0]
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
    plan = " | ".join(str(row[-1]) for row in rows)
    assert "USING INDEX ix_node_instances_kept_received" in plan, plan
    assert "SCAN node_instances" not in plan and "TEMP B-TREE" not in plan, plan


def test_an_earlier_runs_refused_result_goes_with_the_study_its_later_run_delivered(
    sf: SessionFactory, tmp_path: Path
) -> None:
    """Run 1's SEG refused for good, run 2's delivered: the study leaves under run 2's delivered rule,
    and run 1's outputs with it. Its refusal is superseded (only the latest run can be retried); kept, its
    outputs stayed in the jobs directory for ever, since nothing leads a later pass back to a study
    whose instance rows are gone (found by review of the day's diff)."""
    pacs = [SimpleNamespace(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112)]
    start = utcnow() - timedelta(days=30)

    def outputs(name: str) -> list[job_queue.OutputObject]:
        path = tmp_path / name
        path.write_bytes(b"x")
        return [job_queue.OutputObject(str(path), f"1.2.3.{len(name)}")]

    run1 = _study(sf, 1, "done", start, outputs=outputs("seg1.dcm"), destinations=pacs)
    for send in send_queue.due_sends(sf, now=utcnow()):
        send_queue.mark_send_failed(sf, send.id, "refused", base_seconds=1, max_seconds=1, give_up=True)
    later = start + timedelta(hours=1)
    run2 = _next_run(sf, 1, "done", later, outputs=outputs("seg22.dcm"), destinations=pacs)
    for send in send_queue.due_sends(sf, now=utcnow()):
        send_queue.mark_sent(sf, send.id)
    [study] = removable_studies(sf, utcnow(), utcnow())
    assert study.job_id == run2 and study.delivery == "delivered"
    assert set(study.finished_job_ids) == {run1, run2}
