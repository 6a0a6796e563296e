"""The node's own commands: ``segnode serve | send | demo | jobs``.

Run the node, push DICOM files to a peer, the demo, and the job queue. The root app
(:mod:`node.cli`) loads this module only when one of these commands runs.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from db.cli import CONFIG_OPTION, echo_json, print_table
from node.dcmtk_programs import dcmtk_program

console = Console(highlight=False)

jobs_app = typer.Typer(
    name="jobs",
    help="The node's job queue: list, show and retry jobs, dismiss refused sends or held results.",
    no_args_is_help=True,
)


#: What to do when the jobs commands find no node database where they looked.
_WHERE_HINT = (
    "the jobs commands read the node's database: pass --config node.toml (the node's config) "
    "or set SEGNODE_CONFIG or SEGNODE_DATABASE_URL"
)


def _session_factory(config: Path | None) -> Any:
    """Sessions on the node's database, upgraded to the newest schema.

    The database must already be the node's: a SQLite file that is not there, or a database without
    the node's tables, is refused (``NodeError``) instead of created, so that a command run without
    ``--config`` does not show the empty queue of a database it made itself.
    """
    from db.session import make_engine, make_session_factory, upgrade
    from db.url import resolve_database_url

    url = resolve_database_url(config)
    _require_node_database(url, config)
    upgrade(url)
    return make_session_factory(make_engine(url))


def _require_node_database(url: str, config: Path | None = None) -> None:
    """Raise ``NodeError`` unless ``url`` names an existing database with the node's tables; the
    message says where the URL came from (:func:`_where_hint`)."""
    from db.session import display_url, existing_tables
    from node.exceptions import NodeError

    tables = existing_tables(url)
    if tables is None:
        raise NodeError(f"database {display_url(url)} does not exist; {_where_hint(config)}")
    if "node_jobs" not in tables:
        raise NodeError(f"database {display_url(url)} has no node tables (node_jobs); {_where_hint(config)}")


def _where_hint(config: Path | None) -> str:
    """What to do when the database the jobs commands resolved is not the node's.

    With a config file (``--config`` or ``SEGNODE_CONFIG``), "pass --config" is no help: the hint says
    how the URL was found instead. The var dir (``$SEGNODE_HOME``, default ``./var``) and a relative
    SQLite path resolve against the current directory, as for ``segnode serve`` (node/config.py
    resolves its relative paths so too), so a command run from another directory looks elsewhere.
    """
    import os

    from db.url import url_in_config_file

    from_env = os.environ.get("SEGNODE_CONFIG") or ""
    if config is None and not from_env:
        return _WHERE_HINT
    config_file, named = (config, "--config") if config is not None else (Path(from_env), "SEGNODE_CONFIG")
    if os.environ.get("SEGNODE_DATABASE_URL"):
        return (
            f"the URL is SEGNODE_DATABASE_URL's, which wins over {named} {config_file}: set it to the "
            "node's database or unset it"
        )
    cwd = Path.cwd()
    if url_in_config_file(config_file):
        return (
            f"the URL is [database] url of {config_file} ({named}); a relative SQLite path in it resolves "
            f"against the current directory ({cwd}), not the config file's: run the command where "
            "`segnode serve` runs, or make the path absolute"
        )
    return (
        f"{config_file} ({named}) has no [database] url, so the default is used: segnode.db in the var "
        f"dir, $SEGNODE_HOME, else ./var of the current directory ({cwd}), not of the config file; run "
        "the command where `segnode serve` runs, or set SEGNODE_HOME (or SEGNODE_DATABASE_URL) as the "
        "node has it"
    )


def serve(config: Path | None = CONFIG_OPTION) -> None:
    """Run the node: DICOM SCP, workers, sender, /metrics and /healthz, until SIGINT, SIGTERM or SIGHUP."""
    from node.config import load_settings
    from node.log_scrub import install as scrub_library_logs
    from node.memory import tune_malloc
    from node.service import NodeService

    tune_malloc()  # before the node's threads start (node/memory.py)
    scrub_library_logs()
    settings = load_settings(config)
    service = NodeService(settings)

    def _stop(signum: int, _frame: Any) -> None:
        console.print(f"signal {signal.Signals(signum).name}: stopping")
        service.request_stop()

    # SIGHUP too: an ssh or tmux session that closes, or an operator's habit of "reloading" a daemon,
    # must stop the node as gracefully as SIGTERM does, not cut off a C-STORE or a job (settings are
    # read at start only; a restart takes new ones).
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _stop)
    service.start()
    model = service.runtime.current
    console.print(
        f"segnode serving AE [bold]{settings.node.ae_title}[/] on {settings.node.host}:{service.scp.port}; "
        f"model: {model.label if model else 'none active'}; "
        f"metrics: {f'http://{settings.metrics.host}:{service.http.port}/metrics' if service.http else 'off'}"
    )
    service.wait()
    service.stop()


def _collect(paths: list[Path]) -> list[Path]:
    from node.exceptions import NodeError

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise NodeError(f"{path} does not exist")
    return files


def _check_peer(port: int, ae_titles: dict[str, str]) -> None:
    """``port`` is a TCP port and each of ``ae_titles`` (option -> value) an AE title (PS3.5 6.2)."""
    from node.dimse import ae_title_problem
    from node.exceptions import NodeError

    if not 1 <= port <= 65535:
        raise NodeError(f"port {port} is not a TCP port (1-65535)")
    for option, ae in ae_titles.items():
        if problem := ae_title_problem(ae):
            raise NodeError(f"{option} {ae!r} {problem}")


def send(
    host: str = typer.Argument(..., help="Host of the receiving DICOM node."),
    port: int = typer.Argument(..., help="Its port."),
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively)."),
    called_ae: str = typer.Option("SEGNODE", "--called-ae", help="AE title of the receiver."),
    calling_ae: str = typer.Option("SEGNODE_SCU", "--calling-ae", help="Our AE title."),
) -> None:
    """Send DICOM files over C-STORE (one association), with a progress bar.

    Exits 1 when a file was not stored; one stored with a Warning status (0xB000, 0xB006, 0xB007) is
    sent, and listed with its warning.
    """
    from rich.progress import Progress

    from node import dimse
    from node.exceptions import NodeError
    from node.sender import store_files

    _check_peer(port, {"--called-ae": called_ae, "--calling-ae": calling_ae})
    files = _collect(paths)
    if not files:
        raise NodeError(f"no files found in {', '.join(map(str, paths))}")
    failed: list[str] = []
    warned: list[str] = []  # stored with a Warning status (0xB000, 0xB006, 0xB007): sent, and said so
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"C-STORE to {called_ae}@{host}:{port}", total=len(files))
        for start in range(0, len(files), 200):
            chunk = files[start : start + 200]
            try:
                results = store_files(chunk, host, port, called_ae, calling_ae)
            except (ConnectionError, OSError) as exc:
                raise NodeError(f"cannot send to {called_ae}@{host}:{port}: {exc}") from None
            failed += [f"{p}: {err}" for p, status, err in results if not dimse.stored(status)]
            warned += [f"{p}: {err}" for p, status, err in results if dimse.stored(status) and err]
            progress.advance(task, len(chunk))
    console.print(f"sent {len(files) - len(failed)} of {len(files)} files to {called_ae}@{host}:{port}")
    if warned:
        console.print(f"  {len(warned)} stored with a warning:")
        for line in warned[:10]:
            console.print(f"  warning: {line}")
    if failed:
        for line in failed[:10]:
            console.print(f"  failed: {line}")
        raise typer.Exit(1)


def demo(
    workdir: Path = typer.Option(
        Path("demo-out"), "--workdir", help="Work directory (created; reused files replaced)."
    ),
    model_dir: Path | None = typer.Option(None, "--model", help="Model directory (default: models/default)."),
    case_dir: Path | None = typer.Option(None, "--case", help="NIfTI case (default: the shipped demo case)."),
    sender: str = typer.Option(
        "auto",
        "--sender",
        help="auto: DCMTK storescu when installed (as a PACS), else pynetdicom; pynetdicom.",
    ),
) -> None:
    """The whole clinical path on this machine: DICOM study in over C-STORE, SEG and SR back."""
    from node.demo import run_demo
    from node.exceptions import NodeError
    from node.memory import tune_malloc

    tune_malloc()  # as `segnode serve` runs the node (node/memory.py)
    if sender not in ("auto", "pynetdicom"):
        raise NodeError(f"--sender {sender!r} is not 'auto' or 'pynetdicom'")
    storescu = dcmtk_program("storescu") if sender == "auto" else None
    report = run_demo(workdir, model_dir=model_dir, case_dir=case_dir, console=console, storescu=storescu)
    via = "DCMTK storescu" if storescu else "pynetdicom"
    table = Table(title=f"segnode demo: {report.case_id} ({report.model_label}), study sent with {via}")
    table.add_column("Stage")
    table.add_column("Seconds", justify="right")
    for name, seconds in report.stages.items():
        table.add_row(name, f"{seconds:.2f}")
    table.add_row("[bold]total (C-STORE start to SEG and SR received)[/]", f"[bold]{report.total:.2f}[/]")
    print_table(table, console)
    dice = "n/a (no tumour in the SEG nor in the truth)" if report.dice is None else f"{report.dice:.4f}"
    console.print(
        f"Dice of the returned SEG against the ground truth (whole tumour): [bold]{dice}[/]; "
        f"tumour volume {report.volume_ml:.1f} mL"
    )
    if report.case_role is not None:
        uses = {"validation": "chose its checkpoint on them", "training": "learned from them"}
        used = uses[report.case_role]
        console.print(
            f"{report.case_id} is one of this model's {report.case_role} cases (its training run {used}): "
            "this Dice shows the path works, it is no held-out accuracy (docs/holdout_eval/)"
        )
    console.print(f"wrote {', '.join(str(p) for p in report.files)}")


@jobs_app.command("list")
def jobs_list(
    config: Path | None = CONFIG_OPTION,
    status: str | None = typer.Option(
        None,
        "--status",
        help="Only jobs in this state: queued, running, done, failed, skipped, review (held by a QC check).",
    ),
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many (newest first)."),
    as_json: bool = typer.Option(False, "--json", help="Write JSON instead of a table."),
) -> None:
    """List jobs, newest first, with their sends by state (a done job whose results a destination
    refused shows "1 refused")."""
    from db import job_queue, send_queue
    from db.node_tables import JOB_STATES
    from node.exceptions import NodeError

    if status is not None and status not in JOB_STATES:
        raise NodeError(f"--status {status!r} is not a job state; use one of {', '.join(JOB_STATES)}")
    sf = _session_factory(config)
    jobs = job_queue.list_jobs(sf, status=status, limit=limit)
    counts = send_queue.send_counts(sf, [j.id for j in jobs])
    if as_json:
        echo_json([{**_job_dict(j), "send_counts": counts.get(j.id, {})} for j in jobs])
        return
    table = Table(title="Jobs")
    for column in ("ID", "Study", "Run", "Status", "Reason", "Sends", "Model", "Seconds", "Created"):
        table.add_column(column)
    for j in jobs:
        reason = j.reason or _cautions_text(j.result)
        table.add_row(
            str(j.id),
            "…" + j.study_instance_uid[-16:],
            str(j.run),
            j.status,
            (reason[:60] + "…") if len(reason) > 60 else reason,
            _sends_text(counts.get(j.id, {})),
            j.model_label or "-",
            f"{sum(j.stages.values()):.2f}" if j.stages else "-",
            j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    print_table(table, console)


def _cautions_text(result: dict[str, Any] | None) -> str:
    """The QC cautions a job's result was sent with (node/qc.py), for the jobs table's reason column of a
    job that has no reason, e.g. "sent with caution small_tumour"; "" when none."""
    names = [str(c.get("name")) for c in ((result or {}).get("qc") or {}).get("cautions", [])]
    return f"sent with caution {', '.join(names)}" if names else ""


#: How ``segnode jobs list`` names each send state, in the order it lists them.
_SEND_WORDS = {
    "done": "sent",
    "pending": "pending",
    "refused": "refused",
    "superseded": "superseded",
    "dismissed": "dismissed",
}


def _sends_text(counts: dict[str, int]) -> str:
    """A job's sends by state for the jobs table, e.g. "1 sent, 1 refused"; "-" when it has none."""
    parts = [f"{counts[state]} {word}" for state, word in _SEND_WORDS.items() if counts.get(state)]
    parts += [f"{n} {state}" for state, n in sorted(counts.items()) if state not in _SEND_WORDS and n]
    return ", ".join(parts) or "-"


