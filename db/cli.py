"""``segnode models`` and ``segnode db``: the admin CLI of the model table and of the schema.

``segnode models`` lists, shows, imports, promotes, rolls back, retires and verifies models;
``segnode db`` upgrades the schema and shows its revision. Every command resolves the database URL
once (:func:`db.url.resolve_database_url`: ``$SEGNODE_DATABASE_URL``, else ``[database] url`` of
``--config`` or ``$SEGNODE_CONFIG``, else the var dir); the ``models`` commands upgrade an existing
database's schema to head first, but refuse a database that is not there (``segnode db upgrade``
creates one; the node creates its own at start). Bad input raises
:class:`db.exceptions.RegistryError`; ``segnode`` prints it as one line and exits with code 2.

:data:`CONFIG_OPTION` and :func:`echo_json` are shared with the node's and the trainer's commands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from db.registry import EventInfo, ModelInfo, Registry

console = Console(highlight=False)
#: The most columns a table written to a pipe or file takes (:func:`print_table`).
WIDEST_TABLE = 400


def print_table(table: Table, on: Console | None = None) -> None:
    """Print a table on a console (default this module's). In a terminal Rich fits it to the window;
    written to a pipe or a file (a log) it would be laid out 80 columns wide and its cells folded
    (numbers into stacked digits), so there it gets the width it needs, unless ``COLUMNS`` sets one."""
    on = console if on is None else on
    if on.is_terminal or "COLUMNS" in os.environ:
        on.print(table)
        return
    width = on.measure(table, options=on.options.update_width(WIDEST_TABLE)).maximum
    Console(file=on.file, width=max(width, on.width), highlight=False).print(table)  # print() cannot widen

models_app = typer.Typer(
    name="models",
    help="The model table: list, show, import, promote, roll back, retire and verify models.",
    no_args_is_help=True,
)

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Node config file (node.toml); default $SEGNODE_CONFIG."
)
BY_OPTION = typer.Option(None, "--by", help="Who acts, for the audit trail (default: the OS user).")
JSON_OPTION = typer.Option(False, "--json", help="Write JSON to stdout instead of a table.")
TOLERANCE_OPTION = typer.Option(
    0.01, "--tolerance", help="Largest allowed Dice drop of INT8 below its FP32 parent."
)


db_app = typer.Typer(
    name="db", help="The database: upgrade the schema, show its revision.", no_args_is_help=True
)


def open_from_config(config: Path | None, tolerance: float = 0.01) -> Registry:
    """The registry on the configured database, upgraded to the newest schema.

    The database must exist: a SQLite file that is not there is refused
    (:class:`db.exceptions.DatabaseUnavailableError`, naming the URL and how it was found) instead of
    created, so that a command run away from the node does not import or promote into a database of
    its own. ``segnode db upgrade`` creates one.
    """
    from db.exceptions import DatabaseUnavailableError
    from db.registry import open_registry
    from db.session import display_url, existing_tables
    from db.url import resolve_database_url, url_origin

    url = resolve_database_url(config)
    tables = existing_tables(url)
    # An empty SQLite file is no database either: a connection that only looked (an older
    # `segnode db current`, a sqlite3 shell) leaves one behind.
    if tables is None or (not tables and url.startswith("sqlite")):
        raise DatabaseUnavailableError(
            f"database {display_url(url)} does not exist ({url_origin(config)}); the models commands "
            "do not create one: point them at the node's database (--config node.toml, SEGNODE_CONFIG "
            "or SEGNODE_DATABASE_URL), or create a new one with `segnode db upgrade` and the same settings"
        )
    return open_registry(url, tolerance=tolerance)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _dice(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


_MIN_WIDTH = {"Name": 8, "Task": 8}
_STATUS_STYLE = {"active": "bold green", "candidate": "", "retired": "dim"}


def models_table(models: list[ModelInfo], title: str = "Models") -> Table:
    """A Rich table of ``models``: id, name, version, (task), kind, precision, status, Dice, size, created.

    The task goes into the title instead of a column when all models share it (fits 80 columns).
    """
    tasks = sorted({m.task for m in models})
    show_task = len(tasks) > 1
    if len(tasks) == 1:
        title = f"{title} (task {tasks[0]})"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["ID", "Name", "Version", "Task", "Kind", "Precision", "Status", "Dice", "Size", "Created"]
    for column in columns:
        if column == "Task" and not show_task:
            continue
        table.add_column(
            column,
            justify="right" if column in ("ID", "Dice", "Size") else "left",
            no_wrap=column in ("ID", "Kind", "Status", "Dice"),
            min_width=_MIN_WIDTH.get(column, 0),
            overflow="fold",
        )
    for m in models:
        status = f"[{_STATUS_STYLE[m.status]}]{m.status}[/]" if _STATUS_STYLE[m.status] else m.status
        row = [
            str(m.id),
            m.name,
            m.version,
            m.task,
            m.kind,
            m.precision,
            status,
            _dice(m.dice),
            _size(m.size),
            m.created_at.strftime("%Y-%m-%d"),
        ]
        if not show_task:
            del row[3]
        table.add_row(*row)
    return table


def echo_json(data: Any) -> None:
    """Write ``data`` to stdout as indented JSON (``--json`` of every command)."""
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


@models_app.command("list")
def list_cmd(
    task: str | None = typer.Option(None, "--task", help="Only models of this task."),
    as_json: bool = JSON_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """List the models (all statuses), oldest first."""
    models = open_from_config(config).list_models(task)
    if as_json:
        echo_json([m.to_dict() for m in models])
        return
    if not models:
        console.print("No models registered yet; add one with `segnode models import DIR`.")
        return
    print_table(models_table(models))


@models_app.command("show")
def show_cmd(
    model_id: int = typer.Argument(..., metavar="ID", help="Model id (see `segnode models list`)."),
    as_json: bool = JSON_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Show one model: fields, lineage, files, metrics."""
    registry = open_from_config(config)
    model = registry.get(model_id)
    if as_json:
        echo_json(model.to_dict())
        return
    print_table(models_table([model], title=f"Model #{model.id}"))
    lineage: list[str] = []
    parent_id = model.parent_id
    while parent_id is not None and len(lineage) < 10:
        parent = registry.get(parent_id)
        lineage.append(f"#{parent.id} {parent.kind}/{parent.precision}")
        parent_id = parent.parent_id
    console.print(f"modalities: {', '.join(model.modalities)}")
    console.print(f"lineage: {' <- '.join([f'#{model.id}', *lineage]) if lineage else 'none (no parent)'}")
    if model.precision == "int8":
        _print_int8_quantization(model.calibration)
    files = Table(title="Files")
    for column in ("Path", "Size", "sha256"):
        files.add_column(column)
    for f in model.files:
        files.add_row(str(f.path), _size(f.size), f.sha256)
    print_table(files)
    mean = (model.metrics or {}).get("mean")
    if isinstance(mean, dict):
        cases = (model.metrics or {}).get("cases") or []
        console.print(
            "metrics (mean over "
            f"{len(cases)} cases): "
            + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in mean.items())
        )
    else:
        console.print("metrics: none")
    evaluations = (model.metrics or {}).get("evaluations") or []
    if evaluations:
        print_table(_evaluations_table(evaluations))


