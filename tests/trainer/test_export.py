"""Export round trip: ONNX and IR FP32 match PyTorch, INT8 registers with its FP32 parent, evaluate CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.peers import REPO
from trainer.metrics import METRIC_NAMES, VOLUME_NAMES

torch = pytest.importorskip("torch")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converters.synthetic import write_synthetic_task01
    from trainer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("export")
    data = write_synthetic_task01(root / "Task01_BrainTumour", 5, seed=11, shape=(48, 48, 24))
    run = root / "run"
    config = TrainConfig(
        data=str(data),
        out=str(run),
        device="cpu",
        epochs=2,
        batch_size=8,
        base_filters=8,
        depth=3,
        crop_size=[48, 48],
        val_fraction=0.4,
        threads=1,
        lr=3e-3,
    )
    train(config, progress=False)
    return run


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    from trainer.export import ExportOptions, export_run

    db_url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'models.db'}"
    card = export_run(ExportOptions(run_dir=run_dir, calibration_size=40, register=True, database_url=db_url))
    return run_dir / "export", card, db_url


def _val_slices(run_dir: Path) -> np.ndarray:
    from converters.nifti import list_cases
    from converters.preprocess import prepare_volume
    from trainer.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "best.pt")
    ref = next(
        r for r in list_cases(Path(state["train_config"]["data"])) if r.case_id == state["split"]["val"][0]
    )
    case = ref.load()
    card = state["card"]
    return prepare_volume(case.images, case.affine, card["preprocessing"], card["modalities"]).slices


def test_onnx_and_ir_fp32_match_pytorch_on_real_slices(
    exported: tuple[Path, dict, str], run_dir: Path
) -> None:
    import onnx
    import onnxruntime as ort
    import openvino as ov

    from trainer.checkpoint import load_checkpoint, model_from_checkpoint

    out, _card, _ = exported
    model = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    slices = _val_slices(run_dir)[:7]  # batch of 7: not the export's dummy batch of 2
    with torch.no_grad():
        expected = model(torch.from_numpy(slices)).numpy()
    proto = onnx.load(str(out / "model.onnx"))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": slices})[0], expected, rtol=1e-3, atol=1e-3)
    compiled = ov.Core().compile_model(
        str(out / "model_fp32.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    np.testing.assert_allclose(compiled(slices)[compiled.output(0)], expected, rtol=1e-3, atol=1e-3)
    int8 = ov.Core().compile_model(str(out / "model_int8.xml"), "CPU")
    int8_out = int8(slices)[int8.output(0)]
    assert int8_out.shape == expected.shape
    assert np.mean((int8_out > 0) == (expected > 0)) > 0.95
    xml = (out / "model_int8.xml").read_text()
    assert "FakeQuantize" in xml or "fake_convert" in xml.lower() or "u8" in xml


def test_card_lineage_metrics_and_registry(exported: tuple[Path, dict, str], run_dir: Path) -> None:
    from db.card import load_card, verify_files
    from db.registry import Registry
    from db.session import make_engine, make_session_factory

    out, card, db_url = exported
    on_disk = load_card(out)
    assert verify_files(on_disk, out) == []
    keys = [(a["key"], a["parent"]) for a in on_disk["artifacts"]]
    assert keys == [("checkpoint", None), ("onnx", "checkpoint"), ("ir_fp32", "onnx"), ("ir_int8", "ir_fp32")]
    split = json.loads((run_dir / "split.json").read_text())
    for art in on_disk["artifacts"]:
        assert art["metrics"]["cases"] == split["val"] and art["metrics"]["split"] == "validation"
        assert set(art["metrics"]["mean"]) == {*METRIC_NAMES, *VOLUME_NAMES}
    by_key = {a["key"]: a for a in on_disk["artifacts"]}
    assert by_key["onnx"]["metrics"]["mean"]["dice"] == pytest.approx(
        by_key["checkpoint"]["metrics"]["mean"]["dice"], abs=1e-3
    )
    assert (
        on_disk["calibration"]["subset_size"] == 40 and on_disk["calibration"]["source"] == "training split"
    )
    assert on_disk["training"]["split"]["val"] == split["val"]
    run_config = json.loads((run_dir / "run.json").read_text())["config"]
    options = on_disk["training"]["options"]
    for key in ("scanner_augment", "channel_dropout", "optional_modalities", "crop_size", "patience"):
        assert options[key] == run_config[key], key  # how the model was made, augmentations included
    assert (out / "NOTICE").is_file()
    engine = make_engine(db_url)
    try:
        registry = Registry(make_session_factory(engine))
        ids = card["registered_ids"]
        infos = [registry.get(i) for i in ids]
    finally:
        engine.dispose()
    assert [(i.kind, i.precision) for i in infos] == [
        ("checkpoint", "fp32"),
        ("onnx", "fp32"),
        ("ir", "fp32"),
        ("ir", "int8"),
    ]
    assert [i.parent_id for i in infos] == [None, ids[0], ids[1], ids[2]]
    assert infos[3].dice == pytest.approx(by_key["ir_int8"]["metrics"]["mean"]["dice"])


def _segnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )


def test_evaluate_cli_matches_the_card(
    exported: tuple[Path, dict, str], run_dir: Path, tmp_path: Path
) -> None:
    from trainer.checkpoint import load_checkpoint

    out, card, _ = exported
    data = load_checkpoint(run_dir / "best.pt")["train_config"]["data"]
    report = tmp_path / "int8.json"
    done = _segnode("evaluate", str(out), "--data", data, "--precision", "int8", "--json", str(report))
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert len(result["cases"]) == 5 and result["task"] == "whole_tumor"
    assert set(result["mean"]) == {*METRIC_NAMES, *VOLUME_NAMES}
    assert all(c["true_volume_ml"] > 0 for c in result["cases"])
    int8_card = {c["case"]: c["dice"] for c in card["artifacts"][3]["metrics"]["per_case"]}
    for c in result["cases"]:
        if c["case"] in int8_card:
            assert c["dice"] == pytest.approx(int8_card[c["case"]], abs=1e-9)
    report_pt = tmp_path / "pt.json"
    done = _segnode("evaluate", str(run_dir / "best.pt"), "--data", data, "--json", str(report_pt))
    assert done.returncode == 0, done.stderr
    ckpt_card = {c["case"]: c["dice"] for c in card["artifacts"][0]["metrics"]["per_case"]}
    for c in json.loads(report_pt.read_text())["cases"]:
        if c["case"] in ckpt_card:
            assert c["dice"] == pytest.approx(ckpt_card[c["case"]], abs=1e-9)
    done = _segnode("evaluate", str(tmp_path / "missing.xml"), "--data", data)
    assert done.returncode == 2 and "missing.xml does not exist" in done.stderr


def test_accuracy_control_quantization(run_dir: Path, tmp_path: Path) -> None:
    from trainer.export import ExportOptions, export_run

    card = export_run(
        ExportOptions(
            run_dir=run_dir,
            out_dir=tmp_path / "ac",
            calibration_size=30,
            max_dice_drop=0.01,
            include_checkpoint=False,
            register=False,
        )
    )
    assert card["calibration"]["method"] == "nncf.quantize_with_accuracy_control"
    assert card["calibration"]["max_dice_drop"] == 0.01
    assert [a["key"] for a in card["artifacts"]] == ["onnx", "ir_fp32", "ir_int8"]
    assert card["artifacts"][0]["parent"] is None
    assert (tmp_path / "ac" / "model_int8.xml").is_file()


def test_int8_dice_drop_is_reported_per_region() -> None:
    from trainer.export import int8_dice_drops

    def metrics(wt: float, tc: float, et: float) -> dict[str, Any]:
        return {"mean": {"dice": wt}, "regions": {"WT": {"dice": wt}, "TC": {"dice": tc}, "ET": {"dice": et}}}

    fp32, int8 = metrics(0.90, 0.80, 0.70), metrics(0.895, 0.81, 0.65)
    drops = int8_dice_drops(fp32, int8)
    assert drops == pytest.approx({"mean": 0.005, "WT": 0.005, "TC": -0.01, "ET": 0.05})
    assert int8_dice_drops({"mean": {"dice": 0.9}}, {"mean": {"dice": 0.9}}) == {"mean": 0.0}