def _job_dict(j: Any) -> dict[str, Any]:
    return {
        "id": j.id,
        "study_instance_uid": j.study_instance_uid,
        "run": j.run,
        "status": j.status,
        "reason": j.reason,
        "stages": j.stages,
        "attempts": j.attempts,
        "instances": j.instance_count,
        "model": j.model_label,
        "output_dir": j.output_dir,
        "result": j.result,
        "created_at": j.created_at.isoformat(),
        "started_at": j.started_at.isoformat() if j.started_at else None,
        "finished_at": j.finished_at.isoformat() if j.finished_at else None,
        "sends": [
            {
                "destination": s.destination,
                "file": Path(s.path).name,
                "attempt": Path(s.path).parent.name,  # the job's output folder of that attempt
                "path": s.path,
                "status": s.status,
                "attempts": s.attempts,
                "last_error": s.last_error,
            }
            for s in j.sends
        ],
    }


def inference_text(inference: dict[str, Any]) -> str:
    """A job's ``inference`` record in words: the slice axes and mirror images averaged."""
    views = "sagittal, coronal and axial slices averaged" if inference.get("views") == 3 else (
        "slices along the model card's slice axis only")
    mirror = inference.get("mirror") or "none"
    return views + ("" if mirror == "none" else f", mirror images ({mirror}) averaged")


