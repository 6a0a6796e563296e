"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest

if TYPE_CHECKING:
    from db.transactions import SessionFactory
    from tests.helpers.postgres import PostgresServer

# pytest-xdist's workers (make test) start with COLUMNS=80 and LINES in their environment. The CLIs'
# module-level Rich consoles read COLUMNS once, when they are made, so they would print 80 columns wide
# whatever COLUMNS a test sets later. Without them, as in a plain run, the consoles read it as they print.
for _terminal_size in ("COLUMNS", "LINES"):
    os.environ.pop(_terminal_size, None)


@pytest.fixture()
def strict_pydicom() -> Iterator[None]:
    """Strict validation: every value we write or read must be valid for its VR."""
    settings = pydicom.config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = saved


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


@pytest.fixture()
def sqlite_sf(tmp_path: Path) -> SessionFactory:
    """Sessions on a fresh, migrated SQLite database in ``tmp_path``."""
    from db.session import make_engine, make_session_factory, upgrade

    url = f"sqlite:///{tmp_path / 'segnode.db'}"
    upgrade(url)
    return make_session_factory(make_engine(url))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests/helpers/postgres.py); skips when none can be had."""
    from tests.helpers.postgres import postgres_server as _server

    with _server() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database, once on SQLite (a file in tmp_path) and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'segnode.db'}"
    server = request.getfixturevalue("postgres_server")
    return str(server.new_database())


def write_model_dir(
    directory: Path,
    *,
    name: str = "segnode-wt-flair",
    version: str = "1.0.0",
    task: str = "whole_tumor",
    modalities: tuple[str, ...] = ("FLAIR",),
    fp32_dice: float | None = 0.90,
    int8_dice: float | None = 0.895,
    cases: tuple[str, ...] = ("case_001", "case_002", "case_003"),
    int8_cases: tuple[str, ...] | None = None,
    seed: int = 0,
    calibration: dict[str, object] | None = None,
    fp32_regions: dict[str, float] | None = None,
    int8_regions: dict[str, float] | None = None,
) -> Path:
    """Write a model directory as the trainer exports it: model.json + ONNX + IR FP32 + IR INT8 files.

    The files hold real (random, seeded) bytes; ``model.json`` lists their sha256 and size, the
    lineage (INT8 IR -> FP32 IR -> ONNX) and per-artifact metrics (``None`` dice: no metrics).
    ``calibration`` adds to the card's calibration block; ``fp32_regions`` / ``int8_regions`` (region
    name -> Dice) give the FP32 / INT8 metrics ``regions``, as a ``brats_regions`` export has them
    (that task's card also gets its softmax output and labels).
    Returns ``directory``.
    """
    import hashlib
    import json

    import numpy as np

    from db.card import TASK_LABELS

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)

    def entry(path: str, data: bytes) -> dict[str, object]:
        (directory / path).write_bytes(data)
        return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def metrics(
        dice: float | None, on: tuple[str, ...], regions: dict[str, float] | None = None
    ) -> dict[str, object] | None:
        if dice is None:
            return None
        per_case = [{"case": c, "dice": dice, "jaccard": dice / (2 - dice)} for c in on]
        out: dict[str, object] = {
            "cases": list(on), "split": "validation", "per_case": per_case,
            "mean": {"dice": dice, "jaccard": dice / (2 - dice), "sensitivity": 0.9, "specificity": 0.99,
                     "hd95": 4.0}}
        if regions is not None:
            out["regions"] = {r: {"dice": d} for r, d in regions.items()}
        return out

    def xml(precision: str) -> bytes:
        return (f'<?xml version="1.0"?>\n<net name="{name}" version="11" precision="{precision}" '
                f'seed="{seed}">\n</net>\n').encode()

    artifacts = [
        {"key": "onnx", "kind": "onnx", "precision": "fp32", "parent": None,
         "files": [entry("model.onnx", rng.bytes(2048))], "metrics": metrics(fp32_dice, cases)},
        {"key": "ir_fp32", "kind": "ir", "precision": "fp32", "parent": "onnx",
         "files": [entry("model_fp32.xml", xml("FP32")), entry("model_fp32.bin", rng.bytes(4096))],
         "metrics": metrics(fp32_dice, cases, fp32_regions)},
        {"key": "ir_int8", "kind": "ir", "precision": "int8", "parent": "ir_fp32",
         "files": [entry("model_int8.xml", xml("INT8")), entry("model_int8.bin", rng.bytes(1024))],
         "metrics": metrics(int8_dice, int8_cases or cases, int8_regions)},
    ]
    card = {
        "format_version": 1, "name": name, "version": version, "task": task, "modalities": list(modalities),
        "preprocessing": {"orientation": "RAS", "spacing_mm": [1.0, 1.0, 1.0], "crop_size": [192, 192],
                          "normalization": "zscore_nonzero", "slice_axis": 2},
        "output": {"activation": "sigmoid", "threshold": 0.5},
        "labels": [{"value": 1, "name": "Whole tumour",
                    "category": {"scheme": "SCT", "code": "49755003",
                                 "meaning": "Morphologically abnormal structure"},
                    "type": {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"}}],
        **({"output": {"activation": "softmax"}, "labels": TASK_LABELS[task]}
           if task == "brats_regions" else {}),
        "artifacts": artifacts,
        "calibration": {"subset_size": 300, "preset": "performance", "source": "training split",
                        **(calibration or {})},
        "training": {"data_fingerprint": "0" * 64, "split": {"train": ["a"], "val": list(cases)}, "epochs": 2,
                     "device_kind": "cpu", "device_count": 1, "seed": seed, "commit": "test"},
    }
    (directory / "model.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def _migrated_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Per backend, a database already upgraded to head, made once and copied for each test."""
    return {}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def migrated_db_url(
    request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
    _migrated_templates: dict[str, str],
) -> str:
    """URL of a database at the newest schema (a fresh copy per test), on SQLite and on PostgreSQL."""
    import shutil

    from db.session import upgrade

    if request.param == "sqlite":
        if "sqlite" not in _migrated_templates:
            template = tmp_path_factory.mktemp("db-template") / "segnode.db"
            upgrade(f"sqlite:///{template}")
            _migrated_templates["sqlite"] = str(template)
        target = tmp_path / "db" / "segnode.db"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_templates["sqlite"], target)
        return f"sqlite:///{target}"
    # PostgreSQL: one migrated database per session, emptied before each test (much faster than
    # CREATE DATABASE + upgrade per test).
    server = request.getfixturevalue("postgres_server")
    if "postgresql" not in _migrated_templates:
        url = str(server.new_database())
        upgrade(url)
        _migrated_templates["postgresql"] = url
    url = _migrated_templates["postgresql"]
    from db.session import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "TRUNCATE models, model_files, rollout_events, node_sends, node_jobs, node_instances, "
                "node_studies RESTART IDENTITY CASCADE"
            )
    finally:
        engine.dispose()
    return url
