"""segnode ensemble: two real networks of one split (``--split-seed``) as one ONNX / IR / INT8 model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import segnode_process
from tests.helpers.training import tiny_config

torch = pytest.importorskip("torch")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The data folder and two exported members: seeds 0 and 1, both on seed 0's split."""
    from converters.synthetic import write_synthetic_task01
    from trainer.export import ExportOptions, export_run
    from trainer.train import train

    root = tmp_path_factory.mktemp("ensemble")
    data = write_synthetic_task01(root / "Task01_BrainTumour", 5, seed=11, shape=(48, 48, 24))
    dirs = []
    for seed in (0, 1):
        run = root / f"run{seed}"
        train(tiny_config(data, run, seed=seed, split_seed=0), progress=False)
        export_run(
            ExportOptions(
                run_dir=run,
                calibration_size=20,
                include_checkpoint=False,
                max_false_tumour_ratio=None,
                register=False,
            )
        )
        dirs.append(run / "export")
    return data, dirs


@pytest.fixture(scope="module")
def ensemble(
    members: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict, str]:
    from trainer.ensemble import EnsembleOptions, ensemble_dir

    data, dirs = members
    out = tmp_path_factory.mktemp("ens") / "model"
    db_url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'models.db'}"
    card = ensemble_dir(
        EnsembleOptions(
            member_dirs=dirs,
            out_dir=out,
            version="9.1.0",
            data=data,
            calibration_size=30,
            database_url=db_url,
        )
    )
    return out, card, db_url


def _slices(data: Path, card: dict, case_id: str) -> np.ndarray:
    from converters.nifti import list_cases
    from converters.preprocess import prepare_volume

    case = next(r for r in list_cases(data) if r.case_id == case_id).load()
    return prepare_volume(case.images, case.affine, card["preprocessing"], card["modalities"]).slices


def test_split_seed_keeps_the_split_and_the_seed_changes_the_network(
    members: tuple[Path, list[Path]],
) -> None:
    from db.card import load_card

    _, dirs = members
    cards = [load_card(d) for d in dirs]
    splits = [c["training"]["split"] for c in cards]
    assert splits[0]["train"] == splits[1]["train"] and splits[0]["val"] == splits[1]["val"]
    assert [c["training"]["seed"] for c in cards] == [0, 1]
    onnx_sha = [next(a for a in c["artifacts"] if a["key"] == "onnx")["files"][0]["sha256"] for c in cards]
    assert onnx_sha[0] != onnx_sha[1]


def test_the_ensemble_computes_the_members_mean_in_every_form(
    members: tuple[Path, list[Path]], ensemble: tuple[Path, dict, str]
) -> None:
    import onnxruntime as ort
    import openvino as ov

    data, dirs = members
    out, card, _ = ensemble
    slices = _slices(data, card, card["training"]["split"]["val"][0])[:7]
    outputs = []
    for d in dirs:
        session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"image": slices})[0])
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2  # two different networks
    expected = np.mean(outputs, axis=0)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": slices})[0], expected, rtol=1e-4, atol=1e-4)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(str(out / "model_fp32.xml"), "CPU", f32)
    np.testing.assert_allclose(compiled(slices)[compiled.output(0)], expected, rtol=1e-3, atol=1e-3)
    int8 = ov.Core().compile_model(str(out / "model_int8.xml"), "CPU")
    assert np.mean((int8(slices)[int8.output(0)] > 0) == (expected > 0)) > 0.95
    assert card["export_checks"]["onnx_vs_members_mean"] < 1e-3
    _assert_averaging_in_float(out / "model_int8.xml")


def test_the_card_names_its_members_and_the_model_table_holds_it(
    members: tuple[Path, list[Path]], ensemble: tuple[Path, dict, str]
) -> None:
    from db.card import load_card, sha256_file, verify_files
    from db.registry import Registry
    from db.session import make_engine, make_session_factory

    _, dirs = members
    out, card, db_url = ensemble
    on_disk = load_card(out)
    assert verify_files(on_disk, out) == []
    first = load_card(dirs[0])
    for key in ("name", "task", "modalities", "preprocessing", "output", "labels"):
        assert on_disk[key] == first[key], key
    assert on_disk["version"] == "9.1.0"
    assert [(a["key"], a["parent"]) for a in on_disk["artifacts"]] == [
        ("onnx", None),
        ("ir_fp32", "onnx"),
        ("ir_int8", "ir_fp32"),
    ]
    split = first["training"]["split"]
    assert on_disk["training"]["split"] == split
    members_block = on_disk["training"]["ensemble_of"]
    assert [m["onnx_sha256"] for m in members_block] == [sha256_file(d / "model.onnx") for d in dirs]
    assert [m["seed"] for m in members_block] == [0, 1]
    for art in on_disk["artifacts"][1:]:
        assert art["metrics"]["cases"] == split["val"]
    check = on_disk["calibration"]["false_tumour_check"]
    assert check["cases"] == split["train"] + split["val"] and isinstance(check["passed"], bool)
    notice = (out / "NOTICE").read_text()
    assert f"{first['name']} 9.1.0 - NOTICE" in notice
    assert all(m["onnx_sha256"] in notice for m in members_block)
    engine = make_engine(db_url)
    try:
        registry = Registry(make_session_factory(engine))
        infos = [registry.get(i) for i in card["registered_ids"]]
    finally:
        engine.dispose()
    assert [(i.kind, i.precision, i.version) for i in infos] == [
        ("onnx", "fp32", "9.1.0"),
        ("ir", "fp32", "9.1.0"),
        ("ir", "int8", "9.1.0"),
    ]
    assert [i.parent_id for i in infos[1:]] == [infos[0].id, infos[1].id]


