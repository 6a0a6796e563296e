"""The brain extractor as a model like any other: its own task in the model table, bootstrapped from the
shipped directory, verified and compiled by its runtime, refused when tampered, rolled back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from db.card import load_card
from db.registry import open_registry
from node.bootstrap import SHIPPED_BRAIN_EXTRACTOR_DIR, bootstrap_default_model
from node.runtime import BrainExtractorRuntime


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
    shutil.copytree(shipped, second)
    card = (second / "model.json").read_text().replace('"version": "1.0.2"', '"version": "1.0.2-b"')
    (second / "model.json").write_text(card)
    [info2] = registry.import_dir(second, by="test")
    registry.promote(info2.id, by="test", reason="test")
    with (second / "brain_fp32.bin").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    assert runtime.refresh_to(registry.active_ids(["brain_extraction"])["brain_extraction"]) is loaded
    assert "does not match the recorded" in runtime.last_error
    assert runtime.refresh() is loaded  # looked up by the runtime itself: the same answer
    back = registry.rollback("brain_extraction", by="test", reason="tampered")
    assert back.id == info.id and runtime.refresh() is loaded
