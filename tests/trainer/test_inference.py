"""The model card (db.card), the shared prediction steps (converters.prediction) and the trainer's OpenVINO
predictor, without torch: a hand-built OpenVINO model through the full path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.exceptions import ModelCardError
from converters.prediction import outputs_to_labels, segment_volume
from converters.preprocess import prepare_volume
from db.card import TASK_LABELS, file_entry, ir_xml, load_card, verify_files, write_card
from trainer.exceptions import TrainerError
from trainer.predictors import openvino_predictor

PRE = {
    "orientation": "RAS",
    "spacing_mm": [1.0, 1.0, 1.0],
    "crop_size": [32, 32],
    "normalization": "zscore_nonzero",
    "slice_axis": 2,
}


def _card(task: str = "whole_tumor", modalities: list[str] | None = None) -> dict:
    return {
        "format_version": 1,
        "name": "t",
        "version": "0.0.1",
        "task": task,
        "modalities": modalities or ["FLAIR"],
        "preprocessing": PRE,
        "output": {"activation": "sigmoid", "threshold": 0.5},
        "labels": TASK_LABELS[task],
        "artifacts": [],
    }


def _threshold_model(path: Path, offset: float, channels: int = 1) -> Path:
    """An IR whose logit is (first channel - offset): tumour where the z-scored image > offset."""
    import openvino as ov
    import openvino.opset13 as ops

    image = ops.parameter(ov.PartialShape([-1, channels, -1, -1]), ov.Type.f32, name="image")
    first = ops.slice(image, np.array([0]), np.array([1]), np.array([1]), np.array([1]))
    logits = ops.subtract(first, ops.constant(np.float32(offset)))
    ov.save_model(ov.Model([logits], [image], "threshold"), path, compress_to_fp16=False)
    return path


def test_torch_free_import_chain() -> None:
    code = (
        "import sys, trainer, trainer.predictors, trainer.evaluate, trainer.metrics, db.card, "
        "converters.prediction, converters.preprocess; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_openvino_predictor_matches_numpy_pipeline(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((40, 36, 12), np.float32)
    image[5:35, 4:30, 1:11] = rng.normal(100, 20, (30, 26, 10))
    xml = _threshold_model(tmp_path / "m.xml", offset=1.0)
    predict = openvino_predictor(_card(), xml, precision_hint="f32")
    out = segment_volume(predict, _card(), {"FLAIR": image, "T1": image}, np.eye(4), batch_size=3)
    assert out.dtype == np.uint8 and out.shape == image.shape
    prep = prepare_volume({"FLAIR": image}, np.eye(4), PRE, ["FLAIR"])
    expected = prep.restore((prep.slices[:, 0] > 1.0).astype(np.uint8))
    np.testing.assert_array_equal(out, expected)
    assert 0 < out.sum() < (image != 0).sum()
    assert not out[image == 0].any()


def test_openvino_predictor_rejects_channel_mismatch_and_missing_file(tmp_path: Path) -> None:
    xml = _threshold_model(tmp_path / "m.xml", offset=0.0, channels=2)
    with pytest.raises(ModelCardError, match="takes 2 channels but the card lists 1 modalities"):
        openvino_predictor(_card(), xml)
    with pytest.raises(TrainerError, match=r"model file .*nope.xml does not exist"):
        openvino_predictor(_card(), tmp_path / "nope.xml")


def test_outputs_to_labels() -> None:
    logits = np.array([[[[-1.0, 0.1]]]], np.float32)
    np.testing.assert_array_equal(outputs_to_labels(logits, {"activation": "sigmoid"}), [[[0, 1]]])
    np.testing.assert_array_equal(
        outputs_to_labels(logits, {"activation": "sigmoid", "threshold": 0.6}), [[[0, 0]]]
    )
    soft = np.zeros((1, 4, 1, 2), np.float32)
    soft[0, 3, 0, 0] = 5.0
    soft[0, 1, 0, 1] = 1.0
    np.testing.assert_array_equal(outputs_to_labels(soft, {"activation": "softmax"}), [[[3, 1]]])
    with pytest.raises(ModelCardError, match=r"output\.activation 'relu'"):
        outputs_to_labels(logits, {"activation": "relu"})


def test_card_round_trip_and_verification(tmp_path: Path) -> None:
    xml = _threshold_model(tmp_path / "model_int8.xml", offset=0.0)
    card = _card()
    files = [file_entry(xml, tmp_path), file_entry(xml.with_suffix(".bin"), tmp_path)]
    card["artifacts"] = [
        {"key": "ir_int8", "kind": "ir", "precision": "int8", "parent": None, "files": files}
    ]
    write_card(card, tmp_path)
    loaded = load_card(tmp_path)
    assert ir_xml(loaded, tmp_path, "int8") == xml
    assert verify_files(loaded, tmp_path) == []
    xml.write_text(xml.read_text() + " ")
    assert "sha256 differs" in verify_files(loaded, tmp_path)[0]
    with pytest.raises(ModelCardError, match="has no artifact 'ir_fp32'"):
        ir_xml(loaded, tmp_path, "fp32")
    (tmp_path / "model.json").write_text(json.dumps({**card, "task": "liver"}))
    with pytest.raises(ModelCardError, match="task 'liver' is not one of"):
        load_card(tmp_path)


def test_record_evaluation_replaces_same_split_and_precision(tmp_path: Path) -> None:
    from db.card import record_evaluation
    from trainer.evaluate import evaluation_entry

    write_card(_card(), tmp_path)
    cases = [{"case": "a", "dice": 0.5, "seconds": 1.0}]
    result = {"precision": "int8", "cases": cases, "mean": {"dice": 0.5}}
    data = tmp_path / "holdout"
    record_evaluation(tmp_path, evaluation_entry(result, "holdout", data))
    record_evaluation(tmp_path, evaluation_entry({**result, "mean": {"dice": 0.7}}, "holdout", data))
    record_evaluation(tmp_path, evaluation_entry({**result, "precision": "fp32"}, "holdout", data))
    evaluations = load_card(tmp_path)["evaluations"]
    assert [(e["precision"], e["mean"]["dice"]) for e in evaluations] == [("int8", 0.7), ("fp32", 0.5)]
    assert evaluations[0]["per_case"] == [{"case": "a", "dice": 0.5}] and evaluations[0]["split"] == "holdout"
    assert evaluations[0]["data"] == str(data.resolve())


def test_the_shipped_models_forms_take_slices_longer_than_their_crop() -> None:
    """The shipped network is exported for its 176 x 176 crop; a window widened to a longer brain is padded
    to 192 x 176 (converters.prediction.predict_padded). ONNX Runtime (the graph's sides made free), the
    trainer's OpenVINO predictor and the node's segmenter (each reshaping a copy) give the same logits."""
    from node.bootstrap import SHIPPED_MODEL_DIR
    from node.segmenter import OpenVINOSegmenter
    from trainer.predictors import onnx_predictor

    card = load_card(SHIPPED_MODEL_DIR)
    x = np.random.default_rng(5).normal(size=(3, 1, 192, 176)).astype(np.float32)
    by_onnx = onnx_predictor(SHIPPED_MODEL_DIR / "model.onnx")
    by_ir = openvino_predictor(card, SHIPPED_MODEL_DIR / "model_fp32.xml", precision_hint="f32")
    node = OpenVINOSegmenter(card, SHIPPED_MODEL_DIR / "model_fp32.xml", precision_hint="f32")
    for sample in (x, np.ascontiguousarray(x[:, :, 8:184])):  # padded, and the crop's own size
        reference = by_onnx(sample)
        assert reference.shape == (3, 1, *sample.shape[2:])
        scale = float(np.abs(reference).max())
        np.testing.assert_allclose(by_ir(sample), reference, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(node.predict(sample), reference, rtol=0, atol=1e-4 * scale)
    assert node.larger_sizes == [(192, 176)]


def test_openvino_predictor_keeps_few_reshaped_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a static-shape network (as exported) predicts windows of other sizes on reshaped copies; an
    # evaluation meets a size per case, and each copy holds its own buffers
    import openvino as ov
    import openvino.opset13 as ops

    import trainer.predictors as predictors

    image = ops.parameter(ov.PartialShape([-1, 1, 32, 32]), ov.Type.f32, name="image")
    xml = tmp_path / "static.xml"
    ov.save_model(ov.Model([ops.multiply(image, ops.constant(np.float32(2.0)))], [image]), xml)
    compiles: list[object] = []
    real = ov.Core.compile_model

    def counting(self: ov.Core, *args: object, **kwargs: object) -> ov.CompiledModel:
        compiles.append(args[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ov.Core, "compile_model", counting)
    predict = openvino_predictor(_card(), xml, precision_hint="f32")
    assert len(compiles) == 1
    sizes = [32 + k for k in range(1, predictors.MAX_RESHAPED + 3)]
    for side in [*sizes, sizes[-1], sizes[0]]:
        batch = np.random.default_rng(side).normal(size=(2, 1, side, side)).astype(np.float32)
        np.testing.assert_allclose(predict(batch), 2 * batch, rtol=1e-6)
    # one compile per new size, none for the size just used, one again for a size evicted meanwhile
    assert len(compiles) == 1 + len(sizes) + 1


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_evaluate_runs_an_ir_in_float32_as_the_node_does(
    tmp_path: Path, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OpenVINO's default on a CPU with native bf16 would run an FP32 network, and an INT8 network's
    # unquantized layers, in bf16; the node asks for f32 (node/segmenter.py), so the card's figures do too
    from trainer import evaluate

    hints: list[object] = []

    def recording(card: object, xml: Path, device: str = "CPU", precision_hint: str | None = None) -> object:
        hints.append(precision_hint)
        return lambda batch: batch

    monkeypatch.setattr(evaluate, "openvino_predictor", recording)
    evaluate._openvino(_card(), tmp_path / "m.xml", precision, "CPU")
    assert hints == ["f32"]
