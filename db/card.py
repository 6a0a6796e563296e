"""Model cards and file checksums: the one module that reads, writes and verifies them.

The model card, ``model.json`` beside a model's files (docs/model-card.md), says what a model expects
(modalities, preprocessing), what it outputs, which files hold it (with sha256 and size) and how well
each artifact did. This module holds

* the checksums recorded in the card and in the model table: :func:`sha256_file`, :func:`check_file`
  (a :class:`FileCheck`) and :func:`file_entry`;
* the card as the trainer writes it and the node reads it: :func:`load_card` and :func:`check_card`
  (the keys both rely on), :func:`artifact`, :func:`ir_xml`, :func:`verify_files`,
  :func:`write_card`, :func:`record_evaluation`, which raise
  :class:`~converters.exceptions.ModelCardError`;
* a model directory read for import into the model table: :func:`read_model_dir` checks everything
  before the registry touches the database (the card's structure, that every listed file exists
  inside the directory, and that its size and sha256 match what the card says); any problem raises
  :class:`~db.exceptions.InvalidModelDirectory` naming the file, the attribute and the bad value.

No torch and no OpenVINO here: the trainer and the node both import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from converters.case import MODALITIES
from converters.exceptions import ModelCardError
from db.exceptions import InvalidModelDirectory
from db.models import KINDS, NAME_MAX, PRECISIONS, TASKS, VERSION_MAX

logger = logging.getLogger(__name__)

CARD_NAME = "model.json"
FORMAT_VERSION = 1
_BLOCK = 1 << 20


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


# -- checksums --------------------------------------------------------------------------------------


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
    _check_labels(card, where)


def check_runnable_card(card: Mapping[str, Any], where: str = "model card") -> None:
    """Check a card as the node reads it when it loads the model: :func:`check_card`, then the task's
    own blocks, with the very parsers the node uses. A segmentation card's ``preprocessing``
    (:meth:`converters.preprocess.PreprocessSpec.from_card`: orientation RAS, 3 positive spacings, a
    crop of 2 positive sizes, a known normalisation and slice axis); a brain extractor's
    ``preprocessing`` (:meth:`converters.brain_mask.BrainExtractionSettings.from_card`), ``output``
    ``channel`` and ``networks`` (per precision, the ``bbox`` and ``brain`` IR file names).

    The node calls it before compiling (node/segmenter.py, node/brain_extraction.py) and the model
    table at import (:func:`read_model_dir`) and promotion, so that a card the node would refuse is
    never made active.

    Raises
    ------
    ModelCardError
        The message starts with ``where`` and names the key and its bad value.
    """
    from converters.brain_mask import NETWORKS, BrainExtractionSettings
    from converters.preprocess import PreprocessError, PreprocessSpec

    check_card(card, where)
    block = card["preprocessing"]
    if not isinstance(block, Mapping):
        raise ModelCardError(f"{where}: preprocessing must be an object, got {block!r}")
    if card["task"] != "brain_extraction":
        try:
            PreprocessSpec.from_card(block)
        except PreprocessError as exc:
            raise ModelCardError(f"{where}: {exc}") from None
        return
    try:
        BrainExtractionSettings.from_card(card)
        int(card["output"].get("channel", 1))
    except ModelCardError as exc:
        raise ModelCardError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ModelCardError(f"{where}: a preprocessing or output value is bad: {exc}") from None
    networks = card.get("networks")
    if not isinstance(networks, Mapping) or not networks:
        raise ModelCardError(
            f"{where}: networks {networks!r} must map a precision to its {' and '.join(NETWORKS)} IR files"
        )
    for precision, names in networks.items():
        if (
            not isinstance(names, Mapping)
            or any(not isinstance(names.get(key), str) or not names[key].strip() for key in NETWORKS)
        ):
            raise ModelCardError(
                f"{where}: networks.{precision} {names!r} must name the {' and '.join(NETWORKS)} IR files"
            )


def _check_labels(card: Mapping[str, Any], where: str) -> None:
    """A segmentation card's label values are its task's (:data:`TASK_LABELS`): the node writes one
    SEG segment and one SR volume per label value the network outputs, so a card naming other values
    sends an empty SEG and a blank volume for every study."""
    expected = TASK_LABELS.get(str(card["task"]))
    if expected is None:
        return
    want = sorted(int(label["value"]) for label in expected)
    labels = card.get("labels")
    values: list[Any] | None = None
    if isinstance(labels, list) and all(isinstance(label, Mapping) for label in labels):
        values = sorted((label.get("value") for label in labels), key=str)
    if values != want:
        raise ModelCardError(
            f"{where}: labels have the values {values}; a {card['task']} model outputs {want} "
            "(docs/model-card.md, db/card.py TASK_LABELS)"
        )


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


def record_evaluation(directory: Path, entry: Mapping[str, Any]) -> None:
    """Add an evaluation (``segnode evaluate --record``) to the card's ``evaluations`` list.

    ``entry`` is what the model table records of a model id's evaluation (built by the trainer's
    ``evaluation_entry``): ``split``, ``data``, ``precision``, ``cases``, ``mean``, ``per_case`` and,
    for regions, ``regions`` and ``regions_per_case``. An earlier entry for the same split and
    precision is replaced. Artifact ``metrics`` (the ones the promotion gate compares) are left alone.
    """
    card = load_card(directory)
    key = (entry.get("split"), entry.get("precision"))
    kept = [e for e in card.get("evaluations", []) if (e.get("split"), e.get("precision")) != key]
    card["evaluations"] = [*kept, dict(entry)]
    write_card(card, directory)


def write_card(card: Mapping[str, Any], directory: Path) -> Path:
    """Write ``card`` as ``directory/model.json`` (indented, keys in card order)."""
    check_card(card, str(directory / CARD_NAME))
    path = directory / CARD_NAME
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


# -- a model directory read for import --------------------------------------------------------------


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


def _text(value: Any, where: str, max_length: int | None = None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidModelDirectory(f"{where}: expected a non-empty string, got {value!r}")
    if max_length is not None and len(value) > max_length:
        raise InvalidModelDirectory(
            f"{where}: {value[:20]!r}... is {len(value)} characters long; at most {max_length}"
        )
    return value


def _optional_object(card: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = card.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidModelDirectory(f"{where}.{key}: expected an object, got {value!r}")
    return value


def _read_card_object(directory: Path) -> dict[str, Any]:
    """The parsed ``model.json`` of the model directory ``directory`` (for :func:`read_model_dir`).

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
    files = _files(directory, raw.get("files"), where)
    if kind == "ir":
        _check_ir_weights(files, where)
    return CardArtifact(key, kind, precision, parent, files, metrics)


