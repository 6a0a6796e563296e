"""The receive path's speed levers over real sockets: the prompt association loop (node.reactor)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from sqlalchemy import select

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db.node_tables import NodeInstance
from db.session import make_engine, make_session_factory, upgrade
from db.transactions import SessionFactory
from node import reactor
from node.metrics import NodeMetrics
from node.scp import StorageSCP
from tests.helpers.dcmtk import storescu
from tests.helpers.node import node_settings
from tests.helpers.ports import free_port


@pytest.fixture(scope="module")
def mr_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    study = write_study(
        make_synthetic_case(5, (32, 32, 12)), tmp_path_factory.mktemp("study"), modalities=["FLAIR", "T1"]
    )
    return study.files["FLAIR"] + study.files["T1"]


@pytest.fixture()
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    settings = node_settings(tmp_path, free_port())
    upgrade(settings.database.url)
    sf = make_session_factory(make_engine(settings.database.url))
    running = StorageSCP(settings.node, sf, NodeMetrics())
    running.start()
    yield running
    running.stop()


def _rows(sf: SessionFactory) -> list[NodeInstance]:
    with sf() as s:
        return list(s.scalars(select(NodeInstance).order_by(NodeInstance.id)))


def test_prompt_loop_follows_the_installed_pynetdicom() -> None:
    # node.reactor copies pynetdicom's acceptor loop; an upgrade must re-read it.
    assert pynetdicom.__version__ == reactor.PYNETDICOM_VERSION


def test_associations_run_the_prompt_loop(
    scp: StorageSCP, mr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    turns: list[int] = []
    original = reactor._prompt_reactor

    def counting(self: Any) -> None:
        turns.append(1)
        original(self)

    monkeypatch.setattr(reactor, "_prompt_reactor", counting)
    proc = storescu(scp.port, mr_files)
    assert proc.returncode == 0, proc.stderr
    assert turns == [1]  # the one association was served by the prompt loop, and released normally
    rows = _rows(scp.sf)
    assert len(rows) == len(mr_files)
    assert {pydicom.dcmread(r.path or "").SOPInstanceUID for r in rows} == {
        pydicom.dcmread(f).SOPInstanceUID for f in mr_files
    }
