"""``segnode models`` and ``segnode db`` through the real CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from db.session import current_revision, head_revision, make_engine
from node.cli import app, main
from tests.conftest import write_model_dir

runner = CliRunner()


@pytest.fixture()
def url(migrated_db_url: str, segnode_home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SEGNODE_DATABASE_URL", migrated_db_url)
    monkeypatch.setenv("COLUMNS", "200")  # tables not cut by the terminal's width
    return migrated_db_url


def ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the real entry point (main) and return its one-line error; it must exit 2 without traceback."""
    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["segnode", *args]
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    assert info.value.code == 2, captured
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_import_list_show_promote_history(url: str, tmp_path: Path) -> None:
    directory = write_model_dir(tmp_path / "m")
    out = ok("models", "import", str(directory), "--by", "alice")
    assert "Imported from" in out and "candidate" in out
    listed = json.loads(ok("models", "list", "--json"))
    assert [(m["id"], m["kind"], m["precision"], m["status"]) for m in listed] == [
        (1, "onnx", "fp32", "candidate"),
        (2, "ir", "fp32", "candidate"),
        (3, "ir", "int8", "candidate"),
    ]
    assert {"id", "name", "version", "task", "kind", "precision", "status", "metrics"} <= set(listed[0])
    assert listed[2]["metrics"]["mean"]["dice"] == pytest.approx(0.895)
    table = ok("models", "list")
    for needle in ("ID", "Name", "Version", "Precision", "Status", "Dice", "Size", "Created", "0.8950"):
        assert needle in table
    out = ok("models", "promote", "3", "--by", "bob", "--reason", "validated on site")
    assert "model #3" in out and "is now active for task whole_tumor" in out
    shown = json.loads(ok("models", "show", "3", "--json"))
    assert (shown["status"], shown["parent_id"], shown["task"]) == ("active", 2, "whole_tumor")
    assert shown["files"][0]["path"] == str((directory / "model_int8.xml").resolve())
    human = ok("models", "show", "3")
    assert "lineage: #3 <- #2 ir/fp32 <- #1 onnx/fp32" in human
    assert "INT8 overflow fix: not recorded" in human
    history = json.loads(ok("models", "history", "--json"))
    assert [(e["action"], e["to_model_id"], e["by"]) for e in history] == [
        ("register", 1, "alice"),
        ("register", 2, "alice"),
        ("register", 3, "alice"),
        ("promote", 3, "bob"),
    ]
    assert history[-1]["reason"] == "validated on site"
    assert "promote" in ok("models", "history", "--task", "whole_tumor")
    assert json.loads(ok("models", "list", "--json", "--task", "brats_regions")) == []


