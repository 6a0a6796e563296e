"""Test-time mirroring (``[inference] mirror``, node/segmenter.py): the averaging, the axes, the real
shipped model's symmetry, and the setting's way from node.toml to the compiled segmenter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from converters.case import Case
from converters.exceptions import ModelCardError
from db.card import load_card
from node.bootstrap import SHIPPED_MODEL_DIR
from node.config import load_settings
from node.segmenter import MIRROR_MODES, OpenVINOSegmenter, mirror_axes, mirrored_predictor
from node.service import NodeService
from tests.helpers.node import install_model, make_threshold_model, node_settings
from tests.helpers.regions import brats_case, crop_case

SIGMOID = {"activation": "sigmoid", "threshold": 0.5}
SOFTMAX = {"activation": "softmax"}


def _lopsided(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A predictor that is not mirror-symmetric: the image plus a ramp along H and W, 3 classes."""
    h, w = batch.shape[2:]
    ramp = np.linspace(-2, 2, h)[:, None] + 0.5 * np.linspace(-1, 1, w)[None, :]
    base = batch[:, :1] + ramp
    return np.concatenate([base, -base, 0.3 * base], axis=1).astype(np.float32)


def test_mirror_axes_follow_the_slice_axis() -> None:
    assert mirror_axes("none", 2) == ()
    assert mirror_axes("lr", 2) == (2,)  # axial slices: H is R-L, W is A-P
    assert mirror_axes("lr+ap", 2) == (2, 3)
    assert mirror_axes("lr", 1) == (2,)  # coronal slices: H is R-L, W is S-I
    assert mirror_axes("lr+ap", 1) == (2,)  # A-P is across coronal slices: nothing to mirror for 2D
    assert mirror_axes("lr+ap", 0) == (2,)  # sagittal slices: H is A-P
    with pytest.raises(ValueError, match="mirror mode 'ud' is not one of none, lr, lr\\+ap"):
        mirror_axes("ud", 2)


def test_segmenter_refuses_an_unknown_mode_and_a_bad_slice_axis(tmp_path: Path) -> None:
    model_dir = make_threshold_model(tmp_path / "m", crop=(32, 32))
    card, xml = load_card(model_dir), model_dir / "model_fp32.xml"
    with pytest.raises(ValueError, match="mirror mode 'ud' is not one of"):
        OpenVINOSegmenter(card, xml, mirror="ud")
    bad = {**card, "preprocessing": {**card["preprocessing"], "slice_axis": 5}}
    with pytest.raises(ModelCardError, match=r"model card of .*model_fp32.xml: .*slice_axis 5 must be 0, 1"):
        OpenVINOSegmenter(bad, xml, mirror="lr")


def test_no_mirror_is_the_plain_predictor() -> None:
    assert mirrored_predictor(_lopsided, (), SIGMOID) is _lopsided


@pytest.mark.parametrize("mode", ["lr", "lr+ap"])
def test_sigmoid_probabilities_are_averaged_over_the_mirror_images(mode: str) -> None:
    x = np.random.default_rng(0).normal(size=(5, 1, 6, 4)).astype(np.float32)
    axes = mirror_axes(mode, 2)
    combos = [(), (2,)] if mode == "lr" else [(), (2,), (3,), (2, 3)]
    expected = np.mean(
        [np.flip(1 / (1 + np.exp(-_lopsided(np.flip(x, c))[:, :1])), c) for c in combos], axis=0
    )
    out = mirrored_predictor(_lopsided, axes, SIGMOID)(x)
    assert out.shape == (5, 1, 6, 4) and out.dtype == np.float32
    np.testing.assert_allclose(1 / (1 + np.exp(-out.astype(np.float64))), expected, atol=1e-6)


