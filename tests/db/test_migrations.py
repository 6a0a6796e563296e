"""Migrations on SQLite and real PostgreSQL: empty -> head, previous -> head, models == migrations."""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from db.exceptions import DatabaseUnavailableError
from db.models import Base, Model
from db.session import current_revision, display_url, downgrade, head_revision, make_engine, upgrade

REPO = Path(__file__).resolve().parents[2]
MODEL_TABLES = {"models", "model_files", "rollout_events"}


def _all_metadata() -> None:
    """Import every module that adds tables to Base.metadata (the node's too, when present)."""
    with contextlib.suppress(ImportError):
        import db.node_tables  # noqa: F401


def _row(task: str, version: str, status: str) -> dict[str, object]:
    return {
        "name": f"m-{task}",
        "version": version,
        "task": task,
        "modalities": ["FLAIR"],
        "kind": "ir",
        "precision": "fp32",
        "status": status,
        "created_at": dt.datetime.now(dt.UTC),
    }


def test_upgrade_empty_database_to_head(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) >= MODEL_TABLES
    finally:
        engine.dispose()
    upgrade(db_url)  # idempotent
    assert current_revision(db_url) == head_revision()


def test_upgrade_from_previous_revision_keeps_data(db_url: str) -> None:
    upgrade(db_url, "0001_model_table")
    assert current_revision(db_url) == "0001_model_table"
    engine = make_engine(db_url)
    try:
        assert "rollout_events" not in inspect(engine).get_table_names()
        with engine.begin() as conn:
            # at 0001 two active rows of one task are still possible; the upgrade must still succeed
            conn.execute(
                insert(Model.__table__),
                [_row("whole_tumor", "1", "active"), _row("brats_regions", "1", "active")],
            )
        upgrade(db_url)
        assert current_revision(db_url) == head_revision()
        with engine.connect() as conn:
            assert conn.execute(select(Model.version, Model.status).order_by(Model.id)).all() == [
                ("1", "active"),
                ("1", "active"),
            ]
        assert "rollout_events" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_upgrade_from_the_revision_before_head(db_url: str) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from db.session import ALEMBIC_INI, MIGRATIONS_DIR

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_revision(head_revision())
    assert head is not None and isinstance(head.down_revision, str)
    upgrade(db_url, head.down_revision)
    assert current_revision(db_url) == head.down_revision
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()


def test_downgrade_one_then_upgrade_again(db_url: str) -> None:
    upgrade(db_url)
    downgrade(db_url, "-1")
    assert current_revision(db_url) != head_revision()
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    engine = make_engine(db_url)
    try:
        assert not MODEL_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _fill_every_table(url: str) -> None:
    """One row in each table at head, linked as the node and the registry link them."""
    now = dt.datetime.now(dt.UTC)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            int8 = {**_row("whole_tumor", "1", "active"), "precision": "int8"}
            conn.execute(insert(Model.__table__), [_row("whole_tumor", "1", "candidate")])
            conn.execute(insert(Model.__table__), [int8])
            conn.execute(text("UPDATE models SET parent_id = 1 WHERE id = 2"))  # int8's parent: fp32
            for statement in (
                "INSERT INTO model_files (model_id, position, path, sha256, size) "
                "VALUES (2, 0, '/m', 'x', 1)",
                "INSERT INTO rollout_events (task, action, from_model_id, to_model_id, actor, at, reason, "
                "forced) VALUES ('whole_tumor', 'promote', 1, 2, 'a', :t, '', false)",
                "INSERT INTO node_instances (sop_instance_uid, sop_class_uid, study_instance_uid, kept, "
                "calling_ae, received_at) VALUES ('1.2.3', '1.2', '1.2.4', true, 'AE', :t)",
                "INSERT INTO node_studies (id, study_instance_uid, first_received_at, last_received_at, "
                "pending, runs) VALUES (1, '1.2.4', :t, :t, false, 1)",
                "INSERT INTO node_jobs (id, study_id, run, status, reason, stages, attempts, instance_count, "
                "model_id, result, created_at) VALUES (1, 1, 1, 'done', '', '{}', 1, 1, 2, '{}', :t)",
                "INSERT INTO node_sends (job_id, destination, ae_title, host, port, path, sop_instance_uid, "
                "status, attempts, next_attempt_at, last_error) "
                "VALUES (1, 'pacs', 'AE', 'h', 104, '/p', '1.2.5', 'pending', 0, :t, '')",
            ):
                conn.execute(text(statement), {"t": now})
    finally:
        engine.dispose()


