"""Runs of a study, on a real node: a run whose inputs are those already sent sends nothing again
(``segnode jobs retry`` still does); a series with fewer images than its headers announce waits for
the rest, for a while."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import job_queue
from node.config import Destination
from node.sender import store_files
from tests.helpers.node import CatchingSCP, make_threshold_model, node_settings, running_node
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SHAPE = (48, 48, 12)


def _send(node: Any, files: list[Path]) -> None:
    results = store_files(files, "127.0.0.1", node.scp.port, "SEGNODE", "PACS")
    assert {status for _, status, _ in results} == {0}


def _ended(node: Any, job_id: int, attempts: int = 1) -> job_queue.JobInfo:
    """Job ``job_id`` once its run (claim ``attempts``) has ended."""

    def ended() -> job_queue.JobInfo | None:
        jobs = [j for j in job_queue.list_jobs(node.sf) if j.id == job_id]
        done = jobs and jobs[0].attempts >= attempts and jobs[0].status not in ("queued", "running")
        return job_queue.get_job(node.sf, job_id) if done else None

    return wait_until(ended, 60, f"job {job_id}'s end")  # type: ignore[no-any-return]


def test_a_run_over_unchanged_inputs_sends_nothing_again_a_retry_and_a_changed_instance_do(
    tmp_path: Path,
) -> None:
    """A study's second part brings a series the model does not use (a DWI, an ADC map, a key object
    at a site; here a T2 for a FLAIR-only model): run 2 chose the same FLAIR files and made the same SEG,
    which was sent a second time, one identical SEG series per part in the PACS. Now it ends done with
    the reason and no sends; `segnode jobs retry` sends it all the same, and a FLAIR instance sent again
    with other content makes a run that sends."""
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    study = write_study(case, tmp_path / "study", modalities=["FLAIR", "T2"])
    catcher = CatchingSCP().start(free_port())
    pacs = [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    try:
        with running_node(node_settings(tmp_path, free_port(), pacs), model) as node:
            _send(node, study.files["FLAIR"])
            first = _ended(node, 1)
            assert first.status == "done" and first.reason == "", first.reason
            catcher.wait_for(lambda got: len(got) == 2, 30)  # SEG and SR

            _send(node, study.files["T2"])
            second = _ended(node, 2)
            assert second.status == "done"
            assert second.reason == "inputs unchanged since job 1; results not sent again"
            assert second.sends == [] and second.result["inputs_digest"] == first.result["inputs_digest"]

            job_queue.retry_job(node.sf, 2)  # an administrator's request: sent again
            retried = _ended(node, 2, attempts=2)
            assert retried.status == "done" and retried.reason == "", retried.reason
            assert len(retried.sends) == 2
            catcher.wait_for(lambda got: len(got) == 4, 30)

            changed = pydicom.dcmread(study.files["FLAIR"][5])
            changed.WindowWidth = 1234  # the same instance with other content: a new version of its file
            changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
            _send(node, [tmp_path / "changed.dcm"])
            third = _ended(node, 3)
            assert third.status == "done" and third.reason == "", third.reason
            assert third.result["inputs_digest"] != first.result["inputs_digest"]
            catcher.wait_for(lambda got: len(got) == 6, 30)
            assert len(catcher.of_modality("SEG")) == 3
    finally:
        catcher.stop()


def test_a_retried_done_jobs_result_is_a_series_of_its_own(tmp_path: Path) -> None:
    """`segnode jobs retry` of a study's latest, done job sent a second SEG and SR series with the
    series numbers (9901, 9902) and descriptions of the first, which the PACS already held: only the
    ContentTime told them apart. The retry's are 1000 higher and say "retry 1"; a second retry's
    "retry 2"."""
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    catcher = CatchingSCP().start(free_port())
    pacs = [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    try:
        with running_node(node_settings(tmp_path, free_port(), pacs), model) as node:
            _send(node, study.files["FLAIR"])
            assert _ended(node, 1).status == "done"
            catcher.wait_for(lambda got: len(got) == 2, 30)
            for attempt in (2, 3):
                job_queue.retry_job(node.sf, 1)
                retried = _ended(node, 1, attempts=attempt)
                assert retried.status == "done" and retried.reason == "", retried.reason
                catcher.wait_for(lambda got, n=attempt: len(got) == 2 * n, 30)
    finally:
        catcher.stop()
    got = catcher.received
    series = [(ds.Modality, int(ds.SeriesNumber), ds.SeriesDescription, ds.SeriesInstanceUID) for ds in got]
    assert sorted((m, n, d) for m, n, d, _ in series) == [
        ("SEG", 9901, "AI TUMOUR SEG (segnode, not for diagnosis alone)"),
        ("SEG", 10901, "AI TUMOUR SEG (segnode, not for diagnosis alone) retry 1"),
        ("SEG", 11901, "AI TUMOUR SEG (segnode, not for diagnosis alone) retry 2"),
        ("SR", 9902, "AI TUMOUR VOLUME (segnode, not for diagnosis alone)"),
        ("SR", 10902, "AI TUMOUR VOLUME (segnode, not for diagnosis alone) retry 1"),
        ("SR", 11902, "AI TUMOUR VOLUME (segnode, not for diagnosis alone) retry 2"),
    ]
    assert len({uid for _, _, _, uid in series}) == 6


def _review_seen(node: Any) -> tuple[int, float, list[str]]:
    """The held jobs that /healthz reports, the segnode_jobs_in_review gauge and /healthz's warnings."""
    ok, health = node.health()
    assert ok, health
    node.refresh_gauges()
    rendered = node.metrics.render().decode().splitlines()
    [gauge] = [line for line in rendered if line.startswith("segnode_jobs_in_review ")]
    return health["jobs_in_review"], float(gauge.split()[1]), health.get("warnings", [])


