"""The shipped demo case: its NOTICE names every file by sha256, it is no holdout case, and no shipped
model trained on it (it is a validation case of each)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from db.card import load_card
from node.demo import DEFAULT_CASE, DEFAULT_MODEL, case_role
from tests.helpers.peers import REPO, require_shared

NOTICE = DEFAULT_CASE.parent / "NOTICE"
#: Every model directory the repository ships (the default and the candidates an administrator may add).
SHIPPED_MODELS = [p.parent for p in sorted((REPO / "models").glob("**/split.json"))]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _notice_rows() -> dict[str, tuple[int, str]]:
    """File name -> (bytes, sha256) from the NOTICE's file table."""
    rows = {}
    for line in NOTICE.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].endswith(".nii.gz"):
            rows[parts[0]] = (int(parts[1]), parts[2])
    return rows


def test_notice_lists_every_file_of_the_demo_case_by_size_and_sha256() -> None:
    files = {p.name: (p.stat().st_size, _sha256(p)) for p in DEFAULT_CASE.iterdir()}
    assert files, DEFAULT_CASE
    assert _notice_rows() == files
    assert f"the segnode demo case {DEFAULT_CASE.name}" in NOTICE.read_text(encoding="utf-8")


def test_demo_case_is_no_holdout_case() -> None:
    """Neither by name nor by content: the manifest's holdout rows are compared, the holdout itself is
    not opened."""
    manifest = require_shared("MANIFEST.tsv")
    with manifest.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    holdout = [row for row in rows if row["file"].startswith("holdout/")]
    assert holdout, "the manifest lists no holdout file"
    assert not [row["file"] for row in holdout if f"/{DEFAULT_CASE.name}/" in row["file"]]
    shipped = {_sha256(p) for p in DEFAULT_CASE.iterdir()}
    assert not [row["file"] for row in holdout if row["sha256"] in shipped]


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