def _print_int8_quantization(calibration: dict[str, Any] | None) -> None:
    """How an INT8 model was quantized, and a warning where its sums may saturate on this CPU."""
    from converters.cpu import int8_may_saturate

    fix = (calibration or {}).get("overflow_fix") or "not recorded (NNCF's default: the first layer only)"
    console.print(f"INT8 overflow fix: {fix}")
    if int8_may_saturate(calibration):
        console.print(
            "[yellow]warning:[/] this CPU has no VNNI or AMX and this model was quantized without the "
            "overflow fix on every layer: its accuracy may fall below its FP32 parent's "
            "(segnode requantize, or promote the FP32 model)"
        )


def _evaluations_table(evaluations: list[dict[str, Any]]) -> Table:
    """The ``segnode evaluate`` results recorded against a model (``metrics.evaluations``)."""
    table = Table(title="Evaluations (segnode evaluate)")
    for column in ("Split", "Cases", "Dice", "HD95 mm", "Data", "When (UTC)", "By"):
        table.add_column(column, justify="right" if column in ("Cases", "Dice", "HD95 mm") else "left")
    for e in evaluations:
        mean = e.get("mean") or {}
        hd95 = mean.get("hd95")
        table.add_row(
            str(e.get("split", "")),
            str(len(e.get("cases") or [])),
            _dice(mean.get("dice")),
            "-" if hd95 is None else f"{hd95:.2f}",
            str(e.get("data", "")),
            str(e.get("at", ""))[:19].replace("T", " "),
            str(e.get("by", "")),
        )
    return table


