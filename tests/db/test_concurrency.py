"""Two processes promote different models of one task at the same moment (SQLite and PostgreSQL); and
other writes two processes (or two nodes) may make at once: upgrades, instance moves, stale jobs.

What the audit trail must hold, explicitly: the winner's ``promote`` event, and for the loser a
``refused`` event whose reason names the concurrent change; exactly one model is active.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from db.registry import Registry, open_registry
from db.session import make_engine, make_session_factory
from tests.conftest import write_model_dir

TASK = "whole_tumor"
CTX = mp.get_context("fork")


def _promote_worker(url: str, model_id: int, admin: str, barrier: Any, at_write: bool, results: Any) -> None:
    """Promote ``model_id`` as ``admin``; wait at ``barrier`` before the write (or before starting)."""
    sync: Callable[[], None] = lambda: barrier.wait(timeout=60)  # noqa: E731
    registry = Registry(make_session_factory(make_engine(url)), before_write=sync if at_write else None)
    try:
        if not at_write:
            sync()
        registry.promote(model_id, by=admin, reason=f"{admin} wants #{model_id}")
        results.put((admin, model_id, "ok", ""))
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put((admin, model_id, type(exc).__name__, str(exc)))
    finally:
        registry.close()


def _race(url: str, contenders: list[tuple[int, str]], at_write: bool) -> list[tuple[str, int, str, str]]:
    barrier = CTX.Barrier(len(contenders))
    results = CTX.Queue()
    procs = [
        CTX.Process(target=_promote_worker, args=(url, model_id, admin, barrier, at_write, results))
        for model_id, admin in contenders
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sorted(outcomes)


def _setup(url: str, tmp_path: Path, with_active: bool) -> tuple[Registry, int | None, int, int]:
    registry = open_registry(url)
    ids = []
    for version in ("0", "1", "2"):
        infos = registry.import_dir(write_model_dir(tmp_path / version, version=version, seed=int(version)))
        ids.append(infos[-1].id)
    base = None
    if with_active:
        base = registry.promote(ids[0], by="setup").id
    return registry, base, ids[1], ids[2]


@pytest.mark.parametrize("with_active", [False, True], ids=["no-active", "replacing-active"])
def test_two_processes_promote_at_the_same_moment(
    migrated_db_url: str, tmp_path: Path, with_active: bool
) -> None:
    """Both processes pass their gates, then write at once: one wins, the other changes nothing."""
    registry, base, a, b = _setup(migrated_db_url, tmp_path, with_active)
    try:
        before = len(registry.history(TASK))
        outcomes = _race(migrated_db_url, [(a, "alice"), (b, "bob")], at_write=True)
        winners = [o for o in outcomes if o[2] == "ok"]
        losers = [o for o in outcomes if o[2] != "ok"]
        assert len(winners) == 1 and len(losers) == 1, outcomes
        winner_admin, winner_id = winners[0][:2]
        loser_admin, loser_id, error, message = losers[0]
        assert error == "ConcurrentPromotionError"
        assert f"model #{loser_id} not promoted" in message and "nothing was changed" in message

        active = [m for m in registry.list_models(TASK) if m.status == "active"]
        assert [m.id for m in active] == [winner_id]
        assert registry.get(loser_id).status == "candidate"
        if base is not None:
            assert registry.get(base).status == "candidate"

        events = registry.history(TASK)[before:]
        assert [(e.action, e.from_model_id, e.to_model_id, e.by) for e in events] == [
            ("promote", base, winner_id, winner_admin),
            ("refused", base, loser_id, loser_admin),
        ]
        assert events[0].reason == f"{winner_admin} wants #{winner_id}"
        assert events[1].reason == message
    finally:
        registry.close()


def test_simultaneous_start_leaves_a_consistent_state(migrated_db_url: str, tmp_path: Path) -> None:
    """Both start at once (no hook inside promote): whichever interleaving happens, the state is consistent.

    Either both succeed one after the other (the second saw the first's result before its own
    gates ran) or one is refused as concurrent; in every case exactly one model is active, each
    success has its ``promote`` event and each refusal its ``refused`` event, and the promote
    events chain from the previous active model to the final one.
    """
    registry, base, a, b = _setup(migrated_db_url, tmp_path, with_active=True)
    try:
        before = len(registry.history(TASK))
        outcomes = _race(migrated_db_url, [(a, "alice"), (b, "bob")], at_write=False)
        assert all(o[2] in ("ok", "ConcurrentPromotionError") for o in outcomes), outcomes
        assert any(o[2] == "ok" for o in outcomes)
        events = registry.history(TASK)[before:]
        promotes = [e for e in events if e.action == "promote"]
        refused = [e for e in events if e.action == "refused"]
        assert sorted((e.by, e.to_model_id) for e in promotes) == sorted(
            (o[0], o[1]) for o in outcomes if o[2] == "ok"
        )
        assert sorted((e.by, e.to_model_id) for e in refused) == sorted(
            (o[0], o[1]) for o in outcomes if o[2] != "ok"
        )
        chain = [base] + [e.to_model_id for e in promotes]
        assert [e.from_model_id for e in promotes] == chain[:-1]
        active = [m.id for m in registry.list_models(TASK) if m.status == "active"]
        assert active == [chain[-1]]
    finally:
        registry.close()


def _upgrade_worker(url: str, barrier: Any, results: Any) -> None:
    from db.session import upgrade

    try:
        barrier.wait(timeout=60)
        upgrade(url)
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_upgrade_an_empty_database_at_once(db_url: str) -> None:
    """The node and an admin command start together on a fresh install: both see the schema at head."""
    from db.session import current_revision, head_revision

    barrier = CTX.Barrier(2)
    results = CTX.Queue()
    procs = [CTX.Process(target=_upgrade_worker, args=(db_url, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok", "ok"]
    assert current_revision(db_url) == head_revision()


def _move_worker(url: str, name: str, rounds: int, barrier: Any, results: Any) -> None:
    """Each round, move this worker's instance of round ``n`` into the new study ``9.9.n`` at once."""
    from db import instances

    sf = make_session_factory(make_engine(url))
    for n in range(rounds):
        barrier.wait(timeout=60)
        try:
            instances.move_instance(sf, instances.ReceivedInstance(
                f"1.2.{name}.{n}", "1.2.840.10008.5.1.4.1.1.4", f"9.9.{n}", "9.9.1", True,
                f"/spool/b/{name}.{n}", "PACS",
            ))  # fmt: skip
            results.put("ok")
        except Exception as exc:  # reported to the parent, which asserts on it
            results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_move_instances_into_one_new_study_at_once(migrated_db_url: str) -> None:
    """A corrected study re-sent over two associations taken by two receiving processes: each moves
    its first instance into the new study at the same moment; both insert its row, one collides
    (PostgreSQL: half the calls failed, answered Out of Resources with the file left unrecorded)."""
    from sqlalchemy import select

    from db import instances
    from db.node_tables import NodeInstance, NodeStudy

    rounds = 8
    sf = make_session_factory(make_engine(migrated_db_url))
    instances.record_instances(sf, [
        instances.ReceivedInstance(
            f"1.2.{name}.{n}", "1.2.840.10008.5.1.4.1.1.4", "1.1.1", "1.1.2", True,
            f"/spool/a/{name}.{n}", "PACS",
        )
        for name in ("a", "b") for n in range(rounds)
    ])  # fmt: skip
    barrier, results = CTX.Barrier(2), CTX.Queue()
    procs = [CTX.Process(target=_move_worker, args=(migrated_db_url, name, rounds, barrier, results))
             for name in ("a", "b")]  # fmt: skip
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * rounds)]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * (2 * rounds)
    with sf() as s:
        moved = {r.study_instance_uid for r in s.scalars(select(NodeInstance))}
        studies = {r.study_instance_uid: r.pending for r in s.scalars(select(NodeStudy))}
    assert moved == {f"9.9.{n}" for n in range(rounds)}
    assert studies == {"1.1.1": False, **{f"9.9.{n}": True for n in range(rounds)}}


