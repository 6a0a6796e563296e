"""A real PostgreSQL server for tests: ``SEGNODE_TEST_POSTGRES_URL``, or a cluster of our own on loopback.

Our own cluster (:class:`PostgresCluster`) is a throw-away one (``initdb`` + ``pg_ctl`` from the Debian
package) in a temp dir on a free port, its unix socket in the same dir, fsync off; a test may stop and
start it. As root, the PostgreSQL programs run as the ``postgres`` user (``runuser -u postgres --``;
initdb refuses root). Each test gets its own database from :meth:`PostgresServer.new_database`.
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
from pathlib import Path

from sqlalchemy import make_url

from tests.helpers.peers import missing
from tests.helpers.ports import free_port

ENV_URL = "SEGNODE_TEST_POSTGRES_URL"


class PostgresServer:
    """A reachable PostgreSQL server; ``admin_url`` is a psycopg URL of a database we may connect to."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

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


def _require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install 'segnode[postgres]')")


def _server_bindir() -> Path:
    """The newest PostgreSQL server's bin dir, or skip/fail (also when root has no user to run it as)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if not dirs or not Path(dirs[0], "initdb").exists():
        missing("PostgreSQL server programs (initdb, pg_ctl) are not installed (Debian package postgresql)")
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            missing("running as root but runuser is not installed (needed to run PostgreSQL as 'postgres')")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root and there is no 'postgres' user to run PostgreSQL as")
    return Path(dirs[0])


class PostgresCluster(PostgresServer):
    """A throw-away PostgreSQL cluster of our own, started; a test may :meth:`stop` and :meth:`start` it.

    Skips (or fails under ``SEGNODE_REQUIRE_PEERS=1``) when psycopg or the PostgreSQL programs are
    missing. :meth:`remove` stops it and deletes its files.
    """

    def __init__(self) -> None:
        _require_psycopg()
        self.bindir = _server_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="segnode-pg-"))
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self.data, self.port = self.base / "data", free_port()
        super().__init__(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres")
        try:
            self._pg(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            )
            self.start()
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def _pg(self, program: str, *args: str) -> None:
        cmd = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
            )

    def start(self) -> None:
        """Start the server (again) on the same port."""
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        log = str(self.base / "server.log")
        self._pg("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        """Stop the server at once (connections are cut)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        """Stop (if running) and delete the cluster."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """The server to test against: ``$SEGNODE_TEST_POSTGRES_URL``, or a cluster of our own removed at
    the end.

    Skips (or fails under ``SEGNODE_REQUIRE_PEERS=1``) when psycopg or the PostgreSQL programs
    are missing.
    """
    _require_psycopg()
    if os.environ.get(ENV_URL):
        yield PostgresServer(os.environ[ENV_URL])
        return
    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.remove()
