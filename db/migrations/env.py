"""Alembic environment for segnode.

Used two ways: programmatically by :func:`db.session.upgrade` (the connection arrives in
``config.attributes["connection"]``, already inside a transaction), and from the ``alembic`` command
line (``alembic -c db/alembic.ini -x url=... upgrade head``; without ``-x url`` the node config
decides the URL).
"""

from __future__ import annotations

import contextlib
import logging.config
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from db.models import Base

with contextlib.suppress(ImportError):  # the node's tables (instances, studies, jobs, sends)
    import db.node_tables  # noqa: F401

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return str(url)
    from db.url import resolve_database_url

    return resolve_database_url()


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``)."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live connection."""
    given: Any = config.attributes.get("connection")
    if given is not None:
        _configure(given)
        with context.begin_transaction():
            context.run_migrations()
        return
    if config.config_file_name is not None:
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)
    from db.session import migration_connection

    with migration_connection(_url()) as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