def _other_node_run(url: str, action: str, jobs: Any, results: Any) -> None:
    """Another node's run of a job: once told the job's id, end it ``done`` (one send queued) or
    heartbeat it, at its claim (attempt 1); reports whether that write was taken."""
    from db import job_queue

    sf = make_session_factory(make_engine(url))
    job_id = jobs.get(timeout=60)
    try:
        if action == "finish":
            pacs = SimpleNamespace(name="pacs", ae_title="PACS", host="127.0.0.1", port=11112)
            seg = job_queue.OutputObject("/jobs/1/seg.dcm", "1.2.826.0.1.3680043.8.498.99")
            results.put(
                job_queue.finish_job(sf, job_id, status="done", attempt=1, outputs=[seg], destinations=[pacs])
            )
        else:
            results.put(job_queue.heartbeat(sf, job_id, attempt=1))
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(f"{type(exc).__name__}: {exc}")


def _running_job(sf: Any, owner: str, at: datetime) -> int:
    """A study of one instance received at ``at``, its job claimed by ``owner`` just after (and not
    heartbeat since)."""
    from db import instances, job_queue

    study = "1.2.826.0.1.3680043.8.498.7"
    instances.record_instances(sf, [instances.ReceivedInstance(
        f"{study}.1.1", "1.2.840.10008.5.1.4.1.1.4", study, f"{study}.1", True, f"/spool/{study}/1.dcm",
        "PACS",
    )], now=at)  # fmt: skip
    assert len(instances.schedule_due_studies(sf, 10, now=at + timedelta(minutes=1))) == 1
    claimed = job_queue.claim(sf, owner=owner, now=at + timedelta(minutes=2))
    assert claimed is not None and claimed.attempt == 1
    return claimed.job_id