def test_a_released_result_is_not_held_again_when_the_inputs_are_unchanged(tmp_path: Path) -> None:
    """Run 1 was held by QC and released; the study's next part, a T2 the model does not use, made
    run 2 over run 1's very inputs, which was held again (the QC hold came before the unchanged-inputs
    check): released too, the PACS got the identical SEG twice, and left held, the study stayed in
    review and spool retention never removed it. Run 2 ends done, "inputs unchanged", nothing sent,
    and the study leaves the spool once its keep time has passed.

    While run 1 is held, /healthz (still ok) and the segnode_jobs_in_review gauge say so, with what
    to do: nothing counted the held studies, which keep their spool files, so a site that never
    reviewed filled its disk unwarned."""
    from db import retention, send_queue
    from db.transactions import utcnow

    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    study = write_study(case, tmp_path / "study", modalities=["FLAIR", "T2"])
    catcher = CatchingSCP().start(free_port())
    pacs = [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    settings = node_settings(tmp_path, free_port(), pacs)
    settings.qc.min_slices = SHAPE[2] + 1  # every run of the study fails series_slices
    try:
        with running_node(settings, model) as node:
            _send(node, study.files["FLAIR"])
            assert _ended(node, 1).status == "review"
            held, gauge, [warning] = _review_seen(node)
            assert (held, gauge) == (1, 1.0)
            assert warning.startswith("1 jobs held in review by a QC check") and all(
                what in warning for what in ("segnode jobs list --status review", "--send-anyway")
            ), warning
            job_queue.release_job(node.sf, 1, by="admin", destinations=pacs)
            assert _review_seen(node) == (0, 0.0, [])
            catcher.wait_for(lambda got: len(got) == 2, 30)  # SEG and SR
            wait_until(lambda: send_queue.pending_send_count(node.sf) == 0, 30, "both sends acknowledged")

            _send(node, study.files["T2"])
            second = _ended(node, 2)
            assert second.status == "done" and second.sends == []
            assert second.reason == "inputs unchanged since job 1; results not sent again"
            later = utcnow() + timedelta(days=400)  # past both keep times
            removable = retention.removable_studies(
                node.sf, later - timedelta(hours=168), later - timedelta(hours=720)
            )
            assert [r.study_instance_uid for r in removable] == [study.study_instance_uid]
            assert len(catcher.received) == 2
    finally:
        catcher.stop()


def test_a_result_released_after_failing_qc_says_so_in_its_seg_and_sr(tmp_path: Path) -> None:
    """A result QC held and an administrator released reached the PACS looking exactly like one that
    passed: the usual series descriptions, and nothing in the SR about the failed check (a
    tumour_within_coverage failure, an incomplete volume, went out as a whole one). Its SEG's and SR's
    SeriesDescription now begin "QC FAILED", and the SR names each failed rule with its
    message in a Qualitative Evaluations container that dsr2html shows."""
    import subprocess

    from tests.helpers.peers import DCIODVFY_PRIVATE_SCHEME, dciodvfy_problems, require_program

    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
    catcher = CatchingSCP().start(free_port())
    pacs = [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    settings = node_settings(tmp_path, free_port(), pacs)
    settings.qc.min_slices = SHAPE[2] + 1  # the run fails series_slices
    try:
        with running_node(settings, model) as node:
            _send(node, study.files["FLAIR"])
            held = _ended(node, 1)
            assert held.status == "review"
            [failed] = [r for r in held.result["qc"]["rules"] if r["status"] == "failed"]
            assert failed["name"] == "series_slices"
            job_queue.release_job(node.sf, 1, by="admin", destinations=pacs)
            catcher.wait_for(lambda got: len(got) == 2, 30)
    finally:
        catcher.stop()
    [seg], [sr] = catcher.of_modality("SEG"), catcher.of_modality("SR")
    assert seg.SeriesDescription == "QC FAILED: AI TUMOUR SEG (segnode, not for diagnosis alone)"
    assert sr.SeriesDescription == "QC FAILED: AI TUMOUR VOLUME (segnode, not for diagnosis alone)"
    assert (int(seg.SeriesNumber), int(sr.SeriesNumber)) == (9901, 9902)
    [evaluations] = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    texts = {
        item.ConceptNameCodeSequence[0].CodeValue: item.TextValue for item in evaluations.ContentSequence
    }
    assert texts["QC_FAILED_RULE"] == f"failed check series_slices: {failed['message']}"
    assert "released it after review" in texts["QC_RELEASED"]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    html = subprocess.run(
        [require_program("dsr2html"), str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    shown = html.split("<h2>Qualitative Evaluations</h2>", 1)[1]
    rule = f"failed check series_slices: {failed['message']}"
    assert shown.index("released it after review") < shown.index(rule)
    assert [p for p in dciodvfy_problems(path) if not p.startswith(DCIODVFY_PRIVATE_SCHEME)] == []


def test_the_digest_changes_with_the_settings_a_result_depends_on() -> None:
    """Same inputs after a restart with other QC limits, registration or mirroring: another result, so
    another digest (and the run sends)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from node.config import QCSettings, RegistrationConfig
    from node.pipeline import inputs_digest, result_settings

    def route(mirror: str) -> Any:
        model = SimpleNamespace(
            label="m 1.0 (int8, #1)", segmenter=SimpleNamespace(mirror=mirror), card={"modalities": ["FLAIR"]}
        )
        return SimpleNamespace(task="whole_tumor", model=model, assignment=SimpleNamespace(chosen={}))

    def digest(ctx: Any, mirror: str = "none") -> str:
        return inputs_digest(route(mirror), "bet 1.0", result_settings(ctx, route(mirror)))

    ctx = SimpleNamespace(qc=QCSettings(), registration=RegistrationConfig())
    base = digest(ctx)
    assert digest(SimpleNamespace(qc=QCSettings(), registration=RegistrationConfig())) == base
    assert digest(ctx, mirror="lr") != base
    assert digest(SimpleNamespace(qc=replace(QCSettings(), min_brain_ml=700.0),
                                  registration=RegistrationConfig())) != base
    assert digest(SimpleNamespace(qc=QCSettings(),
                                  registration=replace(RegistrationConfig(), threads=1))) != base


START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _queued_run(sf: Any, n: int) -> int:
    """Run ``n`` of study 1.2, made by its instance 1.2.``n`` arriving at START + 20 n s: its job id."""
    from db import instances

    at = START + timedelta(seconds=20 * n)
    instances.record_instance(
        sf, sop_instance_uid=f"1.2.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid="1.2", series_instance_uid="1.2.9", kept=True, path=f"/s/{n}.dcm",
        calling_ae="PACS", now=at,
    )  # fmt: skip
    [job] = instances.schedule_due_studies(sf, 5.0, now=at + timedelta(seconds=6))
    return int(job)


def _claimed_run(sf: Any, n: int) -> tuple[int, int]:
    """Run ``n`` of study 1.2 (:func:`_queued_run`), claimed: its job id and claim attempt."""
    job = _queued_run(sf, n)
    claim = job_queue.claim(sf, now=START + timedelta(seconds=20 * n + 7))
    assert claim is not None and claim.job_id == job
    return job, claim.attempt


def _finish(
    sf: Any,
    job: int,
    attempt: int,
    to: list[Destination],
    digest: str,
    status: str = "done",
    reason: str = "",
    out_dir: Path | None = None,
) -> None:
    """End ``job`` with one output, sent to ``to`` (``review``: held, nothing sent); its file written
    in ``out_dir`` when given (a release sends only outputs whose files are there)."""
    out = job_queue.OutputObject(f"{out_dir or '/o'}/{job}.dcm", f"9.{job}")
    if out_dir is not None:
        Path(out.path).write_bytes(b"SEG")
    outputs = [{"path": out.path, "sop_instance_uid": out.sop_instance_uid}]
    result = {"inputs_digest": digest, "outputs": outputs}
    assert job_queue.finish_job(
        sf, job, status=status, reason=reason, result=result, outputs=[out], destinations=to, attempt=attempt
    )


def test_a_studys_later_run_is_not_claimed_until_its_earlier_run_has_ended(sqlite_sf: Any) -> None:
    """Two workers: instances that came while run 1 of a study ran made run 2, which the other worker
    claimed at once; run 1 (fewer instances) ended last and queued its older result after run 2's, so
    the PACS's latest SEG was the stale one. Run 2 is not claimed while run 1 runs; it is once run 1
    has ended, and its sends are queued after run 1's."""
    sf = sqlite_sf
    pacs = [Destination("pacs", "PACS", "127.0.0.1", 1001)]
    first, attempt = _claimed_run(sf, 1)
    second = _queued_run(sf, 2)
    assert job_queue.claim(sf, now=START + timedelta(minutes=5)) is None
    assert job_queue.get_job(sf, second).status == "queued"
    _finish(sf, first, attempt, pacs, "part")
    claimed = job_queue.claim(sf, now=START + timedelta(minutes=6))
    assert claimed is not None and claimed.job_id == second
    _finish(sf, second, claimed.attempt, pacs, "whole")
    assert job_queue.get_job(sf, first).sends[0].id < job_queue.get_job(sf, second).sends[0].id


def test_a_destination_an_earlier_run_over_the_same_inputs_reached_is_not_sent_to_again(
    sqlite_sf: Any,
) -> None:
    """Run 1 reached d1 only (d2 was added later); run 2, same inputs, sent to d2 alone; run 3, same
    inputs again (a key object arrives): d1 and d2 both have the result, so run 3 sends nothing. It
    compared with run 2 alone and sent to d1 a second time."""
    from types import SimpleNamespace

    from node.pipeline import _not_again

    sf = sqlite_sf
    d1, d2 = Destination("d1", "D1", "127.0.0.1", 1001), Destination("d2", "D2", "127.0.0.1", 1002)
    ctx = SimpleNamespace(sf=sf, destinations=[d1, d2])
    first, attempt = _claimed_run(sf, 1)
    _finish(sf, first, attempt, [d1], "same")
    second, attempt = _claimed_run(sf, 2)
    verdict = _not_again(ctx, second, "same")  # type: ignore[arg-type]
    assert verdict is not None and [d.name for d in verdict[1]] == ["d2"]
    _finish(sf, second, attempt, verdict[1], "same", reason=verdict[0])
    third, _ = _claimed_run(sf, 3)
    verdict = _not_again(ctx, third, "same")  # type: ignore[arg-type]
    assert verdict == ("inputs unchanged since job 2; results not sent again", [])
    # d1's port corrected in the config since: the sender delivers by name (its queued sends went to the
    # corrected address), so d1 counts as reached and gets no second copy.
    corrected = SimpleNamespace(sf=sf, destinations=[Destination("d1", "D1", "127.0.0.1", 2001), d2])
    verdict = _not_again(corrected, third, "same")  # type: ignore[arg-type]
    assert verdict == ("inputs unchanged since job 2; results not sent again", [])


def test_the_last_sent_run_is_the_latest_run_not_the_last_to_queue_sends(sqlite_sf: Any) -> None:
    """Run 1 (a partial FLAIR) ended after run 2 (the whole FLAIR), two workers: its sends were queued
    last. Run 3, over run 2's inputs (a T2 arrived), was compared with run 1 and sent run 2's result a
    second time; it is compared with run 2, the study's latest sent run. A node no longer starts a
    run while another of its study runs, but a database may hold such a history from before: run 2
    is set running here as such a node claimed it."""
    from types import SimpleNamespace

    from sqlalchemy import update

    from db.node_tables import NodeJob
    from db.transactions import writing
    from node.pipeline import _not_again

    sf = sqlite_sf
    pacs = [Destination("pacs", "PACS", "127.0.0.1", 1001)]
    first, first_attempt = _claimed_run(sf, 1)
    second, attempt = _queued_run(sf, 2), 1
    with writing(sf) as s:  # claimed while run 1 still runs
        running = {"status": "running", "owner": job_queue.owner_id(), "attempts": attempt}
        s.execute(update(NodeJob).where(NodeJob.id == second).values(**running))
    _finish(sf, second, attempt, pacs, "whole")
    _finish(sf, first, first_attempt, pacs, "part")
    third, _ = _claimed_run(sf, 3)
    verdict = _not_again(SimpleNamespace(sf=sf, destinations=pacs), third, "whole")  # type: ignore[arg-type]
    assert verdict == (f"inputs unchanged since job {second}; results not sent again", [])


def test_a_held_run_is_not_sent_anyway_once_a_later_run_supersedes_it(sqlite_sf: Any, tmp_path: Path) -> None:
    """Run 1 (6 of 12 slices) was held by QC, run 2 (all 12) sent; `segnode jobs retry 1 --send-anyway`
    then sent the partial result, which the PACS got last. A held run is not released while a later
    run of its study is running or once one ended done; a later run held too or failed, nothing sent,
    does not stop it."""
    from db.exceptions import JobStateError

    sf = sqlite_sf
    pacs = [Destination("pacs", "PACS", "127.0.0.1", 1001)]
    held, attempt = _claimed_run(sf, 1)
    _finish(sf, held, attempt, pacs, "part", status="review", reason="qc series_slices")
    assert job_queue.held_job_count(sf) == 1  # segnode_jobs_in_review, /healthz
    later, attempt = _claimed_run(sf, 2)
    assert job_queue.held_job_count(sf) == 0  # superseded: no longer waiting for anyone
    with pytest.raises(JobStateError) as running:
        job_queue.release_job(sf, held, by="admin", destinations=pacs)
    assert str(running.value) == (
        f"job {held} (run 1) is not sent: job {later}, run 2 of the same study, is running and supersedes "
        f"it (the PACS would get the older result last); see `segnode jobs show {later}` once it ends"
    )
    _finish(sf, later, attempt, pacs, "whole")
    superseded = f"job {later}, run 2 of the same study, ended done and supersedes"
    with pytest.raises(JobStateError, match=superseded):
        job_queue.release_job(sf, held, by="admin", destinations=pacs)
    assert job_queue.get_job(sf, held).status == "review" and job_queue.get_job(sf, held).sends == []

    again, attempt = _claimed_run(sf, 3)
    _finish(sf, again, attempt, pacs, "other", status="review", reason="qc brain_volume", out_dir=tmp_path)
    failed, attempt = _claimed_run(sf, 4)
    _finish(sf, failed, attempt, [], "", status="failed", reason="an unreadable series")
    assert job_queue.held_job_count(sf) == 1  # run 3, still to be released; run 1 superseded for good
    released = job_queue.release_job(sf, again, by="admin", destinations=pacs)
    assert released.status == "done" and len(released.sends) == 1
    assert job_queue.held_job_count(sf) == 0


def test_only_a_studys_latest_run_can_be_retried(sqlite_sf: Any) -> None:
    """Run 1 sent, a corrected instance made run 2, sent; `segnode jobs retry 1` then ran job 1 over
    the study as it is now (run 2's inputs) and sent a third SEG numbered as run 1. A retry of a job
    that is not its study's latest run is refused, naming the latest; that one's retry is accepted."""
    from db.exceptions import JobStateError

    sf = sqlite_sf
    pacs = [Destination("pacs", "PACS", "127.0.0.1", 1001)]
    first, attempt = _claimed_run(sf, 1)
    _finish(sf, first, attempt, pacs, "before")
    second, attempt = _claimed_run(sf, 2)
    _finish(sf, second, attempt, pacs, "corrected")
    with pytest.raises(JobStateError) as refused:
        job_queue.retry_job(sf, first)
    assert str(refused.value) == (
        f"job {first} is run 1 of its study, whose latest run is job {second} (run 2); only the latest "
        f"run can be retried: `segnode jobs retry {second}` analyses the study as it is now"
    )
    job = job_queue.get_job(sf, first)
    assert job.status == "done" and [s.status for s in job.sends] == ["pending"]
    assert job_queue.retry_job(sf, second).status == "queued"
    with pytest.raises(JobStateError, match=f"latest run is job {second} .* it is queued and analyses"):
        job_queue.retry_job(sf, first)


def _announcing(files: list[Path], out: Path) -> list[Path]:
    """``files`` (one series) with ImagesInAcquisition (0020,1002) set to their count, as GE writes it."""
    out.mkdir()
    written = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = len(files)
        ds.save_as(out / path.name, enforce_file_format=True)
        written.append(out / path.name)
    return written


def test_a_series_short_of_its_announced_images_waits_for_the_rest_then_runs_as_received(
    tmp_path: Path,
) -> None:
    """A FLAIR whose PACS paused between two associations for longer than study_idle_seconds was
    analysed half received and that SEG sent as final; the full run later sent a second one. Now the
    job waits while the series has fewer images than its ImagesInAcquisition, and runs once the rest
    has come; when it does not come within incomplete_series_wait_seconds, the job runs on what came
    and says so."""
    case = make_synthetic_case(3, SHAPE)
    model = make_threshold_model(tmp_path / "model", crop=SHAPE[:2], spacing=case.spacing, threshold=1.5)
    catcher = CatchingSCP().start(free_port())
    pacs = [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    settings = node_settings(tmp_path, free_port(), pacs)
    settings.node.incomplete_series_wait_seconds = 60.0
    whole, cut = (
        _announcing(write_study(case, tmp_path / n, modalities=["FLAIR"]).files["FLAIR"], tmp_path / f"{n}2")
        for n in ("a", "b")
    )
    flair = str(pydicom.dcmread(cut[0]).SeriesInstanceUID)
    try:
        with running_node(settings, model) as node:
            _send(node, whole[:8])

            def waiting() -> bool:
                return any(
                    j.status == "queued" and j.reason.startswith("waiting for the rest of a series")
                    for j in job_queue.list_jobs(node.sf)
                )

            wait_until(waiting, 30, "the job to wait for the rest of the FLAIR")
            assert catcher.received == []
            _send(node, whole[8:])  # the PACS's next association
            job = _ended(node, 1)
            assert (job.status, job.reason, job.instance_count) == ("done", "", SHAPE[2]), job.reason
            assert "series_incomplete" not in job.result
            catcher.wait_for(lambda got: len(got) == 2, 30)

            node.context.incomplete_series_wait = 0.5  # the rest never comes: runs on what came
            _send(node, cut[:8])
            job = _ended(node, 2)
            assert job.status == "done" and job.instance_count == 8
            assert job.reason.startswith(f"series {flair}: 8 of {SHAPE[2]} images received (analysed after")
            assert job.result["series_incomplete"] == job.reason
            catcher.wait_for(lambda got: len(got) == 4, 30)
            assert len(job_queue.list_jobs(node.sf)) == 2
    finally:
        catcher.stop()


def test_a_held_result_an_administrator_will_not_send_is_dismissed_and_its_study_can_leave(
    sqlite_sf: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result held in review that is not to be sent (the wrong study, a series not meant for the node)
    could only be released or run again: it counted in segnode_jobs_in_review and /healthz for good and
    spool retention kept its study for ever. `segnode jobs dismiss ID` ends it skipped, with who and why,
    and the study leaves the spool as any result not sent."""
    from db import retention
    from tests.helpers.cli import run_cli

    sf = sqlite_sf
    held, attempt = _claimed_run(sf, 1)
    _finish(sf, held, attempt, [], "part", status="review", reason="qc brain_volume: brain 412.0 mL")
    assert job_queue.held_job_count(sf) == 1
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "segnode.db"}"\n')  # sqlite_sf's database
    dismiss = ["jobs", "dismiss", str(held), "--config", str(config), "--by", "ops"]
    dismiss += ["--reason", "wrong study"]
    code, out, err = run_cli(dismiss, capsys, monkeypatch)
    assert (code, out.strip()) == (0, f"job {held}: held result dismissed by ops; nothing sent"), err
    job = job_queue.get_job(sf, held)
    assert job.status == "skipped" and job.sends == []
    held_for = "qc brain_volume: brain 412.0 mL"
    assert job.reason == f"held result dismissed by ops: wrong study (held for: {held_for})"
    assert job_queue.held_job_count(sf) == 0
    assert job.finished_at is not None
    later = job.finished_at + timedelta(hours=1)
    assert [r.job_id for r in retention.removable_studies(sf, None, later)] == [held]
    code, out, err = run_cli(dismiss, capsys, monkeypatch)  # neither held nor with refused sends: exit 2
    assert code == 2 and f"job {held} has no refused sends" in err