def test_import_promote_rollback_retire_verify(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok("models", "import", str(write_model_dir(tmp_path / "v1", version="1")), "--promote")
    ok("models", "import", str(write_model_dir(tmp_path / "v2", version="2", seed=2)), "--promote")
    active = [m for m in json.loads(ok("models", "list", "--json")) if m["status"] == "active"]
    assert [(m["id"], m["version"], m["precision"]) for m in active] == [(6, "2", "int8")]
    assert "model #3" in ok("models", "rollback", "--task", "whole_tumor", "--reason", "v2 worse")
    assert json.loads(ok("models", "show", "6", "--json"))["status"] == "candidate"
    assert "model #6 retired" in ok("models", "retire", "6", "--reason", "superseded")
    verify = json.loads(ok("models", "verify", "3", "--json"))
    assert verify["ok"] is True and [f["status"] for f in verify["files"]] == ["ok", "ok"]
    (tmp_path / "v1" / "model_int8.bin").write_bytes(b"tampered")
    line = fails(capsys, "models", "verify", "3")
    assert line.startswith("error: model #3: ") and "model_int8.bin: size 8 != recorded 1024" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["models", "promote", "99"], "error: model #99 does not exist (see `segnode models list`)"),
        (["models", "retire", "99"], "error: model #99 does not exist"),
        (["models", "verify", "99"], "error: model #99 does not exist"),
        (["models", "show", "99"], "error: model #99 does not exist"),
        (["models", "promote", "2"], "error: model #2 is retired and cannot be promoted"),
        (["models", "verify", "2"], "error: model #2 is retired"),
        (["models", "retire", "2"], "error: model #2 is already retired"),
        (
            ["models", "rollback", "--task", "whole_tumor"],
            "error: task 'whole_tumor': no previous active model",
        ),
        (
            ["models", "rollback", "--task", "brats_regions"],
            "error: task 'brats_regions' has no active model",
        ),
        (["models", "rollback"], "error: task 'whole_tumor': no previous active model"),
        (["models", "promote", "1"], "error: model #1 not promoted: kind 'onnx' cannot be active"),
        (["models", "promote", "3", "--force"], "error: model #3: --force needs a non-empty --reason"),
        (["models", "retire", "3"], "error: model #3 is the active model of task whole_tumor"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    ok("models", "import", str(write_model_dir(tmp_path / "m")))
    ok("models", "retire", "2")
    ok("models", "promote", "3")
    assert fails(capsys, *args).startswith(message)


@pytest.mark.parametrize("command", ["show", "promote", "retire", "verify"])
def test_an_id_beyond_the_database_integer_is_not_found(
    url: str, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    line = fails(capsys, "models", command, "3000000000")
    assert line == "error: model #3000000000 does not exist (see `segnode models list`)"


def test_too_long_name_or_by_is_refused_before_the_database(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = write_model_dir(tmp_path / "long", name="n" * 250)
    line = fails(capsys, "models", "import", str(directory))
    card = directory.resolve() / "model.json"
    assert line == f"error: {card}: name: 'nnnnnnnnnnnnnnnnnnnn'... is 250 characters long; at most 200"
    line = fails(capsys, "models", "import", str(write_model_dir(tmp_path / "m")), "--by", "x" * 250)
    assert line == "error: --by 'xxxxxxxxxxxxxxxxxxxx'... is 250 characters long; at most 200"
    assert json.loads(ok("models", "list", "--json")) == []


def test_times_are_shown_in_utc_whatever_the_servers_time_zone(url: str, tmp_path: Path) -> None:
    """Debian's initdb gives PostgreSQL the host's time zone; "When (UTC)" and "Created" must still be UTC."""
    if url.startswith("postgresql"):
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                    f"ALTER DATABASE \"{engine.url.database}\" SET timezone TO 'Pacific/Kiritimati'"  # UTC+14
                )
        finally:
            engine.dispose()
    before = dt.datetime.now(dt.UTC)
    ok("models", "import", str(write_model_dir(tmp_path / "m")))
    event = json.loads(ok("models", "history", "--json"))[0]
    at = dt.datetime.fromisoformat(event["at"])
    assert at.utcoffset() == dt.timedelta(0) and abs(at - before) < dt.timedelta(minutes=1), event["at"]
    assert f"{at:%Y-%m-%d %H:%M:%S}" in ok("models", "history")
    created = dt.datetime.fromisoformat(json.loads(ok("models", "list", "--json"))[0]["created_at"])
    assert created.utcoffset() == dt.timedelta(0) and abs(created - before) < dt.timedelta(minutes=1)
    assert f"{created:%Y-%m-%d}" in ok("models", "list")


def test_import_bad_directory_names_the_file(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = write_model_dir(tmp_path / "m")
    (directory / "model_fp32.xml").unlink()
    line = fails(capsys, "models", "import", str(directory))
    assert line.startswith(f"error: {(directory / 'model_fp32.xml').resolve()}: missing")
    assert json.loads(ok("models", "list", "--json")) == []


def test_promote_refused_then_forced(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok("models", "import", str(write_model_dir(tmp_path / "m", int8_dice=0.80)))
    line = fails(capsys, "models", "promote", "3")
    assert "INT8 Dice 0.8000 is 0.1000 below FP32 parent #2's 0.9000 (tolerance 0.0100)" in line
    ok("models", "promote", "3", "--force", "--reason", "emergency", "--by", "carol")
    last = json.loads(ok("models", "history", "--json"))[-1]
    assert (last["action"], last["forced"], last["reason"], last["by"]) == (
        "promote",
        True,
        "emergency",
        "carol",
    )
    assert json.loads(ok("models", "list", "--json"))[2]["status"] == "active"


def test_fresh_install_is_created_by_db_upgrade_not_by_models(segnode_home: Path, tmp_path: Path) -> None:
    """A real ``segnode`` process on an empty var dir: ``models import`` refuses the missing database and
    creates nothing; ``db upgrade`` creates it, then import works and ``db upgrade`` is a no-op."""
    exe = Path(sys.executable).parent / "segnode"
    repo = Path(__file__).resolve().parents[2]  # this checkout's code, not the installed one's
    env = {"SEGNODE_HOME": str(segnode_home), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    env["PYTHONPATH"] = str(repo)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{segnode_home / "from-config.db"}"\n')
    directory = write_model_dir(tmp_path / "m")

    def segnode(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(exe), *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )

    proc = segnode("models", "import", str(directory), "--config", str(cfg), "--promote")
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        f"error: database sqlite:///{segnode_home / 'from-config.db'} does not exist "
        f"([database] url of {cfg} (--config); "
    ), proc.stderr
    assert "`segnode db upgrade`" in proc.stderr
    assert list(segnode_home.iterdir()) == []
    proc = segnode("db", "upgrade", "--config", str(cfg))
    assert proc.returncode == 0 and f"database upgraded from empty to {head_revision()}" in proc.stdout
    proc = segnode("models", "import", str(directory), "--config", str(cfg), "--promote")
    assert proc.returncode == 0, proc.stderr
    assert "promoted model #3 (ir/int8) for task whole_tumor" in proc.stdout
    url = f"sqlite:///{segnode_home / 'from-config.db'}"
    assert current_revision(url) == head_revision()
    proc = segnode("db", "upgrade", "--config", str(cfg))
    assert proc.returncode == 0 and f"database already at revision {head_revision()}" in proc.stdout
    proc = segnode("models", "promote", "42", "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: model #42 does not exist (see `segnode models list`)"


@pytest.mark.parametrize(
    "command",
    [["models", "list"], ["models", "import", "MODEL", "--promote"], ["models", "promote", "1"],
     ["models", "history"], ["models", "verify", "1"]],
)
def test_models_commands_away_from_the_node_create_no_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """Run from a directory with no var dir and no SEGNODE_*: refused, naming the URL and the default,
    and no ./var/segnode.db appears (a later ``jobs list`` there still says the database is missing)."""
    for key in ("SEGNODE_HOME", "SEGNODE_CONFIG", "SEGNODE_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = str(write_model_dir(tmp_path / "m"))
    line = fails(capsys, *[model if a == "MODEL" else a for a in command])
    assert line == (
        f"error: database sqlite:///{elsewhere / 'var' / 'segnode.db'} does not exist (no --config, "
        "$SEGNODE_CONFIG or $SEGNODE_DATABASE_URL: the default, segnode.db in ./var of the current "
        f"directory, {elsewhere}); the models commands do not create one: point them at the node's "
        "database (--config node.toml, SEGNODE_CONFIG or SEGNODE_DATABASE_URL), or create a new one with "
        "`segnode db upgrade` and the same settings"
    )
    assert list(elsewhere.iterdir()) == []
    assert "does not exist" in fails(capsys, "jobs", "list")


def test_looking_at_a_missing_database_creates_nothing_and_an_empty_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Told the database does not exist, an administrator ran ``segnode db current`` to look: it left an
    empty ./var/segnode.db, which a models command then took for the node's database, migrated and
    promoted into (found by review of the day's diff). Now looking creates nothing, and an empty SQLite
    file is refused like a missing one."""
    for key in ("SEGNODE_HOME", "SEGNODE_CONFIG", "SEGNODE_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = ok("db", "current")
    assert f"current: none (database sqlite:///{elsewhere / 'var' / 'segnode.db'} does not exist)" in out
    assert "run `segnode db upgrade` to create it" in out
    assert list(elsewhere.iterdir()) == []
    (elsewhere / "var").mkdir()
    (elsewhere / "var" / "segnode.db").touch()  # what such a look left behind
    model = str(write_model_dir(tmp_path / "m"))
    assert "the models commands do not create one" in fails(capsys, "models", "import", model, "--promote")
    with sqlite3.connect(elsewhere / "var" / "segnode.db") as conn:  # nothing imported, nothing migrated
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == []


def test_models_commands_migrate_an_existing_older_database(segnode_home: Path) -> None:
    """An existing database at an older revision is still upgraded to head by a models command."""
    from db.session import upgrade

    url = f"sqlite:///{segnode_home / 'segnode.db'}"
    upgrade(url, "0002_rollout_events")
    assert "No models registered yet" in ok("models", "list")
    assert current_revision(url) == head_revision()


def test_db_upgrade_and_current(segnode_home: Path) -> None:
    out = ok("db", "upgrade")
    assert f"database upgraded from empty to {head_revision()}" in out
    assert current_revision(f"sqlite:///{segnode_home / 'segnode.db'}") == head_revision()
    assert f"current: {head_revision()}  head: {head_revision()}" in ok("db", "current")


@pytest.mark.parametrize("command", [["db", "upgrade"], ["models", "list"]])
def test_unreachable_database_is_one_line_without_password(
    segnode_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    monkeypatch.setenv("SEGNODE_DATABASE_URL", "postgresql+psycopg://admin:s3cret@127.0.0.1:1/segnode")
    line = fails(capsys, *command)
    assert "postgresql+psycopg://admin:***@127.0.0.1:1/segnode" in line and "s3cret" not in line
    assert "Connection refused" in line or "connection failed" in line


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (" postgresql+psycopg://admin:s3cret@127.0.0.1:1/segnode", "it begins or ends with whitespace"),
        ("postgresql+psycopg://admin:s3cret@127.0.0.1:54x2/segnode", "its port is not a number"),
    ],
)
@pytest.mark.parametrize("command", [["db", "upgrade"], ["models", "list"]])
def test_invalid_database_url_names_its_source_not_its_value(
    segnode_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    problem: str,
    command: list[str],
) -> None:
    monkeypatch.setenv("SEGNODE_DATABASE_URL", url)
    line = fails(capsys, *command)
    assert line.startswith(f"error: $SEGNODE_DATABASE_URL is not a valid database URL: {problem}"), line
    assert "s3cret" not in line
    monkeypatch.delenv("SEGNODE_DATABASE_URL")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"[database]\nurl = {json.dumps(url)}\n")
    line = fails(capsys, *command, "--config", str(cfg))
    assert line.startswith(f"error: {cfg}: [database] url is not a valid database URL: {problem}"), line
    assert "s3cret" not in line


def test_password_in_the_url_query_is_masked(
    segnode_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEGNODE_DATABASE_URL", "postgresql+psycopg://admin@127.0.0.1:1/segnode?password=s3cret")
    line = fails(capsys, "models", "list")
    assert "postgresql+psycopg://admin@127.0.0.1:1/segnode?password=***:" in line and "s3cret" not in line


def test_rollback_without_task_and_no_active_model(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        fails(capsys, "models", "rollback")
        == "error: rollback needs --task (tasks with an active model: none)"
    )


def test_show_says_how_an_int8_model_was_quantized_and_warns_where_it_may_saturate(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An INT8 model without NNCF's overflow fix on a CPU without VNNI or AMX gets a warning in
    `segnode models show`; the same model on a VNNI CPU, and one quantized with the fix, do not."""
    from converters import cpu

    unfixed = write_model_dir(tmp_path / "unfixed", version="1.0.0")
    fixed_dir = write_model_dir(tmp_path / "fixed", version="1.0.1")
    card = json.loads((fixed_dir / "model.json").read_text())
    card["calibration"] = {**(card.get("calibration") or {}), "overflow_fix": "enable"}
    (fixed_dir / "model.json").write_text(json.dumps(card))
    ok("models", "import", str(unfixed))
    ok("models", "import", str(fixed_dir))
    listed = json.loads(ok("models", "list", "--json"))
    int8 = {m["version"]: m["id"] for m in listed if m["precision"] == "int8"}
    for flags, version, warned in (
        (frozenset({"avx2", "fma"}), "1.0.0", True),
        (frozenset({"avx2", "avx512_vnni"}), "1.0.0", False),
        (frozenset({"avx2", "fma"}), "1.0.1", False),
    ):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        human = ok("models", "show", str(int8[version]))
        assert ("INT8 overflow fix: enable" in human) is (version == "1.0.1")
        assert ("this CPU has no VNNI or AMX" in human) is warned, (flags, version)


@pytest.mark.parametrize(
    "form", ["file:{path}?uri=true", "file://{path}?uri=true", "file://localhost{path}?uri=true"]
)
def test_looking_at_a_missing_database_named_by_a_sqlite_uri_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """The same look with the database named by a SQLite ``file:`` URI: it used to connect, and SQLite
    created the file."""
    missing = tmp_path / "var" / "segnode.db"
    missing.parent.mkdir()
    monkeypatch.setenv("SEGNODE_DATABASE_URL", "sqlite:///" + form.format(path=missing))
    out = ok("db", "current")
    assert "does not exist)" in out and "run `segnode db upgrade` to create it" in out
    assert not missing.exists()
    monkeypatch.setenv("SEGNODE_DATABASE_URL", "sqlite:///file::memory:?uri=true")
    assert "current: empty" in ok("db", "current")
