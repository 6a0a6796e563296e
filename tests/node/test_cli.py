"""``segnode jobs | send | demo`` through the real command line entry point."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db.session import make_engine, make_session_factory, upgrade
from node import store
from node.cli import main
from tests.helpers.node import CatchingSCP, make_threshold_model
from tests.helpers.ports import free_port


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["segnode", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def config(tmp_path: Path, segnode_home: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "node.db"}"\n')
    return cfg


def _done_job(db: str) -> int:
    upgrade(db)
    sf = make_session_factory(make_engine(db))
    now = store.utcnow()
    store.record_instance(
        sf,
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.5",
        kept=True,
        path="/x.dcm",
        calling_ae="PACS",
        now=now - timedelta(seconds=60),
    )
    [job] = store.schedule_due_studies(sf, 1.0)
    store.claim_job(sf)
    store.finish_job(
        sf, job, status="skipped", reason="no FLAIR series in the study", stages={"select": 0.01}
    )
    return job


def test_jobs_list_show_retry(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _done_job(f"sqlite:///{tmp_path / 'node.db'}")
    code, out, _ = run_cli(["jobs", "list", "--config", str(config), "--json"], capsys, monkeypatch)
    assert code == 0
    [row] = json.loads(out)
    assert (row["id"], row["status"], row["reason"]) == (job, "skipped", "no FLAIR series in the study")
    code, out, _ = run_cli(["jobs", "list", "--config", str(config)], capsys, monkeypatch)
    assert code == 0 and "Jobs" in out and "skip" in out  # a Rich table (wrapped at 80 columns here)
    code, out, _ = run_cli(["jobs", "show", str(job), "--config", str(config)], capsys, monkeypatch)
    assert code == 0 and "stage select" in out
    code, out, _ = run_cli(["jobs", "retry", str(job), "--config", str(config)], capsys, monkeypatch)
    assert (code, out.strip()) == (0, f"job {job} queued again")
    code, out, _ = run_cli(["jobs", "show", str(job), "--config", str(config), "--json"], capsys, monkeypatch)
    assert json.loads(out)["status"] == "queued"
    code, out, err = run_cli(["jobs", "retry", str(job), "--config", str(config)], capsys, monkeypatch)
    assert code == 2 and f"error: job {job} is queued; only a finished job can be retried" in err
    code, _, err = run_cli(["jobs", "show", "999", "--config", str(config)], capsys, monkeypatch)
    assert code == 2
    assert err.strip() == "error: job 999 does not exist (see `segnode jobs list`)"


def test_send_folder_and_unreachable_peer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = write_study(make_synthetic_case(4, (16, 16, 8)), tmp_path / "study", modalities=["FLAIR", "T2"])
    catcher = CatchingSCP("RECEIVER").start(free_port())
    try:
        args = ["send", "127.0.0.1", str(catcher.port), str(tmp_path / "study"), "--called-ae", "RECEIVER"]
        code, out, _ = run_cli(args, capsys, monkeypatch)
    finally:
        catcher.stop()
    assert code == 0
    assert f"sent 16 of 16 files to RECEIVER@127.0.0.1:{catcher.port}" in out
    assert {str(ds.SOPInstanceUID) for ds in catcher.received} == {
        str(__import__("pydicom").dcmread(p).SOPInstanceUID) for fs in study.files.values() for p in fs
    }
    port = free_port()
    code, _, err = run_cli(["send", "127.0.0.1", str(port), str(tmp_path / "study")], capsys, monkeypatch)
    assert code == 2 and f"error: cannot send to SEGNODE@127.0.0.1:{port}: association to" in err
    code, _, err = run_cli(["send", "127.0.0.1", str(port), str(tmp_path / "nothing")], capsys, monkeypatch)
    assert code == 2 and f"error: {tmp_path / 'nothing'} does not exist" in err


def test_demo_without_model_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["demo", "--workdir", str(tmp_path / "out"), "--model", str(tmp_path / "nomodel")]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2
    assert f"error: no model at {tmp_path / 'nomodel'} (model.json missing)" in err


@pytest.mark.slow
def test_demo_runs_the_whole_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``segnode demo`` as shipped: models/default on the shipped case (a fixed-threshold test model
    stands in while the shipped model is absent)."""
    from node.demo import DEFAULT_MODEL

    shipped = (DEFAULT_MODEL / "model.json").is_file()
    args = ["demo", "--workdir", str(tmp_path / "demo-out")]
    if not shipped:
        args += ["--model", str(make_threshold_model(tmp_path / "model", crop=(192, 192), threshold=1.5))]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "total (C-STORE start to SEG and SR received)" in out
    assert "job: inference" in out
    dice = float(out.split("(whole tumour): ")[1].split(";")[0])
    assert dice > (0.85 if shipped else 0.5)
    for name in ("seg.dcm", "sr.dcm", "preview.png"):
        assert (tmp_path / "demo-out" / name).stat().st_size > 0