def test_evaluate_runs_the_ensemble_as_a_model_directory(
    members: tuple[Path, list[Path]], ensemble: tuple[Path, dict, str], tmp_path: Path
) -> None:
    data, _ = members
    out, card, _ = ensemble
    json_out = tmp_path / "e.json"
    done = segnode_process("evaluate", str(out), "--data", str(data), "--json", str(json_out))
    assert done.returncode == 0, done.stderr
    result = json.loads(json_out.read_text())
    by_case = {c["case"]: c["dice"] for c in result["cases"]}
    int8 = next(a for a in card["artifacts"] if a["key"] == "ir_int8")["metrics"]
    for case, dice in zip(int8["cases"], [c["dice"] for c in int8["per_case"]], strict=True):
        assert by_case[case] == pytest.approx(dice, abs=1e-3)


def _edited_copy(source: Path, dest: Path, **changes: object) -> Path:
    """A copy of a model directory whose card's top-level keys (or training.split) are changed."""
    from db.card import load_card, write_card

    shutil.copytree(source, dest)
    card = load_card(dest)
    for key, value in changes.items():
        if key == "split":
            card["training"]["split"] = value
        else:
            card[key] = value
    write_card(card, dest)
    return dest


def test_members_that_differ_are_refused_naming_what_differs(
    members: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from db.card import load_card
    from trainer.ensemble import load_members
    from trainer.exceptions import TrainerError

    _, dirs = members
    card = load_card(dirs[1])
    other_split = {**card["training"]["split"], "val": card["training"]["split"]["train"][:1]}
    moved = _edited_copy(dirs[1], tmp_path / "split", split=other_split)
    with pytest.raises(TrainerError, match="trained on another split"):
        load_members([dirs[0], moved])
    wider = {**card["preprocessing"], "crop_size": [64, 64]}
    cropped = _edited_copy(dirs[1], tmp_path / "crop", preprocessing=wider)
    with pytest.raises(TrainerError, match="preprocessing differs"):
        load_members([dirs[0], cropped])
    with pytest.raises(TrainerError, match="at least two"):
        load_members([dirs[0]])
    with pytest.raises(TrainerError, match="given twice"):
        load_members([dirs[0], dirs[0]])
    corrupt = shutil.copytree(dirs[1], tmp_path / "corrupt")
    (corrupt / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(TrainerError, match=r"model\.onnx"):
        load_members([dirs[0], corrupt])


def test_the_cli_builds_an_ensemble_and_refuses_a_used_folder(
    members: tuple[Path, list[Path]], ensemble: tuple[Path, dict, str], tmp_path: Path
) -> None:
    from db.card import load_card, sha256_file

    data, dirs = members
    out, _, _ = ensemble
    args = ["--version", "9.2.0", "--data", str(data), "--no-register", "--calibration-size", "20"]
    done = segnode_process("ensemble", *map(str, dirs), "--out", str(tmp_path / "cli"), *args)
    assert done.returncode == 0, done.stderr
    assert "(seed 1)" in done.stdout and "false tumour" in done.stdout  # the table, the check's line
    assert load_card(tmp_path / "cli")["version"] == "9.2.0"
    before = sha256_file(out / "model_int8.bin")
    done = segnode_process("ensemble", *map(str, dirs), "--out", str(out), *args)
    assert done.returncode == 2 and "already holds a model" in done.stderr
    assert sha256_file(out / "model_int8.bin") == before
    done = segnode_process("ensemble", str(dirs[0]), "--out", str(tmp_path / "one"), *args)
    assert done.returncode == 2 and "at least two" in done.stderr



def test_the_holdout_is_refused(members: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from converters.nifti import HoldoutDataError
    from trainer.ensemble import EnsembleOptions, ensemble_dir

    data, dirs = members
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    (holdout / data.name).symlink_to(data)
    options = EnsembleOptions(member_dirs=dirs, out_dir=tmp_path / "out", version="9.3.0", data=holdout)
    with pytest.raises(HoldoutDataError, match="holdout"):
        ensemble_dir(options)
    assert not (tmp_path / "out" / "model.json").exists()


def test_probabilities_ensemble_outputs_the_logit_of_the_mean_probability(
    members: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    import onnxruntime as ort
    import openvino as ov

    from db.card import load_card
    from trainer.ensemble import PROBABILITY_EPS, EnsembleOptions, ensemble_dir

    data, dirs = members
    out = tmp_path / "p"
    card = ensemble_dir(
        EnsembleOptions(
            member_dirs=dirs,
            out_dir=out,
            version="9.4.0",
            data=data,
            combine="probabilities",
            calibration_size=20,
            max_false_tumour_ratio=None,
            register=False,
        )
    )
    assert load_card(out)["training"]["combination"].startswith("mean of the members' probabilities")
    slices = _slices(data, card, card["training"]["split"]["val"][0])[:5]
    sessions = [ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]) for d in dirs]
    logits = [s.run(None, {"image": slices})[0] for s in sessions]
    p = np.mean([1 / (1 + np.exp(-lg.astype(np.float64))) for lg in logits], axis=0)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = 1 / (1 + np.exp(-session.run(None, {"image": slices})[0].astype(np.float64)))
    np.testing.assert_allclose(got, np.clip(p, PROBABILITY_EPS, 1 - PROBABILITY_EPS), atol=1e-5)
    # The averaging stays in float in the INT8 network: quantized, its logs lost every tumour voxel of
    # the real three-network ensemble (INT8 validation Dice 0 against 0.946).
    assert load_card(out)["calibration"]["not_quantized"] == ["ens_.*", "logits"]
    _assert_averaging_in_float(out / "model_int8.xml")
    int8 = ov.Core().compile_model(str(out / "model_int8.xml"), "CPU")
    fp32 = session.run(None, {"image": slices})[0]
    assert np.mean((int8(slices)[int8.output(0)] > 0) == (fp32 > 0)) > 0.95


def _assert_averaging_in_float(xml: Path) -> None:
    """No FakeQuantize feeds the ensemble's averaging (the operations named ens_* and the output)."""
    import openvino as ov

    averaging = [
        op for op in ov.Core().read_model(str(xml)).get_ops()
        if op.get_friendly_name().startswith("ens_") or op.get_friendly_name() == "logits"
    ]  # fmt: skip
    assert averaging
    for op in averaging:
        sources = [i.get_source_output().get_node().get_type_name() for i in op.inputs()]
        assert "FakeQuantize" not in sources, op.get_friendly_name()


def test_probabilities_vote_where_one_confident_logit_carries_the_mean() -> None:
    """(+8, -3, -3): the logits' mean says tumour (+0.67), the probabilities' mean does not (0.36).
    With two members the two means always agree (sigma(a) + sigma(b) > 1 exactly when a + b > 0)."""
    from trainer.ensemble import probability_logits

    logits = np.array([8.0, -3.0, -3.0], dtype=np.float32).reshape(3, 1, 1, 1, 1)
    assert logits.mean() > 0
    out = float(probability_logits(logits, "sigmoid").ravel()[0])
    mean_probability = (1 / (1 + np.exp(-logits.astype(np.float64)))).mean()
    assert 1 / (1 + np.exp(-out)) == pytest.approx(mean_probability, abs=1e-6)
    assert out < 0


def _conv_onnx(path: Path, seed: int) -> Path:
    """A one-layer network 1 -> 3 channels (logits of a softmax model), as ONNX."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(seed).normal(size=(3, 1, 3, 3)).astype(np.float32) * 3
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_softmax_ensemble_averages_probabilities_over_the_channels(tmp_path: Path) -> None:
    import onnxruntime as ort

    from trainer.ensemble import mean_predictor, merge_onnx

    paths = [_conv_onnx(tmp_path / f"m{i}.onnx", i) for i in range(3)]
    batch = np.random.default_rng(5).normal(size=(2, 1, 8, 8)).astype(np.float32)

    def run(path: Path, images: np.ndarray = batch) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {"image": images})[0])

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    merge_onnx(paths, tmp_path / "p.onnx", "probabilities", "softmax")
    expected = np.clip(np.mean([softmax(run(p)) for p in paths], axis=0), 1e-4, 1)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax(run(tmp_path / "p.onnx")), expected, atol=1e-5)
    predictors = [lambda images, p=p: run(p, images) for p in paths]
    np.testing.assert_allclose(
        mean_predictor(predictors, "probabilities", "softmax")(batch), run(tmp_path / "p.onnx"), atol=1e-5
    )
    merge_onnx(paths, tmp_path / "l.onnx", "logits", "softmax")
    np.testing.assert_allclose(run(tmp_path / "l.onnx"), np.mean([run(p) for p in paths], axis=0), atol=1e-5)
