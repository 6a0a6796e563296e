"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture()
def segnode_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated SEGNODE_HOME (var dir) for one test."""
    home = tmp_path / "var"
    home.mkdir()
    monkeypatch.setenv("SEGNODE_HOME", str(home))
    for key in ("SEGNODE_CONFIG", "SEGNODE_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    yield home
