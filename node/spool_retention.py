"""Spool retention: a study's received files leave the spool ``[node] spool_keep_hours`` after its
result was delivered (or its refusal dismissed), or ``[node] failed_keep_hours`` after its analysis failed
or was skipped, so that the spool does not grow until the free-disk floor refuses every PACS. The
outputs of its jobs (SEG, SR, preview under the jobs directory) go with them, except those of a run
with a send still pending (an earlier run's refusal is superseded by the later run's delivery; a refusal
of the run delivering the result keeps the whole study), and those of its done runs when none of its
runs queued a send (no ``[[destinations]]``: the jobs directory holds the only copy of its result,
kept until removed by hand).

Which studies qualify is the database's call (:func:`db.retention.removable_studies`: result done and
every send acknowledged, or the latest run failed or skipped; nothing received since, no run queued or
running); held studies and studies with a send pending or refused (not dismissed) keep their files.
Each study is checked again and taken out of use (its rows marked) in one transaction first, so that
a retry accepted meanwhile keeps its files; then files are removed, rows forgotten last, and only
paths inside the spool are ever touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from db import retention
from db.transactions import SessionFactory, utcnow
from node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

#: Seconds between two retention passes of the worker loop.
RETENTION_CHECK_SECONDS = 300.0
#: A spool write's temporary file older than this was left by a killed process (node/spool.py).
STALE_TEMPORARY_SECONDS = 3600.0
#: Seconds between two sweeps of the whole spool for such files (:func:`sweep_stale_temporaries`).
STALE_SWEEP_SECONDS = 6 * 3600.0
#: Rows of ignored (not kept) instances deleted per statement, and statements per pass.
IGNORED_BATCH, IGNORED_BATCHES_PER_PASS = 1000, 10


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed process left in ``directory`` (never acknowledged instances)."""
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    for tmp in directory.glob(".*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except FileNotFoundError:
            pass


def sweep_stale_temporaries(spool_dir: Path) -> int:
    """Delete the temporary files killed processes left anywhere in the spool (over
    :data:`STALE_TEMPORARY_SECONDS` old), and the series and study directories that leaves empty;
    returns how many were deleted.

    :func:`remove_spooled` removes those beside the files of a study it removes, but one in a series or
    study with no recorded instance (the process was killed writing its first file) has no row that
    would lead a pass there, and stayed for ever. The node sweeps at start and every
    :data:`STALE_SWEEP_SECONDS`: a walk of the whole spool, too long for every pass."""
    root = spool_dir.resolve()
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    removed = 0
    emptied: set[Path] = set()
    for folder, _, names in os.walk(root):
        for name in names:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            tmp = Path(folder) / name
            try:
                if tmp.lstat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
                    emptied.add(Path(folder))
            except FileNotFoundError:
                pass
    for directory in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        while directory != root and directory.is_relative_to(root):
            try:
                os.rmdir(directory)  # only when empty: a file received meanwhile keeps its directory
            except OSError:
                break
            directory = directory.parent
    if removed:
        logger.info("spool retention: %d temporary files left by killed processes removed", removed)
    return removed


def remove_spooled(paths: Iterable[str], spool_dir: Path) -> int:
    """Delete these spool files and the series and study directories they leave empty; returns the
    number of files deleted. A path outside ``spool_dir`` is logged and left alone."""
    root = spool_dir.resolve()
    removed = 0
    parents: set[Path] = set()
    for raw in paths:
        path = Path(raw).resolve()
        if not path.is_relative_to(root) or path == root:
            logger.warning("spool retention: a row's path lies outside the spool %s; left alone", root)
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:  # removed by an earlier pass that stopped before forgetting the rows
            pass
        parents.add(path.parent)
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        while directory != root and directory.is_relative_to(root):
            _remove_stale_temporaries(directory)
            try:
                os.rmdir(directory)  # only when empty: a file received meanwhile keeps its directory
            except OSError:
                break
            directory = directory.parent
    return removed


def remove_job_outputs(job_ids: Iterable[int], jobs_dir: Path) -> int:
    """Delete these jobs' output directories (``jobs_dir/<job id>``); returns how many existed."""
    removed = 0
    for job_id in job_ids:
        directory = jobs_dir / str(int(job_id))
        if directory.is_symlink() or not directory.is_dir():
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed += 1
    return removed


def forget_ignored(sf: SessionFactory, received_before: datetime) -> int:
    """Forget the rows of instances acknowledged and not kept (non-MR) received before
    ``received_before``, in batches, at most :data:`IGNORED_BATCHES_PER_PASS` per pass; returns how
    many rows were deleted."""
    forgotten = 0
    for _ in range(IGNORED_BATCHES_PER_PASS):
        batch = retention.forget_ignored_instances(sf, received_before, IGNORED_BATCH)
        forgotten += batch
        if batch < IGNORED_BATCH:
            break
    if forgotten:
        logger.info("spool retention: %d rows of ignored (not kept) instances forgotten", forgotten)
    return forgotten


def _what(study: retention.RemovableStudy) -> str:
    """What became of a removed study's result, for its log line."""
    if study.status != "done":
        return f"{study.status} (no result sent) in job {study.job_id}"
    if study.delivery == "unsent":
        return f"done in job {study.job_id}, nothing sent (no destination), its outputs kept,"
    if study.delivery == "dismissed":
        return f"done in job {study.job_id}, its result refused by a destination and the refusal dismissed,"
    return f"delivered by job {study.job_id}"


def _cutoff(now: datetime, keep_hours: float) -> datetime | None:
    return None if keep_hours <= 0 else now - timedelta(hours=keep_hours)


def apply_retention(
    sf: SessionFactory,
    spool_dir: Path,
    keep_hours: float,
    failed_keep_hours: float = 0.0,
    metrics: NodeMetrics | None = None,
    now: datetime | None = None,
    jobs_dir: Path | None = None,
) -> int:
    """One retention pass: the spool files of every study delivered more than ``keep_hours`` ago, and
    of every study whose latest run failed or was skipped more than ``failed_keep_hours`` ago, leave
    the spool and their rows are forgotten (0 turns a rule off); returns the number of files removed.
    Each study is checked again and its instance rows marked not kept in one transaction
    (:func:`db.retention.begin_removal`) before anything is removed, so that a ``segnode jobs retry``
    accepted since the list was read keeps the study's files and one arriving after is refused. With
    ``jobs_dir``, the outputs of those studies' jobs that have no send pending are removed, then the
    spool files, then the rows are forgotten (a crash in between leaves the marked rows: the next pass
    repeats it). The rows of instances acknowledged and not kept (non-MR) are forgotten
    ``failed_keep_hours`` after they arrived (:func:`forget_ignored`)."""
    stamp = now or utcnow()
    delivered_before, failed_before = _cutoff(stamp, keep_hours), _cutoff(stamp, failed_keep_hours)
    if delivered_before is None and failed_before is None:
        return 0
    if failed_before is not None:
        forget_ignored(sf, failed_before)
    total = 0
    for found in retention.removable_studies(sf, delivered_before, failed_before):
        # Checked again and taken out of use in one transaction: a `segnode jobs retry` (or an
        # instance) accepted since the list was read keeps the study; one arriving after is refused.
        study = retention.begin_removal(sf, found.study_instance_uid, delivered_before, failed_before)
        if study is None:
            logger.info(
                "spool retention: study %s was retried or received meanwhile; its files stay",
                found.study_instance_uid,
            )
            continue
        outputs = remove_job_outputs(study.finished_job_ids, jobs_dir) if jobs_dir is not None else 0
        removed = remove_spooled(study.paths, spool_dir)
        retention.forget_instances(sf, study.instance_ids)
        total += removed
        if metrics is not None:
            metrics.spool_removed.labels(study.status).inc(removed)
        hours = (stamp - study.finished_at).total_seconds() / 3600
        logger.info(
            "spool retention: study %s %s %.0f h ago: %d files removed, outputs of %d job(s)",
            study.study_instance_uid, _what(study), hours, removed, outputs,
        )
    return total
