#!/usr/bin/env python3
"""Print pyproject.toml's requirements (core + train + postgres extras) without the named packages.

Used by trainer-gaudi.Dockerfile so that pip keeps the base image's own torch build::

    python requirements_without.py pyproject.toml torch > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

EXTRAS = ("train", "postgres")


def requirement_name(requirement: str) -> str:
    """Normalised distribution name of a PEP 508 requirement (``psycopg[binary]==3`` -> psycopg)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements_without(pyproject: Path, excluded: set[str]) -> list[str]:
    """Core and EXTRAS requirements of ``pyproject`` whose names are not in ``excluded``."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS:
        wanted += project["optional-dependencies"][extra]
    drop = {requirement_name(e) for e in excluded}
    return [r for r in wanted if requirement_name(r) not in drop]


def main(argv: list[str]) -> int:
    """Command line: ``requirements_without.py PYPROJECT NAME...``."""
    if len(argv) < 2:
        sys.stderr.write("usage: requirements_without.py PYPROJECT NAME...\n")
        return 2
    for line in requirements_without(Path(argv[0]), set(argv[1:])):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
