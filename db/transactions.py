"""What the node's database modules (:mod:`db.instances`, :mod:`db.job_queue`, :mod:`db.send_queue`)
share: the process's write lock, UTC times, and the translation of SQLAlchemy's errors.

Every function of those modules opens its own short transaction through a ``sessionmaker`` so callers
never hold ORM objects; results come back as plain dataclasses. Their callers (the node) never see a
SQLAlchemy exception: :func:`database_errors` turns the driver's errors into
:class:`~db.exceptions.DatabaseUnavailableError` and SQLAlchemy's own into
:class:`~db.exceptions.DatabaseOperationError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.exceptions import DatabaseOperationError, DatabaseUnavailableError
from db.session import write_options

SessionFactory = sessionmaker[Session]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` as aware UTC (SQLite returns naive datetimes that were stored as UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: One write transaction at a time in this process. Threads (SCP associations, the scheduler's
#: touch of studies being received, workers, the sender) queue here instead of in SQLite's busy
#: handler, whose back-off sleeps (1, 2, 5, 10 ... ms) held C-STOREs up behind the scheduler's
#: 20-per-second touches and made four associations slower than one. Reentrant: harmless if a
#: caller nests. Other processes still queue in the database itself.
_WRITE_LOCK = threading.RLock()


#: Per SQLite database file, this process's descriptor of its ``-writer.lock`` file (opened once).
_LOCK_FILES: dict[str, int] = {}


@contextmanager
def _sqlite_writer_lock(sf: SessionFactory) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the SQLite database's ``-writer.lock`` file (other backends: no-op).

    Node processes that share one SQLite file (``[node] receivers``) queue here rather than in
    SQLite's busy handler, whose back-off sleeps (1, 2, 5, 10 ... ms) would stall their C-STOREs; the
    kernel wakes the next waiter as soon as the lock is released. Called with ``_WRITE_LOCK`` held, so
    the one descriptor per database is never used by two threads at once.
    """
    bind = sf.kw.get("bind")
    url = getattr(bind, "url", None)
    database = url.database if url is not None and url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    fd = _LOCK_FILES.get(database)
    if fd is None:
        fd = _LOCK_FILES[database] = os.open(f"{database}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def writing(sf: SessionFactory) -> Iterator[Session]:
    """A write transaction (``BEGIN IMMEDIATE`` on SQLite, so concurrent writers queue)."""
    with _WRITE_LOCK, _sqlite_writer_lock(sf), sf.begin() as s:
        s.connection(execution_options=write_options())
        yield s


@dataclass(frozen=True)
class DriverDialect:
    """What a statement written for the driver (DB-API) needs to know of the database.

    Attributes
    ----------
    placeholder:
        The driver's positional parameter marker: ``?`` (sqlite3) or ``%s`` (psycopg).
    error, integrity_error:
        The driver's base error class and its constraint-violation class.
    """

    placeholder: str
    error: type[Exception]
    integrity_error: type[Exception]


def driver_dialect(sf: SessionFactory) -> DriverDialect:
    """The :class:`DriverDialect` of the database behind ``sf`` (SQLite or PostgreSQL)."""
    dialect = sf.kw["bind"].dialect
    placeholder = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
    if placeholder is None:  # pragma: no cover - make_engine builds SQLite and psycopg engines only
        raise DatabaseOperationError(f"driver paramstyle {dialect.paramstyle!r} is not supported")
    dbapi = dialect.loaded_dbapi
    return DriverDialect(placeholder, dbapi.Error, dbapi.IntegrityError)


def bind_value(sf: SessionFactory, column: Any) -> Callable[[Any], Any]:
    """How ``column``'s SQLAlchemy type turns a Python value into the driver's (e.g. a datetime into
    SQLite's text form), for statements written for the driver."""
    dialect = sf.kw["bind"].dialect
    processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    return processor if processor is not None else (lambda value: value)


@contextmanager
def driver_writing(sf: SessionFactory) -> Iterator[Any]:
    """A write transaction on the driver's own connection: yields a DB-API cursor.

    For the one statement sequence that runs per received instance (:func:`db.instances.record_instances`),
    where SQLAlchemy's session and execution machinery cost more CPU than the statements themselves.
    The same locks as :func:`writing`; ``BEGIN IMMEDIATE`` on SQLite. Committed when the block ends,
    rolled back if it raises; driver errors come out as the driver raised them (the caller translates
    them, see :class:`DriverDialect`).
    """
    engine = sf.kw["bind"]
    with _WRITE_LOCK, _sqlite_writer_lock(sf):
        try:
            connection = engine.raw_connection()
        except DBAPIError as exc:
            raise DatabaseUnavailableError(describe(exc)) from exc
        try:
            cursor = connection.cursor()
            if engine.dialect.name == "sqlite":  # autocommit at the driver (db.session): begin ourselves
                cursor.execute("BEGIN IMMEDIATE")
            yield cursor
            connection.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # a lost connection cannot roll back; the error says why
                connection.rollback()
            raise
        finally:
            connection.close()  # back to the pool


def describe_driver_error(exc: BaseException) -> str:
    """``Type: first line`` of a driver (DB-API) error, as :func:`describe` writes SQLAlchemy's."""
    reason = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {reason}"


def describe(exc: SQLAlchemyError) -> str:
    """``Type: first line`` of the error, naming the driver's exception when there is one
    (``OperationalError: connection failed: ...``)."""
    cause: BaseException = (exc.orig or exc) if isinstance(exc, DBAPIError) else exc
    return describe_driver_error(cause)


def database_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a database function so that it raises :mod:`db.exceptions`, never SQLAlchemy's.

    A driver error (:class:`~sqlalchemy.exc.DBAPIError`: database unreachable, connection lost,
    locked) becomes :class:`~db.exceptions.DatabaseUnavailableError`; any other SQLAlchemy error
    :class:`~db.exceptions.DatabaseOperationError`. The message is :func:`describe`'s one line; the
    original stays attached as ``__cause__``.
    """

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except DBAPIError as exc:
            raise DatabaseUnavailableError(describe(exc)) from exc
        except SQLAlchemyError as exc:
            raise DatabaseOperationError(describe(exc)) from exc

    return wrapper
