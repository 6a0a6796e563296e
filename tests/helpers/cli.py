"""Running the ``segnode`` root CLI in-process, as a user would from a shell."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from node.cli import main
from tests.helpers.peers import REPO


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """``segnode ARGS``: its exit code, stdout and stderr (output from before the call is dropped)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["segnode", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def segnode_process(
    *args: str, cwd: Path = REPO, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``segnode ARGS`` in a process of its own (``python -m node``), run in ``cwd`` (the repository)
    with ``env`` (None: this process's), its output captured as text; never raises on its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        cwd=cwd,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def rich_tables(text: str) -> list[list[dict[str, str]]]:
    """The tables Rich printed in ``text`` (heavy-head box style, cells on one line each: a wide enough
    console), each as its rows, a row as header -> cell."""
    tables: list[list[dict[str, str]]] = []
    header: list[str] = []
    for line in text.splitlines():
        if line.startswith("┃"):
            header = [c.strip() for c in line.strip().strip("┃").split("┃")]
            tables.append([])
        elif line.startswith("│") and tables:
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            tables[-1].append(dict(zip(header, cells, strict=True)))
    return tables


def render(renderable: object, width: int = 250) -> str:
    """What Rich prints for ``renderable`` on a console ``width`` columns wide."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width)
    console.print(renderable)
    return console.file.getvalue()
