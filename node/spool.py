"""The durable spool: each received instance written to disk before its success status goes back.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, every component a
validated UID (:mod:`node.uids`), so nothing from the wire ever becomes a path by itself. A file is
written to a temporary name in the same directory, flushed and fsynced, then atomically renamed, and
the directory is fsynced, so a crash leaves either the whole file or none; a study or series
directory made for a file is synced in its parent too.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from node.exceptions import SpoolError
from node.uids import validated_uid

logger = logging.getLogger(__name__)


def spool_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """The spool file for an instance; every UID is validated before it touches the path."""
    parts = [
        validated_uid(study_uid, "StudyInstanceUID"),
        validated_uid(series_uid, "SeriesInstanceUID"),
        validated_uid(sop_uid, "SOPInstanceUID"),
    ]
    return spool_dir / parts[0] / parts[1] / f"{parts[2]}.dcm"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Directories whose entry in their parent this process has synced (or made and synced).
_DURABLE_DIRS: set[Path] = set()
_DURABLE_DIRS_MAX = 100_000  # then forgotten: at worst one more sync per series


def make_dirs_durably(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each new entry synced in its parent; a directory
    that exists but that this process has not seen synced (another thread or receiving process may
    have just made it) gets its parent synced once.

    A file's directory fsync makes its name durable in that directory only; a study's or series'
    directory made for the instance must itself be durable in its parent, or a power loss can take
    the whole directory, acknowledged files and all. Costs a sync once per series and process.
    """
    if directory in _DURABLE_DIRS and directory.is_dir():  # spool retention may have removed it
        return
    missing = []
    probe = directory
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if not missing:  # made by someone else, who may not have synced its parent yet
        _fsync_dir(directory.parent)
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # made meanwhile by another thread or receiving process
            if not new.is_dir():
                raise
        _fsync_dir(new.parent)
    if len(_DURABLE_DIRS) >= _DURABLE_DIRS_MAX:
        _DURABLE_DIRS.clear()
    _DURABLE_DIRS.add(directory)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename, fsync of the directory (and of
    the parents of any directory made for it).

    Raises
    ------
    SpoolError
        The file could not be written (disk full, permissions); nothing is left at ``path``.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        make_dirs_durably(path.parent)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fdatasync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SpoolError(f"spool file {path}: cannot write: {exc.strerror or exc}") from exc


def free_mb(directory: Path) -> float:
    """Free space in MiB on the file system that holds ``directory`` (or its nearest existing parent)."""
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free / (1024 * 1024)
