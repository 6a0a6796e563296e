"""The shipped demo case: its NOTICE names every file by sha256, it is no holdout case, and no shipped
model trained on it (it is a validation case of each)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from db.card import load_card, sha256_file
from node.demo import DEFAULT_CASE, DEFAULT_MODEL, case_role
from tests.helpers.peers import REPO, require_shared

NOTICE = DEFAULT_CASE.parent / "NOTICE"
#: Every model directory the repository ships (the default and the candidates an administrator may add).
SHIPPED_MODELS = [p.parent for p in sorted((REPO / "models").glob("**/split.json"))]


def _notice_rows() -> dict[str, tuple[int, str]]:
    """File name -> (bytes, sha256) from the NOTICE's file table."""
    rows = {}
    for line in NOTICE.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].endswith(".nii.gz"):
            rows[parts[0]] = (int(parts[1]), parts[2])
    return rows


def test_notice_lists_every_file_of_the_demo_case_by_size_and_sha256() -> None:
    files = {p.name: (p.stat().st_size, sha256_file(p)) for p in DEFAULT_CASE.iterdir()}
    assert files, DEFAULT_CASE
    assert _notice_rows() == files
    assert f"the segnode demo case {DEFAULT_CASE.name}" in NOTICE.read_text(encoding="utf-8")


def _holdout_rows() -> list[dict[str, str]]:
    """The data manifest's rows of holdout files (the holdout itself is not opened)."""
    manifest = require_shared("MANIFEST.tsv")
    with manifest.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    holdout = [row for row in rows if row["file"].startswith("holdout/")]
    assert holdout, "the manifest lists no holdout file"
    return holdout


def test_demo_case_is_no_holdout_case() -> None:
    """Neither by name nor by content."""
    holdout = _holdout_rows()
    assert not [row["file"] for row in holdout if f"/{DEFAULT_CASE.name}/" in row["file"]]
    shipped = {sha256_file(p) for p in DEFAULT_CASE.iterdir()}
    assert not [row["file"] for row in holdout if row["sha256"] in shipped]


def test_no_file_of_the_repository_is_a_holdout_file() -> None:
    """No tracked file (a model, a fixture, a figure's source) is a copy of a holdout file: files of a
    holdout file's size are hashed and compared with the manifest's sha256."""
    holdout = _holdout_rows()
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: its tracked files are unknown")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    sizes = {int(row["bytes"]) for row in holdout}
    copies = []
    for name in listed.decode().split("\0"):
        path = REPO / name
        if name and path.is_file() and path.stat().st_size in sizes:
            digest = sha256_file(path)
            copies += [f"{name} = {row['file']}" for row in holdout if row["sha256"] == digest]
    assert not copies


@pytest.mark.parametrize("model", SHIPPED_MODELS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_shipped_model_trained_on_the_demo_case(model: Path) -> None:
    split = json.loads((model / "split.json").read_text(encoding="utf-8"))
    assert DEFAULT_CASE.name not in split["train"]
    assert DEFAULT_CASE.name in split["val"]


def test_case_role_is_what_the_case_was_to_the_models_training_run() -> None:
    card = {"training": {"split": {"train": ["a"], "val": ["b"]}}}
    assert [case_role(card, c) for c in ("a", "b", "c")] == ["training", "validation", None]
    assert case_role({"training": {}}, "a") is None
    assert case_role(load_card(DEFAULT_MODEL), DEFAULT_CASE.name) == "validation"
