"""Reading and writing the model card, ``model.json`` (docs/model-card.md). No torch here.

The card says what a model expects (modalities, preprocessing), what it outputs, which files
hold it (with sha256 and size) and how well each artifact did.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer.exceptions import ModelCardError

logger = logging.getLogger(__name__)

CARD_NAME = "model.json"
FORMAT_VERSION = 1
TASKS = ("whole_tumor", "brats_regions")

#: The labels block of each task (DICOM codes from DESIGN.md, "Codes for segments").
_CATEGORY = {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically abnormal structure"}
TASK_LABELS: dict[str, list[dict[str, Any]]] = {
    "whole_tumor": [
        {
            "value": 1,
            "name": "Whole tumour",
            "category": _CATEGORY,
            "type": {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"},
        },
    ],
    "brats_regions": [
        {
            "value": 1,
            "name": "Edema",
            "category": _CATEGORY,
            "type": {"scheme": "SCT", "code": "79654002", "meaning": "Edema"},
        },
        {
            "value": 2,
            "name": "Non-enhancing tumour",
            "category": _CATEGORY,
            "type": {"scheme": "SCT", "code": "6574001", "meaning": "Necrosis"},
        },
        {
            "value": 3,
            "name": "Enhancing tumour",
            "category": _CATEGORY,
            "type": {"scheme": "NCIt", "code": "C113842", "meaning": "Enhancing Lesion"},
        },
    ],
}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, base_dir: Path) -> dict[str, Any]:
    """``{"path", "sha256", "size"}`` of ``path``, the path relative to ``base_dir``."""
    return {
        "path": path.relative_to(base_dir).as_posix(),
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
    }


def load_card(path: Path) -> dict[str, Any]:
    """Read and check a model card (a ``model.json`` file or the directory holding one).

    Raises
    ------
    ModelCardError
        The file is missing, not JSON, or lacks a required key; the message names the file.
    """
    file = path / CARD_NAME if path.is_dir() else path
    if not file.is_file():
        raise ModelCardError(f"model card {file} does not exist")
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelCardError(f"model card {file} is not valid JSON: {exc}") from None
    check_card(card, str(file))
    return dict(card)


def check_card(card: Mapping[str, Any], where: str = "model card") -> None:
    """Check the keys the trainer and the node rely on.

    Raises
    ------
    ModelCardError
        A key is missing or holds a bad value.
    """
    if not isinstance(card, Mapping):
        raise ModelCardError(f"{where}: top level must be an object, got {type(card).__name__}")
    for key in ("name", "version", "task", "modalities", "preprocessing", "output"):
        if key not in card:
            raise ModelCardError(f"{where}: missing key {key!r}")
    if card["task"] not in TASKS:
        raise ModelCardError(f"{where}: task {card['task']!r} is not one of {', '.join(TASKS)}")
    mods = card["modalities"]
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise ModelCardError(f"{where}: modalities {mods!r} must be a non-empty list of names")
    activation = card["output"].get("activation") if isinstance(card["output"], Mapping) else None
    if activation not in ("sigmoid", "softmax"):
        raise ModelCardError(f"{where}: output.activation {activation!r} is not 'sigmoid' or 'softmax'")


def artifact(card: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The artifact entry with ``key`` (``checkpoint``, ``onnx``, ``ir_fp32``, ``ir_int8``).

    Raises
    ------
    ModelCardError
        The card has no such artifact.
    """
    for entry in card.get("artifacts", []):
        if entry.get("key") == key:
            return dict(entry)
    have = ", ".join(str(a.get("key")) for a in card.get("artifacts", [])) or "none"
    raise ModelCardError(f"model card {card.get('name')!r} has no artifact {key!r} (has: {have})")


def ir_xml(card: Mapping[str, Any], directory: Path, precision: str = "int8") -> Path:
    """Path of the OpenVINO IR ``.xml`` of ``precision`` (``fp32`` or ``int8``) in ``directory``."""
    entry = artifact(card, f"ir_{precision}")
    for f in entry.get("files", []):
        if str(f.get("path", "")).endswith(".xml"):
            return directory / f["path"]
    raise ModelCardError(f"model card {card.get('name')!r}: artifact ir_{precision} lists no .xml file")


def verify_files(card: Mapping[str, Any], directory: Path) -> list[str]:
    """Problems with the card's files in ``directory`` (missing, size or sha256 mismatch); empty if fine."""
    problems = []
    for entry in card.get("artifacts", []):
        for f in entry.get("files", []):
            path = directory / f["path"]
            if not path.is_file():
                problems.append(f"{path}: missing (artifact {entry.get('key')})")
            elif sha256_file(path) != f["sha256"]:
                problems.append(f"{path}: sha256 differs from the card's {f['sha256'][:12]}...")
    return problems


def record_evaluation(directory: Path, result: Mapping[str, Any], split: str, data: str) -> None:
    """Add an evaluation (``segnode evaluate --record``) to the card's ``evaluations`` list.

    The entry names the split and data folder, the precision, the mean and per-case metrics; an
    earlier entry for the same split and precision is replaced. Artifact ``metrics`` (the ones the
    promotion gate compares) are left alone.
    """
    card = load_card(directory)
    entry = {
        "split": split,
        "data": data,
        "precision": result.get("precision"),
        "cases": [c["case"] for c in result["cases"]],
        "mean": result["mean"],
        "per_case": [{k: v for k, v in c.items() if k != "seconds"} for c in result["cases"]],
    }
    kept = [
        e
        for e in card.get("evaluations", [])
        if (e.get("split"), e.get("precision")) != (split, entry["precision"])
    ]
    card["evaluations"] = [*kept, entry]
    write_card(card, directory)


def write_card(card: Mapping[str, Any], directory: Path) -> Path:
    """Write ``card`` as ``directory/model.json`` (indented, keys in card order)."""
    check_card(card, str(directory / CARD_NAME))
    path = directory / CARD_NAME
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path