@pytest.mark.parametrize("action", ["finish", "heartbeat"])
def test_a_stale_job_that_its_run_ends_or_heartbeats_meanwhile_is_not_queued_again(
    migrated_db_url: str, action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes on one database: one's requeue_stale reads a job whose heartbeat is old, and the
    other node's run of it ends the job (its send queued) or heartbeats before requeue_stale writes.
    The job stays as its run left it: written back by id, it was queued again over ``done`` (run
    again, a second SEG and SR to the PACS) or over a live run. On SQLite the writer lock makes the
    run's write wait for requeue_stale's transaction, so the run's write is the one refused."""
    from db import job_queue

    postgres = migrated_db_url.startswith("postgresql")
    sf = make_session_factory(make_engine(migrated_db_url))
    jobs, results = CTX.Queue(), CTX.Queue()
    run = CTX.Process(target=_other_node_run, args=(migrated_db_url, action, jobs, results))
    run.start()
    try:
        job_id = _running_job(sf, f"{socket.gethostname()}:{run.pid}", datetime.now(UTC) - timedelta(hours=1))
        taken: list[object] = []

        def between_read_and_write(pid: int) -> bool:  # requeue_stale asks after its read
            assert pid == run.pid
            jobs.put(job_id)
            if postgres:  # the other node's write commits now, before requeue_stale's
                taken.append(results.get(timeout=60))
            return True  # the run's process is alive: the old heartbeat alone makes the job stale

        monkeypatch.setattr(job_queue, "_pid_alive", between_read_and_write)
        requeued = job_queue.requeue_stale(sf, 300.0)
        if not postgres:
            taken.append(results.get(timeout=60))
    finally:
        run.join(timeout=60)
    assert run.exitcode == 0 and taken == [postgres]
    job = job_queue.get_job(sf, job_id)
    if postgres:
        assert requeued == []
        assert (job.status, job.requeues) == ("done" if action == "finish" else "running", 0)
        assert len(job.sends) == (1 if action == "finish" else 0)
    else:
        assert requeued == [job_id]
        assert (job.status, job.requeues, job.sends) == ("queued", 1, [])


def _retry_worker(url: str, jobs: Any, results: Any) -> None:
    """An administrator's ``segnode jobs retry``, once told the job's id; reports the outcome."""
    from db import job_queue

    sf = make_session_factory(make_engine(url))
    job_id = jobs.get(timeout=60)
    try:
        results.put(job_queue.retry_job(sf, job_id).status)
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(f"{type(exc).__name__}: {exc}")


def test_a_retry_while_another_process_takes_its_study_out_of_the_spool_is_refused(
    migrated_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spool retention's begin_removal has checked a failed study again and is about to mark its
    instances when an administrator retries its job from another process. The retry waits for the
    removal (the study's row lock on PostgreSQL, the writer lock on SQLite) and is then refused: it
    never queues a job whose instances are being removed."""
    import time

    from sqlalchemy import text

    from db import job_queue, retention

    postgres = migrated_db_url.startswith("postgresql")
    sf = make_session_factory(make_engine(migrated_db_url))
    ended = datetime.now(UTC) - timedelta(days=30)
    job_id = _running_job(sf, job_queue.owner_id(), ended - timedelta(minutes=5))
    assert job_queue.finish_job(sf, job_id, status="failed", reason="FLAIR: unreadable", now=ended)
    jobs, results = CTX.Queue(), CTX.Queue()
    admin = CTX.Process(target=_retry_worker, args=(migrated_db_url, jobs, results))
    admin.start()
    checked = retention._removable
    outcome: list[str] = []

    def then_retry(*args: Any) -> Any:  # inside begin_removal's transaction, before the rows are marked
        found = checked(*args)
        jobs.put(job_id)
        deadline = time.monotonic() + 30
        while postgres and results.empty() and time.monotonic() < deadline:
            with sf() as s:  # until the retry waits for a lock (or, without one, has answered)
                if s.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")):
                    break
            time.sleep(0.01)
        return found

    monkeypatch.setattr(retention, "_removable", then_retry)
    try:
        cutoff = ended + timedelta(days=1)
        taken = retention.begin_removal(sf, "1.2.826.0.1.3680043.8.498.7", cutoff, cutoff)
        outcome.append(results.get(timeout=60))
    finally:
        admin.join(timeout=60)
    assert taken is not None and taken.job_id == job_id and len(taken.paths) == 1
    assert outcome[0].startswith("JobStateError") and "no longer in the spool" in outcome[0], outcome
    assert job_queue.get_job(sf, job_id).status == "failed"
    assert job_queue.claim(sf) is None


def test_a_studys_next_run_waits_for_the_run_before_it_and_a_dead_run_does_not_hold_it(
    migrated_db_url: str,
) -> None:
    """Run 2 of a study is not claimed while run 1 runs, even by another node: run 1 ending after it
    queued its older result last. A dead node's run 1 holds run 2 only until requeue_stale takes it
    back: run 1, queued again, runs first (the older of the two; on PostgreSQL another node claiming
    it at that moment, its row locked, does not let run 2 through), and a run 1 that fails for good
    lets run 2 run."""
    from sqlalchemy import select

    from db import instances, job_queue
    from db.node_tables import NodeJob

    postgres = migrated_db_url.startswith("postgresql")
    sf = make_session_factory(make_engine(migrated_db_url))
    at = datetime.now(UTC) - timedelta(hours=1)
    first = _running_job(sf, "elsewhere:1", at)  # another host's node, which then died
    study = "1.2.826.0.1.3680043.8.498.7"
    instances.record_instances(sf, [instances.ReceivedInstance(
        f"{study}.1.2", "1.2.840.10008.5.1.4.1.1.4", study, f"{study}.1", True, f"/spool/{study}/2.dcm",
        "PACS",
    )], now=at + timedelta(minutes=3))  # fmt: skip
    [second] = instances.schedule_due_studies(sf, 10, now=at + timedelta(minutes=4))
    assert job_queue.claim(sf, owner="here:1") is None

    for requeues in range(1, job_queue.MAX_REQUEUES):
        assert job_queue.requeue_stale(sf, 300.0) == [first]
        if postgres:  # another node is claiming run 1 right now: its row is locked, and skipped
            with sf() as other:
                other.execute(select(NodeJob.id).where(NodeJob.id == first).with_for_update()).all()
                assert job_queue.claim(sf, owner="here:1") is None
        claimed = job_queue.claim(sf, owner="elsewhere:1", now=at + timedelta(minutes=5))
        assert claimed is not None and claimed.job_id == first, requeues
        assert job_queue.claim(sf, owner="here:1") is None
    assert job_queue.requeue_stale(sf, 300.0) == []  # the last time: run 1 ends failed
    assert job_queue.get_job(sf, first).status == "failed"
    claimed = job_queue.claim(sf, owner="here:1")
    assert claimed is not None and claimed.job_id == second
