"""DCMTK's programs are found past pynetdicom's namesakes, which an activated virtual environment puts
first on PATH (node/dcmtk_programs.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.dcmtk_programs import PYNETDICOM_NAMESAKES, dcmtk_program
from tests.helpers.peers import require_program


def test_storescu_is_dcmtks_even_behind_an_activated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    environment_bin = Path(sys.executable).parent
    namesake = environment_bin / "storescu"
    if not namesake.exists():
        pytest.skip(f"pynetdicom's storescu is not installed in {environment_bin}")
    monkeypatch.setenv("PATH", os.pathsep.join([str(environment_bin), os.environ.get("PATH", "")]))
    assert shutil.which("storescu") == str(namesake)  # what a plain lookup finds
    found = require_program("storescu")
    assert found == dcmtk_program("storescu") and Path(found).parent != environment_bin
    # DCMTK's options, which pynetdicom's storescu refuses with a usage message:
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert "dcmtk" in version.stdout.lower(), version.stdout + version.stderr


def test_a_python_script_is_never_taken_for_a_dcmtk_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "echoscu"
    script.write_text("#!/usr/bin/env python3\nprint('not DCMTK')\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "echoscu" in PYNETDICOM_NAMESAKES
    assert dcmtk_program("echoscu") is None
    binary = tmp_path / "echoscu"
    binary.write_bytes(b"\x7fELF not really")
    assert dcmtk_program("echoscu") == str(binary)