def test_downgrade_step_by_step_with_rows_in_every_table(db_url: str) -> None:
    """With foreign keys on, SQLite refused to drop (or rebuild, to drop a column) a referenced table."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from db.session import ALEMBIC_INI, MIGRATIONS_DIR

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    chain = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]  # head first
    upgrade(db_url)
    _fill_every_table(db_url)
    for below in [*chain[1:], None]:
        downgrade(db_url, "-1")
        assert current_revision(db_url) == below
        engine = make_engine(db_url)
        try:
            with engine.connect() as conn:
                tables = set(inspect(conn).get_table_names())
                counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}
                if conn.dialect.name == "sqlite":
                    assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
        finally:
            engine.dispose()
        assert all(n == 1 or (t == "models" and n == 2) for t, n in counts.items() if t != "alembic_version")
    assert not MODEL_TABLES & tables
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()


def test_models_match_migrations(db_url: str) -> None:
    """Autogenerate finds no difference between the ORM models and the migrated schema."""
    _all_metadata()
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_one_active_model_per_task_is_enforced_by_the_database(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(Model.__table__),
                [
                    _row("whole_tumor", "1", "active"),
                    _row("whole_tumor", "2", "candidate"),
                    _row("whole_tumor", "3", "candidate"),
                    _row("brats_regions", "1", "active"),
                ],
            )
        with pytest.raises(IntegrityError, match=r"(?i)unique"), engine.begin() as conn:
            conn.execute(
                update(Model.__table__)
                .where(Model.version == "2", Model.task == "whole_tumor")
                .values(status="active")
            )
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(Model.__table__), [_row("whole_tumor", "4", "active")])
        with engine.begin() as conn:  # swapping inside one transaction is fine
            conn.execute(
                update(Model.__table__)
                .where(Model.version == "1", Model.task == "whole_tumor")
                .values(status="candidate")
            )
            conn.execute(
                update(Model.__table__)
                .where(Model.version == "2", Model.task == "whole_tumor")
                .values(status="active")
            )
        with engine.connect() as conn:
            active = conn.execute(
                select(Model.task, Model.version).where(Model.status == "active").order_by(Model.task)
            ).all()
        assert active == [("brats_regions", "1"), ("whole_tumor", "2")]
        with pytest.raises(IntegrityError), engine.begin() as conn:  # check constraint on status
            conn.execute(insert(Model.__table__), [_row("whole_tumor", "5", "bogus")])
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'dir' / 'segnode.db'}"
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()
    assert (tmp_path / "new" / "dir" / "segnode.db").is_file()


def test_alembic_command_line_upgrades_head(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    alembic = Path(sys.executable).parent / "alembic"
    proc = subprocess.run(
        [str(alembic), "-c", str(REPO / "db" / "alembic.ini"), "-x", f"url={url}", "upgrade", "head"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert current_revision(url) == head_revision()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nonsense", "is not a valid SQLAlchemy URL"),
        ("mysql://u@h/db", "backend 'mysql' is not supported"),
        ("sqlite:////proc/no-such-dir/x.db", "cannot create directory /proc/no-such-dir"),
    ],
)
def test_bad_database_url_is_a_clear_error(url: str, message: str) -> None:
    with pytest.raises(DatabaseUnavailableError, match=message):
        make_engine(url)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (" postgresql+psycopg://segnode:S3cretPW@127.0.0.1:1/segnode", "begins or ends with whitespace"),
        ("postgresql+psycopg://segnode:S3cretPW@db.example:54x2/segnode", "its port is not a number"),
    ],
)
def test_unparsable_database_url_is_not_echoed(url: str, problem: str) -> None:
    """The URL may hold a password: an invalid one is described, never repeated (nor a ValueError)."""
    for call in (make_engine, upgrade):
        with pytest.raises(DatabaseUnavailableError) as info:
            call(url)
        assert problem in str(info.value) and "S3cretPW" not in str(info.value)


def test_password_in_the_query_is_masked() -> None:
    url = "postgresql+psycopg://segnode@127.0.0.1:1/segnode?password=S3cretPW&sslmode=disable"
    assert display_url(url) == "postgresql+psycopg://segnode@127.0.0.1:1/segnode?password=***&sslmode=disable"
    with pytest.raises(DatabaseUnavailableError) as info:
        upgrade(url)
    assert "password=***" in str(info.value) and "S3cretPW" not in str(info.value)


def test_database_from_a_newer_version_is_a_clear_error(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    finally:
        engine.dispose()
    with pytest.raises(DatabaseUnavailableError) as info:
        upgrade(db_url)
    assert "Can't locate revision identified by '0099_from_the_future'" in str(info.value)
    assert "newer segnode" in str(info.value)
