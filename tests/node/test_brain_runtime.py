"""The brain extractor as a model like any other: its own task in the model table, bootstrapped from the
shipped directory, verified and compiled by its runtime, refused when tampered, rolled back."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from db.card import load_card
from db.registry import open_registry
from node.bootstrap import SHIPPED_BRAIN_EXTRACTOR_DIR, bootstrap_default_model
from node.runtime import BrainExtractorRuntime


def _promote_second_version(registry: Any, source: Path, copy: Path) -> Any:
    """A copy of the brain extractor at ``source`` as version 1.0.2-b, imported and promoted."""
    shutil.copytree(source, copy)
    card = (copy / "model.json").read_text().replace('"version": "1.0.2"', '"version": "1.0.2-b"')
    (copy / "model.json").write_text(card)
    [info] = registry.import_dir(copy, by="test")
    registry.promote(info.id, by="test", reason="test")
    return info


def test_shipped_card_is_a_checked_brain_extractor() -> None:
    card = load_card(SHIPPED_BRAIN_EXTRACTOR_DIR)
    assert card["task"] == "brain_extraction"
    metrics = card["artifacts"][0]["metrics"]
    assert metrics["cases"] and metrics["mean"]["dice"] >= 0.99
    assert metrics["mean"]["min_tumour_inside"] >= 0.995
    notice = (SHIPPED_BRAIN_EXTRACTOR_DIR / "NOTICE").read_text()
    assert "MIT License" in notice and "deepbet" in notice and card["source"]["wheel_sha256"] in notice
    for network in card["source"]["networks"].values():
        assert network["sha256"] in notice


def test_bootstrap_runtime_swap_and_tamper(tmp_path: Path) -> None:
    registry = open_registry(f"sqlite:///{tmp_path / 'segnode.db'}")
    shipped = tmp_path / "shipped"
    shutil.copytree(SHIPPED_BRAIN_EXTRACTOR_DIR, shipped)
    runtime = BrainExtractorRuntime(registry, threads=2)
    assert runtime.refresh() is None and "no active model for task 'brain_extraction'" in runtime.last_error

    info = bootstrap_default_model(registry, "brain_extraction", shipped)
    assert info is not None and info.task == "brain_extraction" and info.status == "active"
    assert bootstrap_default_model(registry, "brain_extraction", shipped) is None  # already active: no-op
    assert registry.active("whole_tumor") is None  # the segmentation task is untouched
    assert registry.verify(info.id).ok

    loaded = runtime.refresh()
    assert loaded is not None and loaded.info.id == info.id
    with pytest.raises(Exception, match="uniform"):
        loaded.extractor.extract(np.zeros((32, 32, 32), np.float32), np.eye(4))

    # A second version, tampered after registration: refused, the first keeps serving; rollback works.
    second = tmp_path / "second"
    _promote_second_version(registry, shipped, second)
    with (second / "brain_fp32.bin").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    assert runtime.refresh_to(registry.active_ids(["brain_extraction"])["brain_extraction"]) is loaded
    assert "does not match the recorded" in runtime.last_error
    assert runtime.refresh() is loaded  # looked up by the runtime itself: the same answer
    back = registry.rollback("brain_extraction", by="test", reason="tampered")
    assert back.id == info.id and runtime.refresh() is loaded


def test_a_refused_brain_extractor_holds_studies_queued_until_one_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its weights corrupted on disk: the node must not segment without a brain mask and send that
    as a result (no brain-only normalisation, no removal of tumour outside the brain). The study waits
    queued, /healthz says why, and it is analysed once a sound extractor is promoted; `jobs show` names
    the extractor that ran."""
    from converters.dicom_writer import write_study
    from converters.synthetic import make_synthetic_case
    from db import job_queue
    from node.config import Destination
    from node.sender import store_files
    from node.service import NodeService
    from tests.helpers.node import CatchingSCP, install_model, make_threshold_model, node_settings
    from tests.helpers.ports import free_port
    from tests.helpers.waiting import wait_until

    shape = (48, 48, 12)
    case = make_synthetic_case(7, shape)
    catcher = CatchingSCP().start(free_port())
    settings = node_settings(
        tmp_path, free_port(), [Destination("pacs", "CATCHER", "127.0.0.1", catcher.port)]
    )
    registry = open_registry(settings.database.url)
    install_model(registry, make_threshold_model(tmp_path / "model", crop=shape[:2], spacing=case.spacing))
    broken = tmp_path / "broken"
    shutil.copytree(SHIPPED_BRAIN_EXTRACTOR_DIR, broken)
    assert bootstrap_default_model(registry, "brain_extraction", broken) is not None
    with (broken / "brain_fp32.bin").open("r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xff" * 16)
    node = NodeService(settings)
    node.start()
    try:
        study = write_study(case, tmp_path / "study", modalities=["FLAIR"])
        results = store_files(
            [p for fs in study.files.values() for p in fs], "127.0.0.1", node.scp.port, "SEGNODE", "PACS"
        )
        assert {status for _, status, _ in results} == {0}
        wait_until(lambda: job_queue.job_counts(node.sf).get("queued") == 1, 30, "the study queued")
        time.sleep(1.0)  # 20 polls of the worker: it claims nothing
        counts = job_queue.job_counts(node.sf)
        assert counts["queued"] == 1 and sum(counts.values()) == 1
        _, health = node.health()
        assert health["brain_extractor"] is None
        assert "does not match the recorded" in health["brain_extractor_error"]
        assert catcher.received == []

        _promote_second_version(registry, SHIPPED_BRAIN_EXTRACTOR_DIR, tmp_path / "sound")
        job = wait_until(
            lambda: next(
                (j for j in job_queue.list_jobs(node.sf) if j.status not in ("queued", "running")), None
            ),
            120,
            "the study analysed",
        )
        assert job.status in ("done", "review") and job.result["brain_extractor"]
    finally:
        node.stop()
        catcher.stop()
    from tests.helpers.cli import run_cli

    assert job.result["brain_extractor"].startswith("deepbet 1.0.2-b ")  # the sound one, not the broken
    monkeypatch.setenv("SEGNODE_DATABASE_URL", settings.database.url)
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(["jobs", "show", str(job.id)], capsys, monkeypatch)
    assert code == 0
    [row] = [line for line in out.splitlines() if "brain extractor" in line]
    assert job.result["brain_extractor"] in row, out


