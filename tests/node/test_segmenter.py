"""node.segmenter: the node's OpenVINO engine against the numpy pipeline, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.exceptions import ModelCardError
from converters.preprocess import prepare_volume
from node.exceptions import ModelLoadError
from node.segmenter import OpenVINOSegmenter
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


def test_segmenter_rejects_channel_mismatch_and_missing_file(tmp_path: Path) -> None:
    card, xml = _model(tmp_path / "m", crop=(32, 32), modalities=("FLAIR", "T1"))
    with pytest.raises(ModelCardError, match="takes 2 channels but the card lists 1 modalities"):
        OpenVINOSegmenter({**card, "modalities": ["FLAIR"]}, xml)
    with pytest.raises(ModelLoadError, match=r"model file .*nope.xml does not exist"):
        OpenVINOSegmenter(card, tmp_path / "nope.xml")
