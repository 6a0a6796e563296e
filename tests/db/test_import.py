"""Import of bad model directories: a clear error naming the file, and nothing registered (both backends)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from db.exceptions import InvalidModelDirectory
from db.registry import Registry, open_registry
from tests.conftest import write_model_dir


@pytest.fixture()
def registry(migrated_db_url: str) -> Iterator[Registry]:
    reg = open_registry(migrated_db_url)
    yield reg
    reg.close()


def _edit_card(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    card_path = directory / "model.json"
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))


def _assert_nothing_registered(registry: Registry) -> None:
    assert registry.list_models() == []
    assert registry.history() == []


def test_missing_directory_and_missing_model_json(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(InvalidModelDirectory, match=f"model directory {tmp_path / 'nope'} does not exist"):
        registry.import_dir(tmp_path / "nope")
    directory = write_model_dir(tmp_path / "m")
    (directory / "model.json").unlink()
    with pytest.raises(InvalidModelDirectory) as info:
        registry.import_dir(directory)
    assert str(info.value).startswith(f"{directory / 'model.json'}: missing")
    _assert_nothing_registered(registry)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"name": "x", ', "not valid JSON"),
        ("[1, 2]", "top level must be an object, got list"),
    ],
)
def test_malformed_json(registry: Registry, tmp_path: Path, text: str, message: str) -> None:
    directory = write_model_dir(tmp_path / "m")
    (directory / "model.json").write_text(text)
    with pytest.raises(InvalidModelDirectory) as info:
        registry.import_dir(directory)
    assert str(directory / "model.json") in str(info.value)
    assert message in str(info.value)
    _assert_nothing_registered(registry)


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(card: dict[str, Any]) -> None:
        target: Any = card
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(["task"], "liver"), "task 'liver' is not one of whole_tumor, brats_regions, brain_extraction"),
        (_set(["name"], KeyError), "name: expected a non-empty string, got None"),
        (_set(["modalities"], ["FLAIR", "PD"]), "modalities ['FLAIR', 'PD'] must be a non-empty list"),
        (_set(["format_version"], 2), "format_version 2 is not supported"),
        (_set(["artifacts"], []), "artifacts must be a non-empty list"),
        (
            _set(["artifacts", 1, "kind"], "tflite"),
            "artifacts[1].kind: 'tflite' is not one of checkpoint, onnx, ir",
        ),
        (_set(["artifacts", 2, "precision"], "int4"), "artifacts[2].precision: 'int4' is not one of"),
        (
            _set(["artifacts", 2, "parent"], "ir_fp16"),
            "artifacts[2].parent: 'ir_fp16' is not the key of an artifact",
        ),
        (_set(["artifacts", 0, "parent"], "ir_int8"), "parent links form a cycle"),
        (_set(["artifacts", 1, "key"], "onnx"), "artifacts[1].key: 'onnx' appears twice"),
        (_set(["artifacts", 1, "files", 0, "sha256"], "abc"), "artifacts[1].files[0].sha256: expected 64"),
        (
            _set(["artifacts", 1, "files", 0, "size"], -1),
            "artifacts[1].files[0].size: expected a non-negative",
        ),
        (_set(["artifacts", 1, "files", 0, "path"], "../model_fp32.xml"), "must be a relative path inside"),
        (_set(["artifacts", 1, "files", 0, "path"], "/etc/hostname"), "must be a relative path inside"),
        (_set(["artifacts", 1, "files"], []), "artifacts[1].files: expected a non-empty list"),
        (_set(["artifacts", 1, "metrics"], [0.9]), "artifacts[1].metrics: expected an object"),
    ],
)
def test_malformed_card_fields(
    registry: Registry, tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    directory = write_model_dir(tmp_path / "m")
    _edit_card(directory, edit)
    with pytest.raises(InvalidModelDirectory) as info:
        registry.import_dir(directory)
    assert str(directory / "model.json") in str(info.value)
    assert message in str(info.value)
    _assert_nothing_registered(registry)


def test_missing_file_is_named(registry: Registry, tmp_path: Path) -> None:
    directory = write_model_dir(tmp_path / "m")
    (directory / "model_int8.bin").unlink()
    with pytest.raises(InvalidModelDirectory) as info:
        registry.import_dir(directory)
    assert str(info.value) == (
        f"{directory / 'model_int8.bin'}: missing (listed in artifacts[2].files[1].path of model.json)"
    )
    _assert_nothing_registered(registry)


@pytest.mark.parametrize("same_size", [True, False])
def test_tampered_file_is_named(registry: Registry, tmp_path: Path, same_size: bool) -> None:
    directory = write_model_dir(tmp_path / "m")
    target = directory / "model_int8.bin"  # the last artifact: the ones before it must not be registered
    data = target.read_bytes()
    target.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:] if same_size else data + b"\0")
    with pytest.raises(InvalidModelDirectory) as info:
        registry.import_dir(directory)
    message = str(info.value)
    assert message.startswith(f"{target}: ")
    assert ("sha256" if same_size else "size") in message
    assert "the file was changed" in message
    _assert_nothing_registered(registry)


def test_an_ir_listed_without_its_weights_is_refused(registry: Registry, tmp_path: Path) -> None:
    """OpenVINO loads ``<stem>.bin`` beside the ``.xml``: an IR artifact that does not list it would let
    a changed weights file pass every sha256 check and be served."""
    directory = write_model_dir(tmp_path / "m")

    def drop_bin(card: dict[str, Any]) -> None:
        ir = card["artifacts"][2]
        ir["files"] = [f for f in ir["files"] if not f["path"].endswith(".bin")]

    _edit_card(directory, drop_bin)
    listed_alone = r"model_int8\.xml is listed without its weights model_int8\.bin"
    with pytest.raises(InvalidModelDirectory, match=listed_alone):
        registry.import_dir(directory)
    _assert_nothing_registered(registry)


@pytest.mark.parametrize("labels", [[{"value": 2, "name": "Whole tumour"}], []], ids=["other value", "none"])
def test_a_card_whose_labels_are_not_its_tasks_is_refused(
    registry: Registry, tmp_path: Path, labels: list[dict[str, Any]]
) -> None:
    """The node writes one segment and one volume per label value: a whole-tumour card naming value 2
    sent an empty SEG and a blank volume for every study (the network outputs 1)."""
    directory = write_model_dir(tmp_path / "m")
    _edit_card(directory, lambda card: card.__setitem__("labels", labels))
    with pytest.raises(InvalidModelDirectory, match=r"a whole_tumor model outputs \[1\]"):
        registry.import_dir(directory)
    _assert_nothing_registered(registry)


#: Cards the node refuses when it loads the model (db.card.check_runnable_card, which the node runs
#: itself): each passed import and promotion before, and the node then served the previous model, or
#: none at all, while the model table called this one active.
NODE_REFUSES = [
    (_set(["preprocessing", "orientation"], "LPS"), "preprocessing.orientation 'LPS' is not supported"),
    (_set(["output", "activation"], KeyError), "output.activation None is not 'sigmoid' or 'softmax'"),
    (
        _set(["preprocessing", "spacing_mm"], [1, 1, 0]),
        "preprocessing.spacing_mm [1.0, 1.0, 0.0] must be 3 positive numbers",
    ),
]


def _assert_edit_refused(
    registry: Registry, directory: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    """The model directory, its card edited by ``edit``, is refused at import with ``message`` naming
    its model.json, and nothing is registered."""
    _edit_card(directory, edit)
    with pytest.raises(InvalidModelDirectory) as info:
        registry.import_dir(directory)
    assert str(info.value).startswith(f"{directory.resolve() / 'model.json'}: ")
    assert message in str(info.value)
    _assert_nothing_registered(registry)


@pytest.mark.parametrize(("edit", "message"), NODE_REFUSES, ids=["LPS", "no activation", "spacing 0"])
def test_a_card_the_node_cannot_run_is_refused_at_import(
    registry: Registry, tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    from tests.helpers.node import make_threshold_model

    directory = make_threshold_model(tmp_path / "m", crop=(32, 32))  # a real IR the node runs
    _assert_edit_refused(registry, directory, edit, message)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda card: card["networks"]["fp32"].__setitem__("brain", "brain_v2.xml"),
            "networks.fp32.brain: 'brain_v2.xml' is not among the files of artifact 'ir_fp32'",
        ),
        (
            lambda card: card["networks"].__setitem__("int8", dict(card["networks"]["fp32"])),
            "networks.int8: the card has no IR artifact of precision 'int8'",
        ),
    ],
    ids=["unlisted file", "no such artifact"],
)
def test_brain_extractor_networks_must_be_files_of_its_artifact(
    registry: Registry, tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    """The node checks the sha256 of the artifact's files, then compiled whatever ``networks`` named: a
    copy beside them, changed at will, was loaded unchecked."""
    import shutil

    directory = tmp_path / "bx"
    shutil.copytree(Path(__file__).resolve().parents[2] / "models" / "brain_extraction", directory)
    for ext in ("xml", "bin"):
        shutil.copy(directory / f"brain_fp32.{ext}", directory / f"brain_v2.{ext}")
    _assert_edit_refused(registry, directory, edit, message)
