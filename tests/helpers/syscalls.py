"""What a Python snippet syncs to disk, watched with strace (a power loss cannot be staged in a test,
so the durability tests check that the right files and directories are synced instead)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers.peers import require_program

ROOT = Path(__file__).resolve().parents[2]
_SYNC = re.compile(r"\b(?:fsync|fdatasync)\(\d+<(?P<path>[^>]*)>\)\s*=\s*0")


def synced_paths(code: str, *args: str, trace: Path) -> list[str]:
    """Run ``code`` (``python -c``, from the repository root, with ``args``) under strace and return
    the path of every successful fsync or fdatasync, in order. Skips (fails in CI) without strace."""
    strace = require_program("strace")
    proc = subprocess.run(
        [strace, "-f", "-y", "-e", "trace=fsync,fdatasync", "-o", str(trace),
         sys.executable, "-c", code, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [m["path"] for m in map(_SYNC.search, trace.read_text().splitlines()) if m]
