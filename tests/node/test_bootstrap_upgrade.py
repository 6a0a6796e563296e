"""The shipped model across an image upgrade (node/bootstrap.py): the model table lives in a volume,
the shipped model's files in the image, so a new image replaces the active row's files under it. The
node then promotes the version the image now ships, instead of refusing its only model as tampered;
an administrator's own model, or a folder that ships no other version, is left alone. Real model
files (OpenVINO IR) and a real SQLite model table."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from db.registry import ModelInfo, Registry, open_registry
from node.bootstrap import bootstrap_default_model
from node.runtime import ModelRuntime
from tests.helpers.node import install_model, make_threshold_model

TASK = "whole_tumor"


def _ship(shipped: Path, version: str, threshold: float) -> None:
    """The image's shipped folder now holds ``version`` (its files replaced in place)."""
    if shipped.exists():
        shutil.rmtree(shipped)
    make_threshold_model(shipped, version=version, threshold=threshold)


def _serving(registry: Registry) -> str | None:
    runtime = ModelRuntime(registry, TASK)
    loaded = runtime.refresh()
    return loaded.info.version if loaded is not None else None


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    return open_registry(f"sqlite:///{tmp_path / 'var' / 'segnode.db'}")


def _first_image(tmp_path: Path, registry: Registry) -> tuple[Path, ModelInfo]:
    """The image's shipped folder with 1.0.0, bootstrapped on a fresh model table."""
    shipped = tmp_path / "image" / "models" / "default"
    _ship(shipped, "1.0.0", 1.5)
    first = bootstrap_default_model(registry, TASK, shipped)
    assert first is not None
    return shipped, first


def test_an_image_upgrade_promotes_the_newly_shipped_version(
    tmp_path: Path, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    shipped, first = _first_image(tmp_path, registry)
    assert _serving(registry) == "1.0.0"
    assert bootstrap_default_model(registry, TASK, shipped) is None  # the same image again: nothing

    _ship(shipped, "1.1.0", 2.5)  # a new image
    assert not registry.verify(first.id).ok
    with caplog.at_level(logging.WARNING, logger="node.bootstrap"):
        upgraded = bootstrap_default_model(registry, TASK, shipped)
    assert upgraded is not None and upgraded.version == "1.1.0"
    assert registry.active_id(TASK) == upgraded.id and _serving(registry) == "1.1.0"
    assert "the image replaced the shipped model" in caplog.text


def test_an_administrators_own_model_is_never_replaced(tmp_path: Path, registry: Registry) -> None:
    shipped, _ = _first_image(tmp_path, registry)
    own = install_model(registry, make_threshold_model(tmp_path / "site-model", version="7.0.0"))
    _ship(shipped, "1.1.0", 2.5)
    assert bootstrap_default_model(registry, TASK, shipped) is None
    assert registry.active_id(TASK) == own.id and _serving(registry) == "7.0.0"


def test_replaced_files_of_the_same_version_are_reported_not_promoted(
    tmp_path: Path, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    shipped, first = _first_image(tmp_path, registry)
    _ship(shipped, "1.0.0", 2.5)  # other files under the same version: nothing to promote
    with caplog.at_level(logging.ERROR, logger="node.bootstrap"):
        assert bootstrap_default_model(registry, TASK, shipped) is None
    assert registry.active_id(TASK) == first.id
    assert "no longer match the model table" in caplog.text
