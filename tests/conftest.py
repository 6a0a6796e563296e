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


# --- database fixtures (db engineer) ------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A real PostgreSQL server for the session (tests/postgres.py); skips when none can be had."""
    from tests.postgres import postgres_server as _server

    with _server() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database, once on SQLite (a file in tmp_path) and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'segnode.db'}"
    server = request.getfixturevalue("postgres_server")
    return str(server.new_database())
