"""Engines, sessions and schema upgrades, built from a URL (see :mod:`db.url` for where it comes from).

SQLite (the default, a file under the var dir) runs in WAL mode with every commit synced
(``synchronous = FULL``), foreign keys on and a busy timeout; transactions are begun explicitly so
that a writer can ask for ``BEGIN IMMEDIATE`` (see :func:`write_options`) and two processes
serialise instead of failing half-way. PostgreSQL is reached through ``postgresql+psycopg://``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.exceptions import DatabaseUnavailableError
from db.url import url_problem

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"

#: Execution option read by the SQLite ``begin`` hook: "" (deferred) or "IMMEDIATE".
SQLITE_BEGIN_OPTION = "segnode_sqlite_begin"
_SQLITE_BEGIN_MODES = {"": "BEGIN", "DEFERRED": "BEGIN DEFERRED", "IMMEDIATE": "BEGIN IMMEDIATE"}
#: Seconds a SQLite connection waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0
#: SQLite's ``synchronous`` level. FULL syncs the write-ahead log at every commit. Under NORMAL a
#: commit survives a killed process but may roll back after a power loss or an OS crash, and the
#: node acknowledges a C-STORE once its row has committed (an fsynced spool file without its row is
#: never processed). benchmarks/ingest.py's ``node:walsync`` row sets NORMAL to measure the cost.
SQLITE_SYNCHRONOUS = "FULL"
#: Key of the PostgreSQL advisory lock that serialises concurrent schema upgrades.
PG_MIGRATION_LOCK = 0x5E6D0DE


def write_options() -> dict[str, Any]:
    """Execution options for a connection that will write: ``BEGIN IMMEDIATE`` on SQLite.

    Pass to ``Session.connection(execution_options=...)`` before the first statement. On SQLite the
    write lock is then taken at the start of the transaction, so a concurrent writer waits (busy
    timeout) and afterwards sees the committed state instead of failing on a stale snapshot. Other
    backends ignore the option.
    """
    return {SQLITE_BEGIN_OPTION: "IMMEDIATE"}


def _enable_wal(cursor: Any) -> None:
    """Switch the database to WAL mode, waiting out another connection that switches it at once.

    Changing the journal mode needs an exclusive lock and SQLite answers "database is locked" at once,
    without its busy handler, when two processes open a fresh database together (found by
    ``test_two_processes_upgrade_an_empty_database_at_once``). A database already in WAL is left alone.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, emit BEGIN (pysqlite's implicit BEGIN cannot be IMMEDIATE).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            _enable_wal(cursor)
            cursor.execute(f"PRAGMA synchronous = {SQLITE_SYNCHRONOUS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = str(conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "")).upper()
        conn.exec_driver_sql(_SQLITE_BEGIN_MODES.get(mode, "BEGIN"))


def make_engine(url: str) -> Engine:
    """An Engine for ``url``.

    Parameters
    ----------
    url
        SQLAlchemy URL: ``sqlite:///path/to/segnode.db`` (parent directory created) or
        ``postgresql+psycopg://user@host:port/db``. ``postgresql://`` is taken as psycopg 3.

    Raises
    ------
    DatabaseUnavailableError
        The URL cannot be parsed (the message does not repeat it) or names an unsupported backend.
    """
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = Path(database).expanduser().absolute().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseUnavailableError(
                    f"database url {_safe(url)!r}: cannot create directory {parent}: {exc.strerror}"
                ) from None
        engine = create_engine(parsed)
        _sqlite_hooks(engine)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            return create_engine(parsed, pool_pre_ping=True)
        except ModuleNotFoundError as exc:
            raise DatabaseUnavailableError(
                f"database url {_safe(url)!r} needs the PostgreSQL driver "
                f"({exc.name}); install segnode[postgres]"
            ) from None
    raise DatabaseUnavailableError(
        f"database url {_safe(url)!r}: backend {backend!r} is not supported "
        "(use sqlite:/// or postgresql+psycopg://)"
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A ``sessionmaker`` bound to ``engine`` (objects stay readable after commit)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def migration_connection(url: str) -> Iterator[Connection]:
    """A connection to ``url`` inside a transaction that holds the migration lock.

    SQLite: ``BEGIN IMMEDIATE`` (the database write lock); PostgreSQL: a transaction-level advisory
    lock. Used by :func:`upgrade` and by ``alembic`` on the command line (``db/migrations/env.py``).
    """
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execution_options(**write_options())
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
                yield conn
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations on ``url`` up to ``revision`` (default: head).

    Safe to call from several processes at once: the migration lock (see
    :func:`migration_connection`) makes a second caller wait and then find the schema at head.
    Everything runs in one transaction: a failed migration leaves the database as it was.

    Raises
    ------
    DatabaseUnavailableError
        The database cannot be reached.
    """
    from alembic import command
    from alembic.util.exc import CommandError

    try:
        with migration_connection(url) as conn:
            command.upgrade(_alembic_config(conn), revision)
    except OperationalError as exc:
        raise DatabaseUnavailableError(f"cannot upgrade database {_safe(url)}: {_first_line(exc)}") from None
    except CommandError as exc:
        raise DatabaseUnavailableError(
            f"cannot upgrade database {_safe(url)} to {revision}: {exc} "
            "(is the database from a newer segnode?)"
        ) from None
    log.info("database %s upgraded to %s", _safe(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Run the Alembic migrations on ``url`` down to ``revision`` (e.g. ``"-1"`` or ``"base"``)."""
    from alembic import command

    with migration_connection(url) as conn:
        command.downgrade(_alembic_config(conn), revision)


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise DatabaseUnavailableError(f"cannot read database {_safe(url)}: {_first_line(exc)}") from None
    finally:
        engine.dispose()


def existing_tables(url: str) -> set[str] | None:
    """The names of the tables in the database at ``url``; None when it is a SQLite file that is not there.

    Creates nothing: unlike :func:`make_engine` and :func:`upgrade`, a missing SQLite file (or its
    directory) is reported, not made. An in-memory SQLite database has no tables.

    Raises
    ------
    DatabaseUnavailableError
        The URL is invalid, or the database cannot be reached or read.
    """
    from sqlalchemy import inspect

    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or _sqlite_uri_in_memory(database, parsed.query):
            return set()
        if not _sqlite_file(database).expanduser().is_file():
            return None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    except OperationalError as exc:
        raise DatabaseUnavailableError(f"cannot read database {_safe(url)}: {_first_line(exc)}") from None
    finally:
        engine.dispose()


def _sqlite_uri_in_memory(database: str, query: Mapping[str, Any]) -> bool:
    """Whether a SQLite ``file:`` URI names an in-memory database (``file::memory:``, ``mode=memory``)."""
    return database.startswith("file:") and (
        database.startswith("file::memory:") or "mode=memory" in database or query.get("mode") == "memory"
    )


def _sqlite_file(database: str) -> Path:
    """The file a SQLite URL's database part names: a path, or a ``file:`` URI (``file:x.db``,
    ``file:/abs/x.db``, ``file:///abs/x.db``, ``file://localhost/abs/x.db``; its own query dropped and
    %-escapes decoded, as SQLite reads it)."""
    if not database.startswith("file:"):
        return Path(database)
    from urllib.parse import unquote

    path = database[len("file:") :].split("?", 1)[0].split("#", 1)[0]
    if path.startswith("//"):  # an authority: empty or localhost, then the absolute path
        authority, _, rest = path[2:].partition("/")
        path = "/" + rest if authority in ("", "localhost") else path
    return Path(unquote(path))


def display_url(url: str) -> str:
    """``url`` as it may be shown to a user: the password replaced by ``***``."""
    return _safe(url)


def head_revision() -> str:
    """The newest revision shipped in :data:`MIGRATIONS_DIR`."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _parse(url: str) -> URL:
    """``url`` parsed; DatabaseUnavailableError saying what is wrong, without the URL, when it does not."""
    problem = url_problem(url)
    if problem is not None:
        raise DatabaseUnavailableError(
            f"the database url is not a valid SQLAlchemy URL: {problem} "
            "(the value is not shown: it may hold a password)"
        )
    return make_url(url)


def _safe(url: str) -> str:
    """``url`` with its password, and any password in its query (``?password=``), shown as ``***``."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "<invalid url>"
    hidden = {key: "***" for key in parsed.query if "password" in key.lower()}  # libpq's sslpassword too
    if not hidden:
        return parsed.render_as_string(hide_password=True)
    # render_as_string would quote *** as %2A%2A%2A
    return parsed.update_query_dict(hidden).render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
