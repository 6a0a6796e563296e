"""A real PostgreSQL server for tests: ``SEGNODE_TEST_POSTGRES_URL``, or one started on loopback.

The started server is a throw-away cluster (``initdb`` + ``pg_ctl`` from the Debian package) in a
temp dir on a free port, its unix socket in the same dir, fsync off. As root, the PostgreSQL
programs run as the ``postgres`` user (``runuser -u postgres --``; initdb refuses root). Each test
gets its own database from :meth:`PostgresServer.new_database`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import make_url

from tests.helpers.peers import missing
from tests.helpers.ports import free_port

ENV_URL = "SEGNODE_TEST_POSTGRES_URL"


def _bin_dirs() -> list[str]:
    return sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)


@dataclass
class PostgresServer:
    """A reachable PostgreSQL server; ``admin_url`` is a psycopg URL of a database we may connect to."""

    admin_url: str

    def new_database(self, template: str | None = None) -> str:
        """Create a database with a unique name; its SQLAlchemy URL (postgresql+psycopg).

        Empty, or a copy of the database named ``template`` (which must have no open connections).
        """
        import psycopg

        name = f"segnode_test_{uuid.uuid4().hex[:12]}"
        admin = make_url(self.admin_url).set(drivername="postgresql")
        copy = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{copy}')
        return (
            make_url(self.admin_url)
            .set(drivername="postgresql+psycopg", database=name)
            .render_as_string(hide_password=False)
        )


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        missing("running as root but runuser is not installed (needed to run PostgreSQL as 'postgres')")
    return [str(runuser), "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """The server to test against: ``$SEGNODE_TEST_POSTGRES_URL``, or a fresh one stopped at the end.

    Skips (or fails under ``SEGNODE_REQUIRE_PEERS=1``) when psycopg or the PostgreSQL programs
    are missing.
    """
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install 'segnode[postgres]')")
    if os.environ.get(ENV_URL):
        yield PostgresServer(os.environ[ENV_URL])
        return
    dirs = _bin_dirs()
    if not dirs or not Path(dirs[0], "initdb").exists():
        missing("PostgreSQL server programs (initdb, pg_ctl) are not installed (Debian package postgresql)")
    bindir = Path(dirs[0])
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root and there is no 'postgres' user to run PostgreSQL as")
    base = Path(tempfile.mkdtemp(prefix="segnode-pg-"))
    if os.geteuid() == 0:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, log = base / "data", base / "server.log"
    port = free_port()
    started = False
    try:
        _run(
            _as_postgres(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            ),
            "initdb",
        )
        options = (
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        _run(
            _as_postgres(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            "pg_ctl start",
        )
        started = True
        yield PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run(
                    _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                    "pg_ctl stop",
                )
        shutil.rmtree(base, ignore_errors=True)
