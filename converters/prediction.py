"""Whole-volume segmentation with any 2D slice predictor (numpy only: no torch, no OpenVINO).

The counterpart of :mod:`converters.preprocess`: the volume goes through
:func:`converters.preprocess.prepare_volume` as the model card says, the slices through a
:data:`SlicePredictor` in batches, the outputs through the card's ``output`` activation, and the
label planes back onto the input grid with :meth:`converters.preprocess.Prepared.restore`. The node's
OpenVINO segmenter and the trainer's PyTorch, ONNX Runtime and OpenVINO predictors all go through
these functions, so every form of a model sees exactly the same pre- and post-processing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ModelCardError, PredictionError
from converters.preprocess import Prepared, prepare_volume

logger = logging.getLogger(__name__)

#: A slice predictor: float32 (N, C, H, W) -> raw network outputs (logits) (N, K, H, W).
SlicePredictor = Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]]


def outputs_to_labels(outputs: npt.NDArray[Any], output_spec: Mapping[str, Any]) -> npt.NDArray[np.uint8]:
    """Network outputs (N, K, H, W) -> label planes (N, H, W) uint8.

    ``sigmoid``: K == 1, label 1 where sigmoid(logit) > threshold (default 0.5).
    ``softmax``: label = argmax over K classes (the class index is the Decathlon label).

    Raises
    ------
    PredictionError
        ``outputs`` is not 4-D.
    ModelCardError
        The card's ``output`` block names an unknown activation or a threshold outside (0, 1).
    """
    outputs = np.asarray(outputs)
    if outputs.ndim != 4:
        raise PredictionError(f"network output shape {outputs.shape} is not (N, K, H, W)")
    activation = output_spec.get("activation")
    if activation == "sigmoid":
        threshold = float(output_spec.get("threshold", 0.5))
        if not 0.0 < threshold < 1.0:
            raise ModelCardError(f"output.threshold {threshold!r} must lie strictly between 0 and 1")
        logit = np.log(threshold / (1.0 - threshold))
        return (outputs[:, 0] > logit).astype(np.uint8)
    if activation == "softmax":
        return np.argmax(outputs, axis=1).astype(np.uint8)
    raise ModelCardError(f"output.activation {activation!r} is not 'sigmoid' or 'softmax'")


def predict_slices(
    predict: SlicePredictor, slices: npt.NDArray[np.float32], batch_size: int = 16
) -> npt.NDArray[np.float32]:
    """Run ``predict`` over ``slices`` (N, C, H, W) in batches; returns the stacked outputs.

    Raises
    ------
    PredictionError
        ``batch_size`` is below 1.
    """
    if batch_size < 1:
        raise PredictionError(f"batch size {batch_size} must be at least 1")
    outs = [
        np.asarray(predict(np.ascontiguousarray(slices[i : i + batch_size])), dtype=np.float32)
        for i in range(0, len(slices), batch_size)
    ]
    if not outs:
        return np.zeros((0, 1, *slices.shape[2:]), dtype=np.float32)
    return np.concatenate(outs)


def segment_prepared(
    predict: SlicePredictor, prepared: Prepared, card: Mapping[str, Any], batch_size: int = 16
) -> npt.NDArray[np.uint8]:
    """Label planes (N, H, W) for already prepared slices."""
    outputs = predict_slices(predict, prepared.slices, batch_size)
    return outputs_to_labels(outputs, card["output"])


def segment_volume(
    predict: SlicePredictor,
    card: Mapping[str, Any],
    images: Mapping[str, npt.NDArray[Any]],
    affine: npt.NDArray[Any],
    batch_size: int = 16,
) -> npt.NDArray[np.uint8]:
    """Segment one volume with any slice predictor.

    Parameters
    ----------
    predict:
        float32 (N, C, H, W) -> logits (N, K, H, W).
    card:
        The model card (``modalities``, ``preprocessing``, ``output``).
    images, affine:
        Modality -> (X, Y, Z) RAS arrays and their 4x4 affine.
    batch_size:
        Slices per network call.

    Returns
    -------
    numpy.ndarray
        uint8 (X, Y, Z) label map on the input grid.
    """
    prepared = prepare_volume(images, affine, card["preprocessing"], card["modalities"])
    return prepared.restore(segment_prepared(predict, prepared, card, batch_size))
