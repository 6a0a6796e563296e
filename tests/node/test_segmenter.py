"""node.segmenter: the node's OpenVINO engine against the numpy pipeline, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.exceptions import ModelCardError
from converters.prediction import restore_outputs
from converters.preprocess import prepare_volume
from db.card import load_card
from node.exceptions import ModelLoadError
from node.segmenter import MAX_EXTRA_SHAPES, OpenVINOSegmenter
from tests.helpers.node import make_threshold_model


def _model(out_dir: Path, **kwargs: object) -> tuple[dict, Path]:
    model_dir = make_threshold_model(out_dir, **kwargs)  # type: ignore[arg-type]
    return json.loads((model_dir / "model.json").read_text()), model_dir / "model_fp32.xml"


def test_openvino_segmenter_matches_numpy_pipeline(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((40, 36, 12), np.float32)
    image[5:35, 4:30, 1:11] = rng.normal(100, 20, (30, 26, 10))
    card, xml = _model(tmp_path / "m", threshold=1.0, crop=(32, 32))
    seg = OpenVINOSegmenter(card, xml, batch_size=3, precision_hint="f32")
    assert seg.static_batch
    out = seg.segment({"FLAIR": image, "T1": image}, np.eye(4))
    assert out.dtype == np.uint8 and out.shape == image.shape
    prep = prepare_volume({"FLAIR": image}, np.eye(4), card["preprocessing"], ["FLAIR"])
    expected = prep.restore((prep.slices[:, 0] > 1.0).astype(np.uint8))
    np.testing.assert_array_equal(out, expected)
    assert 0 < out.sum() < (image != 0).sum()
    assert not out[image == 0].any()


def test_segmenter_runs_float32_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OpenVINO's own default is bf16 on a CPU with native bf16 (AVX-512 BF16, AMX): an FP32 model would
    # give labels that depend on the CPU. The hint is asked for, for the network and for its copies
    # reshaped to larger slices; None leaves OpenVINO's default.
    import openvino as ov

    card, xml = _model(tmp_path / "m", crop=(32, 32))
    configs: list[dict] = []
    real = ov.Core.compile_model

    def recording(self: ov.Core, model: object, device: str, config: dict) -> ov.CompiledModel:
        configs.append(dict(config))
        return real(self, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", recording)
    seg = OpenVINOSegmenter(card, xml, batch_size=2)
    seg.predict(np.zeros((2, 1, 48, 40), np.float32))  # a larger slice: a reshaped copy
    assert len(configs) == 2
    assert all(c.get("INFERENCE_PRECISION_HINT") == "f32" for c in configs)
    configs.clear()
    OpenVINOSegmenter(card, xml, batch_size=2, precision_hint=None)
    assert configs and "INFERENCE_PRECISION_HINT" not in configs[0]


def test_segmenter_rejects_channel_mismatch_and_missing_file(tmp_path: Path) -> None:
    card, xml = _model(tmp_path / "m", crop=(32, 32), modalities=("FLAIR", "T1"))
    with pytest.raises(ModelCardError, match="takes 2 channels but the card lists 1 modalities"):
        OpenVINOSegmenter({**card, "modalities": ["FLAIR"]}, xml)
    with pytest.raises(ModelLoadError, match=r"model file .*nope.xml does not exist"):
        OpenVINOSegmenter(card, tmp_path / "nope.xml")


def _threshold(x: np.ndarray, threshold: float = 1.5, gain: float = 8.0) -> np.ndarray:
    """What :func:`make_threshold_model`'s network computes."""
    return ((x[:, :1] - threshold) * gain).astype(np.float32)