@jobs_app.command("show")
def jobs_show(
    job_id: int = typer.Argument(..., help="Job id."),
    config: Path | None = CONFIG_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Write JSON."),
) -> None:
    """Show one job: state, reason, stage timings, outputs and sends."""
    from db import job_queue

    info = _job_dict(job_queue.get_job(_session_factory(config), job_id))
    if as_json:
        echo_json(info)
        return
    table = Table(title=f"Job {job_id}", show_header=False)
    table.add_column("Key")
    table.add_column("Value")
    for key in (
        "status",
        "reason",
        "study_instance_uid",
        "run",
        "attempts",
        "instances",
        "model",
        "output_dir",
    ):
        table.add_row(key, str(info[key]))
    for key, value in _result_rows(info["result"]):
        table.add_row(key, value)
    for name, seconds in info["stages"].items():
        table.add_row(f"stage {name}", f"{seconds:.3f} s")
    for s in info["sends"]:  # named by attempt folder: a retry's sends sit beside the earlier attempt's
        table.add_row(
            f"send {s['destination']}",
            f"{s['attempt']}/{s['file']}: {s['status']} (tried {s['attempts']} times) {s['last_error']}",
        )
    print_table(table, console)


def _result_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures a reader needs, from a job's result: volumes, share, model, QC rules, release."""

    def ml(value: Any) -> str:
        return "-" if value is None else f"{value:.1f} mL"

    rows: list[tuple[str, str]] = []
    qc_figures = (result.get("qc") or {}).get("figures") or {}
    if "tumour_volume_ml" in result:
        share = result.get("tumour_share_of_brain_percent")
        brain_ml = result.get("brain_volume_ml")
        # A slab through the brain (node/qc.py): its brain is the part within the series' coverage.
        slab = bool(qc_figures.get("brain_slab")) and brain_ml is not None
        coverage = qc_figures.get("coverage_mm")
        within = "" if coverage is None else f" {coverage:.0f} mm"
        rows += [
            ("tumour volume", ml(result.get("tumour_volume_ml"))),
            ("brain volume within the series" if slab else "brain volume",
             "- (no brain mask)" if brain_ml is None
             else ml(brain_ml) + (f": the brain within the series'{within} coverage (a slab), not the whole "
                                  "brain" if slab else "")),
            ("tumour share of brain within the series" if slab else "tumour share of brain",
             "-" if share is None else f"{share:.1f} %"),
        ]  # fmt: skip
    model = result.get("model")
    if model:
        rows.append(("model name, version", f"{model.get('name')} {model.get('version')}"))
    inference = result.get("inference")
    if inference:
        rows.append(("inference", inference_text(inference)))
    if "brain_extractor" in result:  # None: no usable brain_extraction model when the job ran
        extractor = result["brain_extractor"]
        rows.append(("brain extractor", extractor or "none (brain stage skipped: no usable brain_extraction "
                     "model, so no brain mask)"))  # fmt: skip
    routing = result.get("routing")
    if routing:
        rows.append(("routing", str(routing.get("reason", ""))))
    early = result.get("early_analysis")
    if early is not None:
        done = ", ".join(early.get("reused") or []) or "nothing (the study's series changed after it)"
        rows.append(("early analysis", f"reused {done}"))
    for key, value in (result.get("regions_ml") or {}).items():
        rows.append((key.replace("_", " "), ml(value)))
    basis = result.get("series_basis") or {}
    labels = result.get("series_labels") or {}
    if labels:
        from node.selection import role_texts

        rows += [(f"series {role}", text) for role, text in role_texts(labels, basis)]
    else:  # a job recorded before series_labels: the T1 and T1GD bases alone
        rows += [(f"series {role}", why) for role, why in basis.items()]
    for line in result.get("series_replaced") or []:
        rows.append(("series replaced", line))
    for entry in result.get("not_used") or []:
        rows.append(("not used", f"{entry.get('series')}: {entry.get('reason')}"))
    missing = result.get("instances_missing") or []
    if missing:
        left_out = ", ".join(missing)
        rows.append(("instances missing", f"{len(missing)} without a spool file, left out: {left_out}"))
    registration = result.get("registration") or {}
    for modality, entry in (registration.get("series") or {}).items():
        figures = (
            f"{entry.get('translation_mm', 0):.1f} mm, {entry.get('rotation_deg', 0):.1f} deg, "
            f"{entry.get('edge_displacement_mm', 0):.1f} mm at the brain's edge, "
            f"MI {entry.get('metric_start', 0):.3f} -> {entry.get('metric_final', 0):.3f}"
            if "translation_mm" in entry
            else "geometry only"
        )
        verdict = "ok" if entry.get("ok") else f"failed: {entry.get('reason')}"
        if entry.get("same_frame_of_reference") is False:
            # The figures are beyond the start, which holds the arbitrary offset between the frames:
            # "0.3 mm" alone read as "the patient did not move".
            start = str(entry.get("method") or "").split(" + ")[0] or "start"
            offset = entry.get("start_offset_mm")
            placed = f" {offset:.1f} mm apart" if offset is not None else ""
            figures = (
                f"another Frame of Reference, started from the {start}{placed} (the offset between "
                f"the frames, no motion); beyond that start: {figures}"
                if "translation_mm" in entry
                else f"another Frame of Reference, placed by the {start} alone (no rigid registration)"
            )
        rows.append(
            (f"registration {modality}", f"onto {registration.get('reference')}: {figures}; {verdict}")
        )
    if qc_figures.get("coverage_mm") is not None:
        cut = qc_figures.get("brain_cut")
        rows.append((
            "series coverage",
            f"{qc_figures['coverage_mm']:.0f} mm along the slice normal"
            + ("; the brain is cut by the series' field of view" if cut else "")
            + ("; the series covers the whole brain" if cut is False else ""),
        ))  # fmt: skip
    if qc_figures.get("whole_tumour_model_ml") is not None:  # a several-series model's check (node/qc.py)
        dice = qc_figures.get("whole_tumour_dice")
        # With [qc] whole_tumour_from_flair_model the result's tumour is that model's: compared, the
        # several-series model's own.
        own = qc_figures.get("model_tumour_volume_ml")
        mine = ml(qc_figures.get("tumour_volume_ml") if own is None else own)
        rows.append((
            "whole tumour, whole_tumor model",
            f"{ml(qc_figures['whole_tumour_model_ml'])} against "
            + ("this result's " if own is None else "the several-series model's own ") + mine
            + ("; not on one grid" if dice is None else f"; Dice {dice:.2f}")
            + ("" if own is None else "; the result takes its whole tumour from the whole_tumor model"),
        ))  # fmt: skip
    for rule in (result.get("qc") or {}).get("rules", []):
        rows.append((f"qc {rule['name']}", f"{rule['status']}: {rule['message']}"))
    for caution in (result.get("qc") or {}).get("cautions", []):  # sent with the result, in its SR
        rows.append((f"qc caution {caution['name']}", str(caution["message"])))
    if result.get("released_by"):
        rows.append(("released", f"by {result['released_by']} at {result.get('released_at')}"))
    return rows


