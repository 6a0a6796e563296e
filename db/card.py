"""Reading a model directory: ``model.json`` (docs/model-card.md) and the files it lists.

:func:`read_model_dir` checks everything before the registry touches the database: the card's
structure, that every listed file exists inside the directory, and that its size and sha256 match
what the card says. Any problem raises :class:`~db.exceptions.InvalidModelDirectory` naming the file,
the attribute and the bad value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from db.checksums import check_file
from db.exceptions import InvalidModelDirectory
from db.models import KINDS, PRECISIONS, TASKS

CARD_NAME = "model.json"
FORMAT_VERSION = 1
#: Input channel names (same as converters.case.MODALITIES).
MODALITIES: tuple[str, ...] = ("FLAIR", "T1", "T1GD", "T2")


@dataclass(frozen=True)
class CardFile:
    """One file of an artifact: absolute path, sha256, size (all checked against the disk)."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class CardArtifact:
    """One entry of the card's ``artifacts``."""

    key: str
    kind: str
    precision: str
    parent: str | None
    files: tuple[CardFile, ...]
    metrics: dict[str, Any] | None


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory: the card (without ``artifacts``) and its artifacts parents-first."""

    directory: Path
    name: str
    version: str
    task: str
    modalities: tuple[str, ...]
    card: dict[str, Any]
    calibration: dict[str, Any] | None
    training: dict[str, Any] | None
    artifacts: tuple[CardArtifact, ...] = field(default_factory=tuple)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidModelDirectory(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _optional_object(card: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = card.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidModelDirectory(f"{where}.{key}: expected an object, got {value!r}")
    return value


def load_card(directory: Path) -> dict[str, Any]:
    """The parsed ``model.json`` of ``directory``.

    Raises
    ------
    InvalidModelDirectory
        ``directory`` is not a directory, or its ``model.json`` is missing, not UTF-8 JSON, or not an
        object.
    """
    if not directory.is_dir():
        raise InvalidModelDirectory(f"model directory {directory} does not exist or is not a directory")
    file = directory / CARD_NAME
    if not file.is_file():
        raise InvalidModelDirectory(f"{file}: missing (a model directory needs a model.json model card)")
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModelDirectory(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise InvalidModelDirectory(f"{file}: top level must be an object, got {type(card).__name__}")
    return card


def _resolve_inside(directory: Path, raw: str, where: str) -> Path:
    rel = PurePosixPath(raw)
    if rel.is_absolute() or ".." in rel.parts or not raw.strip():
        raise InvalidModelDirectory(f"{where}: {raw!r} must be a relative path inside the model directory")
    return (directory / rel).resolve()


def _files(directory: Path, raw: Any, where: str) -> tuple[CardFile, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidModelDirectory(f"{where}.files: expected a non-empty list, got {raw!r}")
    out: list[CardFile] = []
    for n, entry in enumerate(raw):
        here = f"{where}.files[{n}]"
        if not isinstance(entry, dict):
            raise InvalidModelDirectory(f"{here}: expected an object, got {entry!r}")
        path = _resolve_inside(directory, _text(entry.get("path"), f"{here}.path"), f"{here}.path")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise InvalidModelDirectory(f"{here}.sha256: expected 64 lowercase hex digits, got {sha!r}")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidModelDirectory(f"{here}.size: expected a non-negative integer, got {size!r}")
        check = check_file(path, sha, size)
        loc = here.split(": ", 1)[-1]  # artifacts[i].files[j], without the card's path
        if check.status == "missing":
            raise InvalidModelDirectory(f"{path}: missing (listed in {loc}.path of model.json)")
        if check.status == "mismatch":
            raise InvalidModelDirectory(f"{check.describe()} in model.json ({loc}); the file was changed")
        out.append(CardFile(path, sha, size))
    return tuple(out)


def _artifact(directory: Path, raw: Any, where: str) -> CardArtifact:
    if not isinstance(raw, dict):
        raise InvalidModelDirectory(f"{where}: expected an object, got {raw!r}")
    key = _text(raw.get("key"), f"{where}.key")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise InvalidModelDirectory(f"{where}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    precision = raw.get("precision")
    if precision not in PRECISIONS:
        raise InvalidModelDirectory(f"{where}.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    parent = raw.get("parent")
    if parent is not None and not isinstance(parent, str):
        raise InvalidModelDirectory(f"{where}.parent: expected an artifact key or null, got {parent!r}")
    metrics = raw.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise InvalidModelDirectory(f"{where}.metrics: expected an object, got {metrics!r}")
    return CardArtifact(key, kind, precision, parent, _files(directory, raw.get("files"), where), metrics)


def _parents_first(artifacts: list[CardArtifact], where: str) -> tuple[CardArtifact, ...]:
    by_key: dict[str, CardArtifact] = {}
    for n, art in enumerate(artifacts):
        if art.key in by_key:
            raise InvalidModelDirectory(f"{where}: artifacts[{n}].key: {art.key!r} appears twice")
        by_key[art.key] = art
    for n, art in enumerate(artifacts):
        if art.parent is not None and art.parent not in by_key:
            raise InvalidModelDirectory(
                f"{where}: artifacts[{n}].parent: {art.parent!r} is not the key of an artifact "
                f"(keys: {', '.join(by_key)})"
            )
    ordered: list[CardArtifact] = []
    placed: set[str] = set()
    while len(ordered) < len(artifacts):
        ready = [a for a in artifacts if a.key not in placed and (a.parent is None or a.parent in placed)]
        if not ready:
            cycle = sorted(a.key for a in artifacts if a.key not in placed)
            raise InvalidModelDirectory(f"{where}: artifacts: parent links form a cycle among {cycle}")
        for art in ready:
            ordered.append(art)
            placed.add(art.key)
    return tuple(ordered)


def read_model_dir(directory: Path) -> ModelDir:
    """Read and check the model directory ``directory`` (its ``model.json`` and every listed file).

    Raises
    ------
    InvalidModelDirectory
        ``model.json`` is missing or malformed, or a file it lists is missing, outside the directory,
        or differs (size, sha256) from what the card says. The message names the file.
    """
    directory = directory.resolve()
    card = load_card(directory)
    where = str(directory / CARD_NAME)
    version = card.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InvalidModelDirectory(f"{where}: format_version {version!r} is not supported (expected 1)")
    name = _text(card.get("name"), f"{where}: name")
    model_version = _text(card.get("version"), f"{where}: version")
    task = card.get("task")
    if task not in TASKS:
        raise InvalidModelDirectory(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
    modalities = card.get("modalities")
    if (
        not isinstance(modalities, list)
        or not modalities
        or any(m not in MODALITIES for m in modalities)
        or len(set(modalities)) != len(modalities)
    ):
        raise InvalidModelDirectory(
            f"{where}: modalities {modalities!r} must be a non-empty list of distinct names from "
            f"{', '.join(MODALITIES)}"
        )
    raw_artifacts = card.get("artifacts")
    if not isinstance(raw_artifacts, list) or not raw_artifacts:
        raise InvalidModelDirectory(f"{where}: artifacts must be a non-empty list, got {raw_artifacts!r}")
    artifacts = [_artifact(directory, a, f"{where}: artifacts[{n}]") for n, a in enumerate(raw_artifacts)]
    return ModelDir(
        directory=directory,
        name=name,
        version=model_version,
        task=str(task),
        modalities=tuple(modalities),
        card={k: v for k, v in card.items() if k != "artifacts"},
        calibration=_optional_object(card, "calibration", where),
        training=_optional_object(card, "training", where),
        artifacts=_parents_first(artifacts, where),
    )
