"""``segnode jobs | send | demo`` through the real command line entry point; the root app's lazy groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from converters.dicom_writer import write_study
from converters.synthetic import make_synthetic_case
from db import instances, job_queue
from db.session import make_engine, make_session_factory, upgrade
from db.transactions import utcnow
from node.cli import COMMANDS
from node.cli.lazy import importable
from tests.helpers.cli import run_cli, segnode_process
from tests.helpers.node import CatchingSCP, make_threshold_model
from tests.helpers.peers import REPO
from tests.helpers.ports import free_port


@pytest.fixture()
def config(tmp_path: Path, segnode_home: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "node.db"}"\n')
    return cfg


def _done_job(db: str) -> int:
    upgrade(db)
    sf = make_session_factory(make_engine(db))
    now = utcnow()
    instances.record_instance(
        sf,
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.5",
        kept=True,
        path="/x.dcm",
        calling_ae="PACS",
        now=now - timedelta(seconds=60),
    )
    [job] = instances.schedule_due_studies(sf, 1.0)
    job_queue.claim_job(sf)
    job_queue.finish_job(
        sf, job, status="skipped", reason="no FLAIR series in the study", stages={"select": 0.01}
    )
    return job


def test_jobs_list_show_retry(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _done_job(f"sqlite:///{tmp_path / 'node.db'}")
    code, out, _ = run_cli(["jobs", "list", "--config", str(config), "--json"], capsys, monkeypatch)
    assert code == 0
    [row] = json.loads(out)
    assert (row["id"], row["status"], row["reason"]) == (job, "skipped", "no FLAIR series in the study")
    code, out, _ = run_cli(["jobs", "list", "--config", str(config)], capsys, monkeypatch)
    assert code == 0 and "Jobs" in out and "skip" in out  # a Rich table (wrapped at 80 columns here)
    code, out, _ = run_cli(["jobs", "show", str(job), "--config", str(config)], capsys, monkeypatch)
    assert code == 0 and "stage select" in out
    code, out, _ = run_cli(["jobs", "retry", str(job), "--config", str(config)], capsys, monkeypatch)
    assert (code, out.strip()) == (0, f"job {job} queued again")
    code, out, _ = run_cli(["jobs", "show", str(job), "--config", str(config), "--json"], capsys, monkeypatch)
    assert json.loads(out)["status"] == "queued"
    code, out, err = run_cli(["jobs", "retry", str(job), "--config", str(config)], capsys, monkeypatch)
    assert code == 2 and f"error: job {job} is queued; only a finished job can be retried" in err
    code, _, err = run_cli(["jobs", "show", "999", "--config", str(config)], capsys, monkeypatch)
    assert code == 2
    assert err.strip() == "error: job 999 does not exist (see `segnode jobs list`)"


def test_send_folder_and_unreachable_peer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = write_study(make_synthetic_case(4, (16, 16, 8)), tmp_path / "study", modalities=["FLAIR", "T2"])
    catcher = CatchingSCP("RECEIVER").start(free_port())
    try:
        args = ["send", "127.0.0.1", str(catcher.port), str(tmp_path / "study"), "--called-ae", "RECEIVER"]
        code, out, _ = run_cli(args, capsys, monkeypatch)
    finally:
        catcher.stop()
    assert code == 0
    assert f"sent 16 of 16 files to RECEIVER@127.0.0.1:{catcher.port}" in out
    assert {str(ds.SOPInstanceUID) for ds in catcher.received} == {
        str(__import__("pydicom").dcmread(p).SOPInstanceUID) for fs in study.files.values() for p in fs
    }
    port = free_port()
    code, _, err = run_cli(["send", "127.0.0.1", str(port), str(tmp_path / "study")], capsys, monkeypatch)
    assert code == 2 and f"error: cannot send to SEGNODE@127.0.0.1:{port}: association to" in err
    code, _, err = run_cli(["send", "127.0.0.1", str(port), str(tmp_path / "nothing")], capsys, monkeypatch)
    assert code == 2 and f"error: {tmp_path / 'nothing'} does not exist" in err


def test_send_counts_a_warning_status_as_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """0xB000 (coercion of data elements): the PACS stored the objects; they are sent, with the warning."""
    write_study(make_synthetic_case(4, (16, 16, 8)), tmp_path / "study", modalities=["FLAIR"])
    catcher = CatchingSCP("RECEIVER", status=0xB000).start(free_port())
    try:
        args = ["send", "127.0.0.1", str(catcher.port), str(tmp_path / "study"), "--called-ae", "RECEIVER"]
        code, out, _ = run_cli(args, capsys, monkeypatch)
    finally:
        catcher.stop()
    assert code == 0, out
    assert f"sent 8 of 8 files to RECEIVER@127.0.0.1:{catcher.port}" in out
    words = " ".join(out.split())  # Rich wraps the long lines at 80 columns here
    assert "8 stored with a warning" in words and "failed" not in words
    assert words.count("status 0xB000 (Warning: coercion of data elements)") == 8


def test_demo_without_model_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["demo", "--workdir", str(tmp_path / "out"), "--model", str(tmp_path / "nomodel")]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2
    assert f"error: no model at {tmp_path / 'nomodel'} (model.json missing)" in err


@pytest.mark.slow
def test_demo_runs_the_whole_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``segnode demo`` as shipped: models/default on the shipped case (a fixed-threshold test model
    stands in while the shipped model is absent)."""
    from node.demo import DEFAULT_MODEL

    shipped = (DEFAULT_MODEL / "model.json").is_file()
    args = ["demo", "--workdir", str(tmp_path / "demo-out")]
    if not shipped:
        args += ["--model", str(make_threshold_model(tmp_path / "model", crop=(192, 192), threshold=1.5))]
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "total (C-STORE start to SEG and SR received)" in out
    # The network ran in the job, or (early analysis, the default) while the study was arriving.
    assert "job: inference" in out or "early (during C-STORE): inference" in out
    dice = float(out.split("(whole tumour): ")[1].split(";")[0])
    assert dice > (0.85 if shipped else 0.5)
    # The shipped case is a validation case of the shipped model: the report says its Dice is no
    # held-out figure (a test model's card records no split: nothing said).
    assert ("is one of this model's validation cases" in " ".join(out.split())) == shipped
    for name in ("seg.dcm", "sr.dcm", "preview.png"):
        assert (tmp_path / "demo-out" / name).stat().st_size > 0


