"""File checksums: sha256 and size, as recorded in the model table and the model card."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """The result of checking one registered file against its recorded sha256 and size.

    ``status`` is ``"ok"``, ``"missing"`` (no such file) or ``"mismatch"`` (size or sha256 differ).
    """

    path: Path
    expected_sha256: str
    expected_size: int
    actual_sha256: str | None
    actual_size: int | None
    status: str

    @property
    def ok(self) -> bool:
        """True when the file is present and matches."""
        return self.status == "ok"

    def describe(self) -> str:
        """One line for humans: ``path: ok``, ``path: missing``, ``path: sha256 ... != recorded ...``."""
        if self.status == "missing":
            return f"{self.path}: missing"
        if self.status == "mismatch":
            if self.actual_size != self.expected_size:
                return f"{self.path}: size {self.actual_size} != recorded {self.expected_size}"
            return (
                f"{self.path}: sha256 {str(self.actual_sha256)[:12]}... != recorded "
                f"{self.expected_sha256[:12]}..."
            )
        return f"{self.path}: ok"


def check_file(path: Path, sha256: str, size: int) -> FileCheck:
    """Compare the file at ``path`` with the recorded ``sha256`` and ``size`` (size first: cheap)."""
    if not path.is_file():
        return FileCheck(path, sha256, size, None, None, "missing")
    actual_size = path.stat().st_size
    if actual_size != size:
        return FileCheck(path, sha256, size, None, actual_size, "mismatch")
    actual = sha256_file(path)
    return FileCheck(path, sha256, size, actual, actual_size, "ok" if actual == sha256 else "mismatch")