def test_networks_outside_the_verified_files_are_not_compiled(tmp_path: Path) -> None:
    """The card's ``networks`` naming a file that is not among the model's registered (sha256-checked)
    files, as a model imported before import checked it may: refused at load, never compiled."""
    import dataclasses
    import json

    from node.exceptions import ModelLoadError
    from tests.helpers.node import install_model

    registry = open_registry(f"sqlite:///{tmp_path / 'segnode.db'}")
    shipped = tmp_path / "bx"
    shutil.copytree(SHIPPED_BRAIN_EXTRACTOR_DIR, shipped)
    info = install_model(registry, shipped)
    for ext in ("xml", "bin"):  # a changed copy beside the registered files
        shutil.copy(shipped / f"brain_fp32.{ext}", shipped / f"brain_v2.{ext}")
    with (shipped / "brain_v2.bin").open("r+b") as fh:
        fh.seek(100000)
        fh.write(b"\x7f" * 64)
    card = json.loads(json.dumps(info.card))
    card["networks"]["fp32"]["brain"] = "brain_v2.xml"
    assert registry.verify(info.id).ok  # the registered files are intact
    runtime = BrainExtractorRuntime(registry, threads=2)
    with pytest.raises(ModelLoadError) as refused:
        runtime.load(dataclasses.replace(info, card=card))
    message = str(refused.value)
    assert f"networks.fp32.brain names {shipped.resolve() / 'brain_v2.xml'}" in message
    assert "is not among the model's registered files" in message