def test_larger_slices_run_on_the_network_compiled_for_their_size(tmp_path: Path) -> None:
    """Slices longer than the crop (a brain longer than it) run whole on a copy of the network reshaped
    to their size, compiled once and kept for the next calls, the least recently used size dropped."""
    card, xml = _model(tmp_path / "m", crop=(32, 32))
    seg = OpenVINOSegmenter(card, xml, batch_size=3, precision_hint="f32")
    x = np.random.default_rng(2).normal(size=(5, 1, 48, 40)).astype(np.float32)
    np.testing.assert_allclose(seg.predict(x), _threshold(x), atol=1e-5)
    assert seg.larger_sizes == [(48, 40)]
    np.testing.assert_allclose(seg.predict(x[:2]), _threshold(x[:2]), atol=1e-5)  # a partial batch
    assert seg.larger_sizes == [(48, 40)]
    for side in (64, 80, 96, 112):
        seg.predict(np.zeros((1, 1, side, 32), np.float32))
    assert len(seg.larger_sizes) == MAX_EXTRA_SHAPES and (48, 40) not in seg.larger_sizes
    seg.release_memory()
    np.testing.assert_allclose(seg.predict(x), _threshold(x), atol=1e-5)  # buffers allocated again

    # A whole volume whose brain is longer than the crop: one padded size, labels as numpy's.
    rng = np.random.default_rng(3)
    image = np.zeros((60, 44, 6), np.float32)
    image[5:55, 4:40, :] = rng.normal(100, 20, (50, 36, 6))
    brain = image != 0
    seg = OpenVINOSegmenter(card, xml, batch_size=4, precision_hint="f32")
    out = seg.segment({"FLAIR": image}, np.eye(4), brain)
    prep = prepare_volume(
        {"FLAIR": image}, np.eye(4), card["preprocessing"], ["FLAIR"], brain, fit_region=True
    )
    assert prep.crop_size == (50, 36) and seg.larger_sizes == [(64, 64)]
    np.testing.assert_array_equal(out, prep.restore((prep.slices[:, 0] > 1.5).astype(np.uint8)))
    assert out.sum() > 100


def test_a_network_that_cannot_be_reshaped_sees_larger_slices_in_tiles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A network whose graph fixes its size (a Reshape to a constant 32 x 32, as some exported networks
    have) cannot be compiled for larger slices: they are predicted in crop-sized tiles, with a warning."""
    import openvino as ov
    import openvino.opset13 as ops

    card, xml = _model(tmp_path / "m", crop=(32, 32))
    x = ops.parameter([-1, 1, 32, 32], np.float32, name="image")
    flat = ops.reshape(x, ops.constant(np.array([-1, 1024], np.int64)), special_zero=False)
    scaled = ops.multiply(ops.subtract(flat, ops.constant(np.float32(1.5))), ops.constant(np.float32(8.0)))
    back = ops.reshape(scaled, ops.constant(np.array([-1, 1, 32, 32], np.int64)), special_zero=False)
    ov.save_model(ov.Model([back], [x], "fixed"), str(xml), compress_to_fp16=False)
    batch = np.random.default_rng(4).normal(size=(4, 1, 48, 40)).astype(np.float32)
    for static in (True, False):  # the static batch fails to reshape; the dynamic one gives 32 x 32
        seg = OpenVINOSegmenter(card, xml, batch_size=3, precision_hint="f32", static_batch=static)
        caplog.clear()
        np.testing.assert_allclose(seg.predict(batch), _threshold(batch), atol=1e-5)
        assert seg.larger_sizes == []
        assert "cannot take 48x40 slices" in caplog.text and "predicted in 32x32 tiles" in caplog.text


def test_the_shipped_model_on_a_brain_longer_than_the_crop_keeps_its_accuracy() -> None:
    """A validation case whose brain is a pixel longer than the shipped 176 x 176 crop, on a slab through its
    tumour: the whole window, padded to 176 x 192, labels it as the crop-sized tiles did (what the node
    ran before) within a Dice of 0.98 of each other, and no worse against the ground truth than 0.01."""
    from converters.prediction import predict_tiled
    from node.bootstrap import SHIPPED_MODEL_DIR
    from tests.helpers.regions import brats_case, crop_case

    case = brats_case("BraTS2021_00006")
    assert case.label is not None
    centre = int(np.argmax((case.label > 0).sum(axis=(0, 1))))
    case = crop_case(case, (slice(None), slice(None), slice(centre - 16, centre + 16)))
    card = load_card(SHIPPED_MODEL_DIR)
    seg = OpenVINOSegmenter(card, SHIPPED_MODEL_DIR / "model_int8.xml")
    image = case.images["FLAIR"]
    prepared = seg.prepare({"FLAIR": image}, case.affine, image > 0)
    assert prepared.slices.shape[2:] == (176, 177)
    padded = seg.infer(prepared) > 0
    assert seg.larger_sizes == [(176, 192)]
    tiled_outputs = predict_tiled(seg.predict, prepared.slices, (176, 176))
    tiled = restore_outputs(prepared, tiled_outputs, card) > 0
    truth = case.label > 0

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    assert truth.sum() > 10_000 and dice(padded, tiled) >= 0.98
    assert dice(padded, truth) >= dice(tiled, truth) - 0.01 >= 0.9