def _runnable_to_promote(models: list[ModelInfo]) -> ModelInfo:
    from db.exceptions import PromotionRefused
    from db.models import RUNNABLE_KINDS

    runnable = [m for m in models if m.kind in RUNNABLE_KINDS]
    for precision in ("int8", "fp16", "fp32"):
        for m in runnable:
            if m.precision == precision:
                return m
    raise PromotionRefused("--promote: the model directory has no OpenVINO IR artifact the node could run")


@models_app.command("import")
def import_cmd(
    directory: Path = typer.Argument(
        ..., metavar="DIR", help="Model directory holding model.json and files."
    ),
    promote: bool = typer.Option(
        False, "--promote", help="Then promote its IR (INT8 if present, else FP32)."
    ),
    reason: str = typer.Option("", "--reason", help="Why (recorded with --promote)."),
    by: str | None = BY_OPTION,
    tolerance: float = TOLERANCE_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Register every artifact of a model directory (model.json + files) in one transaction."""
    registry = open_from_config(config, tolerance)
    models = registry.import_dir(directory, by=by)
    print_table(models_table(models, title=f"Imported from {directory}"))
    if promote:
        chosen = _runnable_to_promote(models)
        if chosen.status == "active":
            console.print(f"model #{chosen.id} is already active for task {chosen.task}")
            return
        promoted = registry.promote(chosen.id, by=by, reason=reason or f"imported from {directory}")
        console.print(
            f"promoted model #{promoted.id} ({promoted.kind}/{promoted.precision}) for task {promoted.task}"
        )


@models_app.command("promote")
def promote_cmd(
    model_id: int = typer.Argument(..., metavar="ID", help="Model id to make active for its task."),
    force: bool = typer.Option(False, "--force", help="Override failed metric gates (needs --reason)."),
    reason: str = typer.Option("", "--reason", help="Why; recorded in the audit trail."),
    by: str | None = BY_OPTION,
    tolerance: float = TOLERANCE_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Make a model the active model of its task, after the promotion gates."""
    model = open_from_config(config, tolerance).promote(model_id, by=by, reason=reason, force=force)
    console.print(
        f"model #{model.id} ({model.name} {model.version} {model.kind}/{model.precision}) is now "
        f"active for task {model.task}"
    )


@models_app.command("rollback")
def rollback_cmd(
    task: str | None = typer.Option(
        None, "--task", help="Task to roll back (default: the only task with an active model)."
    ),
    reason: str = typer.Option("", "--reason", help="Why; recorded in the audit trail."),
    by: str | None = BY_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Re-activate the previous active model of a task."""
    from db.exceptions import RollbackError

    registry = open_from_config(config)
    if task is None:
        tasks = sorted({m.task for m in registry.list_models() if m.status == "active"})
        if len(tasks) != 1:
            have = ", ".join(tasks) if tasks else "none"
            raise RollbackError(f"rollback needs --task (tasks with an active model: {have})")
        task = tasks[0]
    model = registry.rollback(task, by=by, reason=reason)
    console.print(
        f"task {task} rolled back: model #{model.id} ({model.kind}/{model.precision}) is active again"
    )


@models_app.command("retire")
def retire_cmd(
    model_id: int = typer.Argument(..., metavar="ID", help="Model id to retire."),
    reason: str = typer.Option("", "--reason", help="Why; recorded in the audit trail."),
    by: str | None = BY_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Retire a model: it can no longer be promoted or rolled back to."""
    model = open_from_config(config).retire(model_id, by=by, reason=reason)
    console.print(f"model #{model.id} retired")


@models_app.command("verify")
def verify_cmd(
    model_id: int = typer.Argument(..., metavar="ID", help="Model id whose files to check."),
    as_json: bool = JSON_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Check a model's files against their recorded sha256 and size; exit 2 on any mismatch."""
    from db.exceptions import ChecksumMismatch

    report = open_from_config(config).verify(model_id)
    if as_json:
        echo_json(
            {
                "model_id": model_id,
                "ok": report.ok,
                "files": [
                    {
                        "path": str(f.path),
                        "status": f.status,
                        "expected_sha256": f.expected_sha256,
                        "actual_sha256": f.actual_sha256,
                        "expected_size": f.expected_size,
                        "actual_size": f.actual_size,
                    }
                    for f in report.files
                ],
            }
        )
    else:
        table = Table(title=f"Model #{model_id} files")
        for column in ("Path", "Status"):
            table.add_column(column)
        for f in report.files:
            table.add_row(str(f.path), "ok" if f.ok else f"[bold red]{f.status}[/]")
        print_table(table)
    if not report.ok:
        raise ChecksumMismatch(f"model #{model_id}: " + "; ".join(report.problems))


def _events_table(events: list[EventInfo]) -> Table:
    table = Table(title="Rollout history")
    for column in ("ID", "When (UTC)", "Task", "Action", "From", "To", "By", "Forced", "Reason"):
        table.add_column(column)
    for e in events:
        table.add_row(
            str(e.id),
            e.at.strftime("%Y-%m-%d %H:%M:%S"),
            e.task,
            e.action,
            f"#{e.from_model_id}" if e.from_model_id is not None else "-",
            f"#{e.to_model_id}" if e.to_model_id is not None else "-",
            e.by,
            "yes" if e.forced else "",
            e.reason,
        )
    return table


@models_app.command("history")
def history_cmd(
    task: str | None = typer.Option(None, "--task", help="Only events of this task."),
    as_json: bool = JSON_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Show the audit trail: registrations, promotions, rollbacks, retirements, refusals."""
    events = open_from_config(config).history(task)
    if as_json:
        echo_json([e.to_dict() for e in events])
        return
    print_table(_events_table(events))


@db_app.command("upgrade")
def upgrade_cmd(
    revision: str = typer.Option("head", "--revision", help="Target Alembic revision."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Run the Alembic migrations up to the newest schema (idempotent)."""
    from db.session import current_revision, upgrade
    from db.url import resolve_database_url

    url = resolve_database_url(config)
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
    from db.session import current_revision, display_url, existing_tables, head_revision
    from db.url import resolve_database_url

    url = resolve_database_url(config)
    head = head_revision()
    if existing_tables(url) is None:  # looking must not create the file (the models commands refuse none)
        typer.echo(f"current: none (database {display_url(url)} does not exist)  head: {head}  "
                   "(run `segnode db upgrade` to create it)")  # fmt: skip
        return
    current = current_revision(url)
    note = "" if current == head else "  (run `segnode db upgrade`)"
    typer.echo(f"current: {current or 'empty'}  head: {head}{note}")