# -- the root: lazy command groups, missing extras -------------------------------------------------------

BLOCKED = ("torch", "onnx", "onnxruntime", "nncf", "tensorboard", "matplotlib")

# A node-only install, as far as imports go: these modules cannot be found or imported.
SITECUSTOMIZE = f"""
import sys

BLOCKED = {BLOCKED!r}


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def _segnode(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``segnode ARGS`` in a process of its own, run in ``cwd`` with ``env``."""
    return segnode_process(*args, cwd=cwd, env=env, timeout=120)


def _segnode_without_train_extra(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return _segnode(tmp_path, {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}, *args)


@pytest.mark.parametrize(
    ("args", "command", "missing"),
    [
        (["train", "--help"], "train", "torch, tensorboard, matplotlib"),
        (["train", "--data", "x", "--out", "y"], "train", "torch, tensorboard, matplotlib"),
        (["--debug", "train"], "train", "torch, tensorboard, matplotlib"),
        (["export", "run"], "export", "torch, onnx, onnxruntime, nncf"),
    ],
)
def test_missing_train_extra_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], command: str, missing: str
) -> None:
    done = _segnode_without_train_extra(tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip() == (
        f"error: segnode {command} needs the train extra ({missing} not installed): "
        "pip install 'segnode[train]'"
    )


def test_evaluate_needs_the_extra_only_for_checkpoints_and_onnx(tmp_path: Path) -> None:
    data = tmp_path / "cases"
    for name, module in (("best.pt", "torch"), ("model.onnx", "onnxruntime")):
        (tmp_path / name).write_bytes(b"")
        done = _segnode_without_train_extra(tmp_path, "evaluate", name, "--data", str(data))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        kind = "a checkpoint" if name == "best.pt" else "an onnx"
        assert done.stderr.strip() == (
            f"error: segnode evaluate of {kind} needs the train extra ({module} not installed): "
            "pip install 'segnode[train]'"
        )
    # an IR needs only the base install
    from converters.synthetic import write_synthetic_task01

    model = make_threshold_model(tmp_path / "model", crop=(64, 64), threshold=1.0)
    cases = write_synthetic_task01(tmp_path / "Task01", 1, seed=1, shape=(40, 40, 12))
    args = ["evaluate", str(model), "--precision", "fp32", "--data", str(cases), "--json", "out.json"]
    done = _segnode_without_train_extra(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.json").read_text())["cases"][0]["case"] == "BRATS_001"
    for args in (["evaluate", "--help"], ["serve", "--help"], ["models", "--help"], ["--help"]):
        done = _segnode_without_train_extra(tmp_path, *args)
        assert done.returncode == 0, (args, done.stderr)


def test_root_help_lists_every_command_without_importing_the_groups() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import node.cli\n"
        "result = CliRunner().invoke(node.cli.app, ['--help'], env={'COLUMNS': '200'})\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('trainer', 'db', 'converters')\n"
        "          or m in ('node.cli.commands', 'node.service', 'torch', 'openvino', 'sqlalchemy')]\n"
        "print('LOADED', loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("LOADED []")
    for name, spec in COMMANDS.items():
        assert f" {name} " in done.stdout and spec.help in done.stdout


def test_table_help_is_the_commands_own_help() -> None:
    from typer._click import Context

    from node.cli.lazy import load_command

    for name, spec in COMMANDS.items():
        if spec.extra is not None and not all(importable(m) for m in spec.extra.modules):
            continue  # the [train] extra is not installed here
        real = load_command(name, spec)
        assert real.name == name
        assert real.get_short_help_str(limit=200) == spec.help, name
        assert Context(real).command is real


def test_serve_with_a_config_it_cannot_run_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[selection]\nt2_pattern = '(unclosed'\n")
    code, _, err = run_cli(["serve", "--config", str(cfg)], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: {cfg}: selection.t2_pattern '(unclosed' is not a regular expression")


def test_a_failed_send_exits_non_zero_from_a_real_process(tmp_path: Path) -> None:
    # typer.Exit(1) under standalone_mode=False is returned, not raised: the exit code was 0.
    not_dicom = tmp_path / "hostname"
    not_dicom.write_text("scanner-7\n")
    catcher = CatchingSCP("RECEIVER").start(free_port())
    try:
        done = subprocess.run(
            [sys.executable, "-m", "node", "send", "127.0.0.1", str(catcher.port), str(not_dicom)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        catcher.stop()
    assert "sent 0 of 1 files" in done.stdout and f"failed: {not_dicom}" in done.stdout
    assert done.returncode == 1, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--called-ae", "TOO_LONG_AE_TITLE_X"], "--called-ae 'TOO_LONG_AE_TITLE_X' must be 1-16 ASCII"),
        (["--calling-ae", "SEG\\NODE"], "--calling-ae 'SEG\\\\NODE' must be 1-16 ASCII characters"),
        (["--called-ae", "  "], "--called-ae '  ' must be 1-16 ASCII characters"),
    ],
)
def test_send_refuses_an_ae_title_that_is_none(
    tmp_path: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "f.dcm").write_bytes(b"")
    code, _, err = run_cli(["send", "127.0.0.1", "104", str(tmp_path / "f.dcm"), *args], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: {message}"), err


@pytest.mark.parametrize("port", ["0", "70000"])
def test_send_refuses_a_port_that_is_none(
    tmp_path: Path, port: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f.dcm").write_bytes(b"")
    code, _, err = run_cli(["send", "127.0.0.1", port, str(tmp_path / "f.dcm")], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == f"error: port {port} is not a TCP port (1-65535)", err


def test_jobs_list_refuses_an_unknown_state(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty table said "no such jobs" where the state was misspelt.
    upgrade(f"sqlite:///{tmp_path / 'node.db'}")
    args = ["jobs", "list", "--config", str(config), "--status", "bogus"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert err.strip() == (
        "error: --status 'bogus' is not a job state; "
        "use one of queued, running, done, failed, skipped, review"
    )
    code, out, _ = run_cli([*args[:-1], "review", "--json"], capsys, monkeypatch)
    assert (code, out.strip()) == (0, "[]")


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_jobs_list_refuses_a_limit_below_one(
    limit: str,
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--limit -1`` listed every job on SQLite and was an SQL error on PostgreSQL (``LIMIT -1``); ``0``
    said "no such jobs". Both are a usage error now, before the database."""
    _done_job(f"sqlite:///{tmp_path / 'node.db'}")
    code, out, err = run_cli(["jobs", "list", "--config", str(config), "--limit", limit], capsys, monkeypatch)
    assert (code, out) == (2, ""), out
    assert "Invalid value for '--limit'" in err and "greater than or equal to 1" in err, err


def test_send_anyway_does_not_need_the_nodes_tls_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, segnode_home: Path
) -> None:
    """`jobs retry --send-anyway` reads the config for its destinations; an administrator who may not
    read the node's TLS key (its own user's) was refused by the key check meant for `serve`."""
    job = _done_job(f"sqlite:///{tmp_path / 'node.db'}")
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "node.db"}"\n'
        f'[tls]\nenabled = true\ncert = "{tmp_path / "unreadable.pem"}"\n'
        f'key = "{tmp_path / "unreadable.key"}"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    )
    args = ["jobs", "retry", str(job), "--send-anyway", "--config", str(cfg)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "only a job in review can be sent anyway" in err, err


@pytest.mark.parametrize("args", [["jobs", "list"], ["jobs", "show", "1"], ["jobs", "retry", "1"]])
def test_jobs_without_the_nodes_database_say_where_they_looked(
    args: list[str], segnode_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config the jobs commands created an empty ./var/segnode.db and printed an empty table
    with exit 0, while the node's database was elsewhere: an administrator read "no jobs"."""
    db = segnode_home / "segnode.db"
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert (code, out) == (2, ""), err
    assert err.startswith(f"error: database sqlite:///{db} does not exist") and "Traceback" not in err
    assert "--config node.toml" in err and "SEGNODE_CONFIG" in err and "SEGNODE_DATABASE_URL" in err
    assert not db.exists()


def test_jobs_refuse_a_database_without_the_node_tables(
    tmp_path: Path, segnode_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    monkeypatch.setenv("SEGNODE_DATABASE_URL", f"sqlite:///{db}")
    code, out, err = run_cli(["jobs", "list"], capsys, monkeypatch)
    assert (code, out) == (2, ""), err
    assert err.startswith(f"error: database sqlite:///{db} has no node tables (node_jobs)")
    assert "--config node.toml" in err
    with sqlite3.connect(db) as conn:  # left as it was: no schema upgrade
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["t"]


def test_jobs_do_not_show_the_database_password(
    segnode_home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens: the connection is refused
    monkeypatch.setenv("SEGNODE_DATABASE_URL", f"postgresql+psycopg://segnode:s3cret@127.0.0.1:{port}/segnode")
    code, out, err = run_cli(["jobs", "list"], capsys, monkeypatch)
    assert (code, out) == (2, "") and err.startswith("error: ") and "Traceback" not in err, err
    assert "s3cret" not in err and f"segnode:***@127.0.0.1:{port}/segnode" in err


def test_jobs_list_in_a_real_process_creates_no_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGNODE_")}
    env["PYTHONPATH"] = str(REPO)
    result = _segnode(tmp_path, env, "jobs", "list")
    assert result.returncode == 2 and result.stdout == "", result.stderr
    db = tmp_path / "var" / "segnode.db"
    assert result.stderr.startswith(f"error: database sqlite:///{db} does not exist"), result.stderr
    assert not (tmp_path / "var").exists()


def test_jobs_with_config_from_another_directory_say_how_the_url_was_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`segnode jobs list --config /path/node.toml` run from another directory than `segnode serve`
    looked for ./var/segnode.db there (the var dir resolves against the current directory) and told
    the administrator to "pass --config node.toml", which they had."""
    for key in ("SEGNODE_HOME", "SEGNODE_CONFIG", "SEGNODE_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    node_dir, elsewhere = tmp_path / "node", tmp_path / "elsewhere"
    (node_dir / "var").mkdir(parents=True)
    elsewhere.mkdir()
    _done_job(f"sqlite:///{node_dir / 'var' / 'segnode.db'}")  # where `segnode serve` in node_dir keeps it
    config = node_dir / "node.toml"
    config.write_text('[node]\nae_title = "SEGNODE"\n')  # no [database] url: the default
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(["jobs", "list", "--config", str(config)], capsys, monkeypatch)
    assert (code, out) == (2, ""), err
    assert err.startswith(f"error: database sqlite:///{elsewhere / 'var' / 'segnode.db'} does not exist")
    assert "pass --config" not in err and f"{config} (--config) has no [database] url" in err
    assert f"./var of the current directory ({elsewhere})" in err and "SEGNODE_HOME" in err
    assert not (elsewhere / "var").exists()

    config.write_text('[database]\nurl = "sqlite:///var/segnode.db"\n')  # a relative path
    code, _, err = run_cli(["jobs", "list", "--config", str(config)], capsys, monkeypatch)
    assert code == 2 and "pass --config" not in err
    assert f"a relative SQLite path in it resolves against the current directory ({elsewhere})" in err

    monkeypatch.setenv("SEGNODE_HOME", str(node_dir / "var"))  # as README.md says
    config.write_text('[node]\nae_title = "SEGNODE"\n')
    code, out, err = run_cli(["jobs", "list", "--config", str(config), "--json"], capsys, monkeypatch)
    assert code == 0 and [row["status"] for row in json.loads(out)] == ["skipped"], err
