"""Running the ``segnode`` root CLI in-process, as a user would from a shell."""

from __future__ import annotations

import sys

import pytest

from node.cli import main


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