def test_softmax_outputs_are_log_probabilities_of_the_average() -> None:
    x = np.random.default_rng(1).normal(size=(3, 1, 5, 5)).astype(np.float32)

    def softmax(z: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        e = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    expected = (softmax(_lopsided(x)) + np.flip(softmax(_lopsided(np.flip(x, 2))), 2)) / 2
    out = mirrored_predictor(_lopsided, (2,), SOFTMAX)(x)
    assert out.shape == (3, 3, 5, 5)
    np.testing.assert_allclose(softmax(out), expected, atol=1e-6)


def test_mirroring_stays_exact_on_a_window_padded_evenly() -> None:
    """A window longer than the crop is zero-padded to the network's stride before the mirror images are
    predicted (converters.prediction.predict_padded): padded by an even number of pixels on a mirrored
    side, the mirror image of the window still gets the mirror image of its outputs, even from a network
    that is not symmetric. (An odd number cannot be split evenly: the extra pixel goes to the end, as the
    crop's centre rounds down for a box of odd centre.)"""
    from converters.prediction import predict_slices

    x = np.random.default_rng(2).normal(size=(3, 1, 20, 18)).astype(np.float32)  # 20 -> 32, 18 -> 24
    predict = mirrored_predictor(_lopsided, (2, 3), SIGMOID)
    out = predict_slices(predict, x, tile=(16, 8))
    for axis in (2, 3):
        again = predict_slices(predict, np.ascontiguousarray(np.flip(x, axis)), tile=(16, 8))
        np.testing.assert_allclose(np.flip(again, axis), out, rtol=0, atol=1e-5)
    plain = predict_slices(_lopsided, x, tile=(16, 8))
    plain_again = predict_slices(_lopsided, np.flip(x, 2).copy(), tile=(16, 8))
    assert np.abs(np.flip(plain_again, 2) - plain).max() > 0.1  # the network alone is not symmetric


def _even_box(image: npt.NDArray[np.float32], axis: int) -> npt.NDArray[np.float32]:
    """``image`` with its first non-zero plane along ``axis`` zeroed when the non-zero box's first and
    end indices sum to an odd number: then the brain window (centred on that box, rounding down) of the
    mirrored image is exactly the mirror of the window, and the symmetry can be checked voxel for voxel."""
    others = tuple(a for a in range(3) if a != axis)
    planes = np.flatnonzero((image != 0).any(axis=others))
    if (planes[0] + planes[-1] + 1) % 2:
        image = image.copy()
        index: list[slice | int] = [slice(None)] * 3
        index[axis] = int(planes[0])
        image[tuple(index)] = 0
    return image


#: Axial slices of the case the shipped model is run on: the mirror axes (L-R, A-P) lie in the slices, so
#: a slab through the tumour checks the same property at a fifth of the inference.
SLAB = 32


@pytest.fixture(scope="module")
def case() -> Case:
    """A validation case of models/default's split: :data:`SLAB` axial slices centred on its largest
    tumour section."""
    case = brats_case("BraTS2021_00005")
    assert case.label is not None
    centre = int(np.argmax((case.label > 0).sum(axis=(0, 1))))
    first = max(0, min(centre - SLAB // 2, case.label.shape[2] - SLAB))
    return crop_case(case, (slice(None), slice(None), slice(first, first + SLAB)))


@pytest.fixture(scope="module")
def shipped() -> dict[str, OpenVINOSegmenter]:
    card = load_card(SHIPPED_MODEL_DIR)
    xml = SHIPPED_MODEL_DIR / "model_int8.xml"
    return {mode: OpenVINOSegmenter(card, xml, mirror=mode) for mode in MIRROR_MODES}


@pytest.mark.parametrize(("mode", "axis"), [("lr", 0), ("lr+ap", 0), ("lr+ap", 1)])
def test_shipped_model_mirrored_input_gives_mirrored_output(
    case: Case, shipped: dict[str, OpenVINOSegmenter], mode: str, axis: int
) -> None:
    """The real INT8 model with mirroring on a real case: the (RAS) mirror image of the case is segmented
    as the mirror image of the case's segmentation, voxel for voxel."""
    image = _even_box(_even_box(case.images["FLAIR"], 0), 1)
    mirrored = np.ascontiguousarray(np.flip(image, axis))
    labels = shipped[mode].segment({"FLAIR": image}, case.affine)
    again = shipped[mode].segment({"FLAIR": mirrored}, case.affine)
    assert labels.sum() > 10_000  # a real tumour, not an empty answer
    np.testing.assert_array_equal(np.flip(again, axis), labels)
    # Without mirroring the network alone is not symmetric: the property comes from the averaging.
    plain = shipped["none"].segment({"FLAIR": image}, case.affine)
    plain_again = shipped["none"].segment({"FLAIR": mirrored}, case.affine)
    assert (np.flip(plain_again, axis) != plain).sum() > 100


def test_inference_settings_are_read_from_node_toml_and_reach_the_segmenter(tmp_path: Path) -> None:
    """``[inference] mirror`` and ``three_views`` (tests/node/test_views_node.py for the views)."""
    cfg = tmp_path / "node.toml"
    cfg.write_text('[inference]\nmirror = "lr"\nthree_views = ["whole_tumor"]\n')
    assert load_settings(cfg, env={}).inference.mirror == "lr"
    assert load_settings(env={}).inference.mirror == "none"
    assert load_settings(cfg, env={"SEGNODE_INFERENCE_MIRROR": "lr+ap"}).inference.mirror == "lr+ap"
    assert load_settings(cfg, env={}).inference.three_views == ["whole_tumor"]
    assert load_settings(cfg, env={"SEGNODE_INFERENCE_THREE_VIEWS": ""}).inference.three_views == []

    settings = node_settings(tmp_path, 0)
    settings.inference = load_settings(cfg, env={}).inference
    node = NodeService(settings)
    try:
        install_model(node.registry, make_threshold_model(tmp_path / "model", crop=(32, 32)))
        loaded = node.runtime.refresh()
        assert loaded is not None and (loaded.segmenter.mirror, loaded.segmenter.views) == ("lr", 3)
    finally:
        node.stop()