def _check_ir_weights(files: tuple[CardFile, ...], where: str) -> None:
    """An IR's weights (``<stem>.bin`` beside each ``.xml``, which OpenVINO reads) must be listed, or
    a changed weights file would pass every sha256 check and be served."""
    listed = {f.path for f in files}
    for f in files:
        if f.path.suffix.lower() != ".xml":
            continue
        weights = f.path.with_suffix(".bin")
        if weights.exists() and weights not in listed:
            raise InvalidModelDirectory(
                f"{where}.files: {f.path.name} is listed without its weights {weights.name}, which "
                "OpenVINO loads beside it; list both (with sha256 and size)"
            )


def _check_networks(
    card: Mapping[str, Any], directory: Path, artifacts: list[CardArtifact], where: str
) -> None:
    """A brain extractor's ``networks`` (precision -> network -> IR ``.xml``) name files of its IR
    artifact of that precision, and each IR artifact has its networks: the node compiles the files
    that ``networks`` names, but checks the sha256 of the artifact's files only, so an unlisted file
    (a changed copy beside the listed ones) would be loaded unchecked. (The ``.bin`` beside a listed
    ``.xml`` must be listed too: :func:`_check_ir_weights`.)"""
    networks = card.get("networks")
    assert isinstance(networks, Mapping)  # check_runnable_card
    irs = {art.precision: art for art in artifacts if art.kind == "ir"}
    for precision, names in networks.items():
        art = irs.get(str(precision))
        if art is None:
            raise InvalidModelDirectory(
                f"{where}: networks.{precision}: the card has no IR artifact of precision {precision!r} "
                "whose files (sha256-checked) would hold these networks"
            )
        listed = {f.path for f in art.files}
        for key, raw in names.items():
            here = f"networks.{precision}.{key}"
            path = _resolve_inside(directory, str(raw), f"{where}: {here}")
            if path not in listed:
                raise InvalidModelDirectory(
                    f"{where}: {here}: {raw!r} is not among the files of artifact {art.key!r}, whose "
                    "sha256 the node checks before loading; list it there (with its .bin, sha256 and size)"
                )
    for precision, art in irs.items():
        if precision not in networks:
            raise InvalidModelDirectory(
                f"{where}: artifact {art.key!r} has no networks.{precision} naming its IR files"
            )


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
    card = _read_card_object(directory)
    where = str(directory / CARD_NAME)
    version = card.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InvalidModelDirectory(f"{where}: format_version {version!r} is not supported (expected 1)")
    name = _text(card.get("name"), f"{where}: name", NAME_MAX)
    model_version = _text(card.get("version"), f"{where}: version", VERSION_MAX)
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
    try:
        check_runnable_card(card, where)  # what the node checks when it loads the model
    except ModelCardError as exc:
        raise InvalidModelDirectory(str(exc)) from None
    raw_artifacts = card.get("artifacts")
    if not isinstance(raw_artifacts, list) or not raw_artifacts:
        raise InvalidModelDirectory(f"{where}: artifacts must be a non-empty list, got {raw_artifacts!r}")
    artifacts = [_artifact(directory, a, f"{where}: artifacts[{n}]") for n, a in enumerate(raw_artifacts)]
    if task == "brain_extraction":
        _check_networks(card, directory, artifacts, where)
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
