"""Where the database is: the one place that turns environment and config file into a URL.

Order, first match wins:

1. ``SEGNODE_DATABASE_URL`` in the environment;
2. ``[database] url`` in the config file (``--config``, else ``$SEGNODE_CONFIG``);
3. a SQLite file ``segnode.db`` in the var dir (``$SEGNODE_HOME``, default ``./var``).

Commands resolve the URL once and hand it down; nothing below them looks it up again. A URL that
SQLAlchemy cannot parse is refused here, naming where it came from but never repeating it (it may hold
a password).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from db.exceptions import DatabaseConfigError


def var_dir(env: Mapping[str, str] | None = None) -> Path:
    """The var dir (database, spool, logs, models): ``$SEGNODE_HOME`` or ``./var``, absolute."""
    env = os.environ if env is None else env
    return Path(env.get("SEGNODE_HOME", "var")).absolute()


def default_url(env: Mapping[str, str] | None = None) -> str:
    """The URL used when neither the environment nor the config file names one."""
    return f"sqlite:///{var_dir(env) / 'segnode.db'}"


def url_in_config_file(path: Path) -> str:
    """``[database] url`` of a config file, or "" when the file has none.

    Raises
    ------
    DatabaseConfigError
        The file is missing, unreadable, not UTF-8 TOML, or its ``[database] url`` is not a string.
    """
    if not path.is_file():
        raise DatabaseConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DatabaseConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DatabaseConfigError(f"{path}: not UTF-8 text (TOML is UTF-8): {exc}") from None
    except OSError as exc:
        raise DatabaseConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    section = raw.get("database", {})
    if not isinstance(section, dict):
        raise DatabaseConfigError(f"{path}: [database] must be a table")
    url = section.get("url", "")
    if not isinstance(url, str):
        raise DatabaseConfigError(f"{path}: database.url must be a string, not {type(url).__name__}")
    return url


#: The shape of a database URL, for messages about one that does not parse.
URL_FORM = "dialect+driver://user:password@host:port/database"


def url_problem(url: str) -> str | None:
    """What makes ``url`` unparsable as a SQLAlchemy URL, or None when it parses.

    The answer never quotes the URL, which may hold a password.
    """
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ValueError:  # SQLAlchemy's int() of the port
        return "its port is not a number"
    except ArgumentError:
        if url != url.strip():
            return "it begins or ends with whitespace"
        if "://" not in url:
            return f"it has no '://' (expected {URL_FORM})"
        return f"it is not of the form {URL_FORM}"
    return None


def _checked(url: str, source: str) -> str:
    problem = url_problem(url)
    if problem is not None:
        raise DatabaseConfigError(
            f"{source} is not a valid database URL: {problem} "
            "(the value is not shown: it may hold a password)"
        )
    return url


def resolve_database_url(
    config_file: Path | str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The database URL for a command, from the environment, the config file and the var dir.

    Raises
    ------
    DatabaseConfigError
        The config file cannot be read, or the URL found does not parse (the message names
        ``$SEGNODE_DATABASE_URL`` or the file's ``[database] url``, not the URL).
    """
    env = os.environ if env is None else env
    if env.get("SEGNODE_DATABASE_URL"):
        return _checked(env["SEGNODE_DATABASE_URL"], "$SEGNODE_DATABASE_URL")
    if config_file is None and env.get("SEGNODE_CONFIG"):
        config_file = env["SEGNODE_CONFIG"]
    if config_file is not None:
        url = url_in_config_file(Path(config_file))
        if url:
            return _checked(url, f"{config_file}: [database] url")
    return default_url(env)


def url_origin(config_file: Path | str | None = None, env: Mapping[str, str] | None = None) -> str:
    """How :func:`resolve_database_url` found its URL, in words, for a message about that database.

    The var dir (``$SEGNODE_HOME``, default ``./var``) and a relative SQLite path resolve against the
    current directory, so the answer names it where it matters. Call it after
    :func:`resolve_database_url` succeeded on the same arguments (a bad config file raises here too).
    """
    env = os.environ if env is None else env
    if env.get("SEGNODE_DATABASE_URL"):
        return "from $SEGNODE_DATABASE_URL"
    named = "--config"
    if config_file is None and env.get("SEGNODE_CONFIG"):
        config_file, named = env["SEGNODE_CONFIG"], "$SEGNODE_CONFIG"
    cwd = Path.cwd()
    if config_file is not None and url_in_config_file(Path(config_file)):
        return (
            f"[database] url of {config_file} ({named}); a relative SQLite path resolves against the "
            f"current directory, {cwd}"
        )
    home = "$SEGNODE_HOME" if env.get("SEGNODE_HOME") else f"./var of the current directory, {cwd}"
    if config_file is not None:
        return f"{config_file} ({named}) has no [database] url: the default, segnode.db in {home}"
    return f"no --config, $SEGNODE_CONFIG or $SEGNODE_DATABASE_URL: the default, segnode.db in {home}"