@jobs_app.command("retry")
def jobs_retry(
    job_id: int = typer.Argument(..., help="Job id."),
    config: Path | None = CONFIG_OPTION,
    send_anyway: bool = typer.Option(
        False,
        "--send-anyway",
        help="For a job in review: send the SEG and SR it wrote, as they are (the model does not run "
        "again), to the config's destinations, and mark it done.",
    ),
    by: str | None = typer.Option(
        None, "--by", help="Who reviewed it (recorded on the job; default: the login name)."
    ),
) -> None:
    """Queue a finished job, its study's latest run, again (a new result is produced and sent), or send a
    reviewed one anyway."""
    from db import job_queue

    sf = _session_factory(config)
    if not send_anyway:
        info = job_queue.retry_job(sf, job_id)
        console.print(f"job {info.id} queued again")
        return
    import getpass

    from node.config import load_settings
    from node.exceptions import NodeError

    settings = load_settings(config, check_files=False)  # the destinations; the node's TLS key is its own
    if not settings.destinations:
        raise NodeError("the config has no [[destinations]]: there is nowhere to send the job's outputs")
    job = job_queue.get_job(sf, job_id)
    missing = [o["path"] for o in job.result.get("outputs") or [] if not Path(o["path"]).is_file()]
    if missing:
        raise NodeError(f"job {job_id}: output {missing[0]} is gone; retry the job without --send-anyway")
    info = job_queue.release_job(sf, job_id, by=by or getpass.getuser(), destinations=settings.destinations)
    files = ", ".join(Path(o["path"]).name for o in info.result.get("outputs") or [])
    console.print(
        f"job {info.id} released by {info.result['released_by']}: {files} queued to "
        f"{', '.join(d.name for d in settings.destinations)}"
    )



@jobs_app.command("dismiss")
def jobs_dismiss(
    job_id: int = typer.Argument(..., help="Job id."),
    config: Path | None = CONFIG_OPTION,
    reason: str = typer.Option(
        "", "--reason", help="Why (e.g. sent by hand, the destination was wrong); kept on the job or sends."
    ),
    by: str | None = typer.Option(None, "--by", help="Who dismisses them (default: the login name)."),
) -> None:
    """Acknowledge a job's sends that a destination refused for good, or a result held in review that is
    not to be sent: the sends end dismissed and no longer count as undelivered (for a job that cannot be
    retried: its study has left the spool); a held job ends skipped, no longer counts as held, and its
    study leaves the spool as any result not sent."""
    import getpass

    from db import job_queue, send_queue

    who = by or getpass.getuser()
    sf = _session_factory(config)
    if job_queue.get_job(sf, job_id).status == "review":
        job_queue.dismiss_held_job(sf, job_id, by=who, reason=reason.strip())
        console.print(f"job {job_id}: held result dismissed by {who}; nothing sent")
        return
    count = send_queue.dismiss_refused_sends(sf, job_id, by=who, reason=reason.strip())
    console.print(f"job {job_id}: {count} refused sends dismissed by {who}")
