"""Peers a test needs (programs, shared data): skip with the reason when one is missing, or fail under
SEGNODE_REQUIRE_PEERS=1."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from node.dcmtk_programs import PYNETDICOM_NAMESAKES, dcmtk_program

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("SEGNODE_SHARED_DATA", REPO.parent / "shared" / "data"))
REQUIRE_PEERS = os.environ.get("SEGNODE_REQUIRE_PEERS") == "1"


def missing(reason: str) -> None:
    """Skip the test for ``reason``; under SEGNODE_REQUIRE_PEERS=1 fail instead."""
    if REQUIRE_PEERS:
        pytest.fail(f"SEGNODE_REQUIRE_PEERS=1 but {reason}")
    pytest.skip(reason)


def require_program(name: str, *extra_dirs: str) -> str:
    """Absolute path of program ``name`` (searched on PATH and in ``extra_dirs``) or skip/fail.

    A DCMTK name that pynetdicom also installs (storescu, storescp, echoscu, ...) finds DCMTK's program
    even when an activated virtual environment puts pynetdicom's first on PATH.
    """
    found = dcmtk_program(name) if name in PYNETDICOM_NAMESAKES else shutil.which(name)
    for d in extra_dirs:
        if found:
            break
        found = shutil.which(name, path=d)
    if not found:
        missing(f"program {name!r} is not installed (Debian package; .ci/run installs it)")
    assert found is not None
    return found


def require_shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip/fail when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        missing(f"shared data {path} is absent")
    return path



#: dciodvfy checks a CodingSchemeDesignator against its own fixed list of designators (a few vendors'
#: private ones among them), not against the object's Coding Scheme Identification Sequence: the
#: node's declared private scheme 99SEGNODE (node/sr.py) stays an "unrecognized defined term" to it.
DCIODVFY_PRIVATE_SCHEME = "Warning - Unrecognized defined term <99SEGNODE> for value 1 of attribute"


def dciodvfy_problems(path: Path) -> list[str]:
    """dciodvfy's (dicom3tools) Error and Warning lines for the DICOM file at ``path``, as the end-to-end
    test reads them (skip/fail when dciodvfy is not installed). One run takes ~10-50 ms."""
    report = subprocess.run(
        [require_program("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (report.stdout + report.stderr).splitlines()
    return [line for line in lines if "Error" in line or "Warning" in line]
