"""``segnode db``: schema migrations of the configured database."""

from __future__ import annotations

from pathlib import Path

import typer

db_app = typer.Typer(
    name="db", help="The database: upgrade the schema, show its revision.", no_args_is_help=True
)

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Node config file (node.toml); default $SEGNODE_CONFIG."
)


def _url(config: Path | None) -> str:
    from db.url import resolve_database_url

    return resolve_database_url(config)


@db_app.command("upgrade")
def upgrade_cmd(
    revision: str = typer.Option("head", "--revision", help="Target Alembic revision."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Run the Alembic migrations up to the newest schema (idempotent)."""
    from db.session import current_revision, upgrade

    url = _url(config)
    before = current_revision(url)
    upgrade(url, revision)
    after = current_revision(url)
    if before == after:
        typer.echo(f"database already at revision {after}")
    else:
        typer.echo(f"database upgraded from {before or 'empty'} to {after}")


@db_app.command("current")
def current_cmd(config: Path | None = CONFIG_OPTION) -> None:
    """Print the database's revision and the newest one this code ships."""
    from db.session import current_revision, head_revision

    current = current_revision(_url(config))
    head = head_revision()
    note = "" if current == head else "  (run `segnode db upgrade`)"
    typer.echo(f"current: {current or 'empty'}  head: {head}{note}")


def register(app: typer.Typer) -> None:
    """Add ``segnode db ...`` to the root app."""
    app.add_typer(db_app, name="db")
