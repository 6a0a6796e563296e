"""DCMTK's command-line programs found on PATH past pynetdicom's namesakes.

pynetdicom installs Python programs named like DCMTK's (storescu, storescp, echoscu, ...) into its
environment's ``bin``, which an activated virtual environment puts first on PATH. Their options differ
from DCMTK's (no ``-xs``, ``--fork``, ``-xcr``), so a plain ``shutil.which("storescu")`` in an activated
environment finds the wrong program: a benchmark would time pynetdicom's client as if it were DCMTK's,
and a command written for DCMTK fails with a usage message.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: The programs pynetdicom installs (pynetdicom.apps) that share a name with a DCMTK program.
PYNETDICOM_NAMESAKES = frozenset(
    {"echoscp", "echoscu", "findscu", "getscu", "movescu", "qrscp", "storescp", "storescu"}
)


def _is_python_script(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            first = fh.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def dcmtk_program(name: str) -> str | None:
    """Absolute path of the DCMTK program ``name``: the first on PATH that is not a Python script
    (pynetdicom's programs of the same name are); None when DCMTK's is not installed."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which(name, path=directory or os.curdir)
        if found and not _is_python_script(Path(found)):
            return os.path.abspath(found)
    return None
