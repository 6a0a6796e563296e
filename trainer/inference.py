"""Whole-volume segmentation with a 2D slice model (numpy and OpenVINO only, no torch).

The volume goes through :func:`converters.preprocess.prepare_volume` as the model card says, the
slices through the network in batches, the outputs through the card's ``output`` activation, and
the label planes back onto the input grid with :meth:`converters.preprocess.Prepared.restore`.
:func:`segment_volume` takes any slice predictor, so PyTorch, ONNX Runtime and OpenVINO models
are evaluated through exactly the same pre- and post-processing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.preprocess import Prepared, prepare_volume
from trainer.card import check_card
from trainer.exceptions import ModelCardError, TrainerError

logger = logging.getLogger(__name__)

#: A slice predictor: float32 (N, C, H, W) -> raw network outputs (logits) (N, K, H, W).
SlicePredictor = Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]]


def outputs_to_labels(outputs: npt.NDArray[Any], output_spec: Mapping[str, Any]) -> npt.NDArray[np.uint8]:
    """Network outputs (N, K, H, W) -> label planes (N, H, W) uint8.

    ``sigmoid``: K == 1, label 1 where sigmoid(logit) > threshold (default 0.5).
    ``softmax``: label = argmax over K classes (the class index is the Decathlon label).
    """
    outputs = np.asarray(outputs)
    if outputs.ndim != 4:
        raise TrainerError(f"network output shape {outputs.shape} is not (N, K, H, W)")
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
    """Run ``predict`` over ``slices`` (N, C, H, W) in batches; returns the stacked outputs."""
    if batch_size < 1:
        raise TrainerError(f"batch size {batch_size} must be at least 1")
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


#: Slices per OpenVINO request (see :class:`OpenVINOSegmenter`).
DEFAULT_BATCH = 8


def _make_static(model: Any, batch: int, channels: int, card: Mapping[str, Any]) -> bool:
    """Reshape ``model`` to a static (batch, channels, crop H, crop W) input when its batch is dynamic;
    returns whether it did."""
    shape = model.input(0).get_partial_shape()
    if not shape.rank.is_static or shape.rank.get_length() != 4 or shape[0].is_static:
        return False
    crop = [int(v) for v in card["preprocessing"]["crop_size"]]
    for dim, want in zip((shape[2], shape[3]), crop, strict=True):
        if dim.is_static and dim.get_length() != want:
            return False
    try:
        model.reshape([batch, channels, *crop])
    except RuntimeError as exc:
        logger.info("model keeps its dynamic batch (%s)", exc)
        return False
    return True


class OpenVINOSegmenter:
    """An OpenVINO IR model compiled once, segmenting whole volumes slice batch by slice batch.

    Parameters
    ----------
    card:
        The model card (docs/model-card.md).
    model_xml:
        The IR ``.xml`` (its ``.bin`` beside it), or an ``.onnx`` file (OpenVINO reads both).
    device:
        OpenVINO device name (``CPU``, ``GPU``, ``AUTO``...).
    batch_size:
        Slices per inference request. A model whose batch dimension is dynamic is compiled for this
        batch size (static shapes): OpenVINO's CPU kernels for a static shape are faster, and the
        last, partial batch is padded with zeros so that no new shape is ever compiled during a job.
        8 was chosen on a training case (BraTS2021_00005, 136 slices, INT8 on 2 cores): 0.55 s against
        1.15 s for the former dynamic batch of 16 (see docs/benchmarks.md).
    precision_hint:
        ``INFERENCE_PRECISION_HINT`` (e.g. ``"f32"`` to stop a CPU with AMX from running an FP32
        model in bf16); None keeps OpenVINO's default.
    static_batch:
        False keeps the model's dynamic batch dimension (any batch size per call, no padding).
    """

    def __init__(
        self,
        card: Mapping[str, Any],
        model_xml: Path,
        device: str = "CPU",
        batch_size: int = DEFAULT_BATCH,
        precision_hint: str | None = None,
        static_batch: bool = True,
    ) -> None:
        import openvino as ov

        check_card(card)
        model_xml = Path(model_xml)
        if not model_xml.is_file():
            raise TrainerError(f"model file {model_xml} does not exist")
        if batch_size < 1:
            raise TrainerError(f"batch size {batch_size} must be at least 1")
        self.card = dict(card)
        self.batch_size = batch_size
        self.model_path = model_xml
        core = ov.Core()
        try:
            model = core.read_model(str(model_xml))
        except RuntimeError as exc:
            raise TrainerError(f"model file {model_xml} cannot be read by OpenVINO: {exc}") from None
        channels = len(self.card["modalities"])
        shape = model.input(0).get_partial_shape()
        static_channels = shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static
        if static_channels and shape[1].get_length() != channels:
            raise ModelCardError(
                f"model {model_xml} takes {shape[1].get_length()} channels but the card lists "
                f"{channels} modalities"
            )
        self.static_batch = static_batch and _make_static(model, batch_size, channels, self.card)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        self._compiled = core.compile_model(model, device, config)
        self._output = self._compiled.output(0)
        self._input_shape = tuple(int(d) for d in self._compiled.input(0).get_partial_shape().get_min_shape())
        if self.static_batch:  # the first inference allocates and tunes; do it before a job waits on it
            self.predict(np.zeros((1, *self._input_shape[1:]), dtype=np.float32))
        logger.info(
            "compiled %s on %s (batch %d, %s)",
            model_xml.name, device, batch_size, "static" if self.static_batch else "dynamic",
        )

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Raw network outputs (logits) for a batch of slices (N, C, H, W), any N."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.static_batch:
            return np.asarray(self._compiled(batch)[self._output], dtype=np.float32)
        size = self.batch_size
        outs = []
        for start in range(0, len(batch), size):
            block = batch[start : start + size]
            n = len(block)
            if n < size:
                block = np.concatenate([block, np.zeros((size - n, *block.shape[1:]), dtype=np.float32)])
            outs.append(np.asarray(self._compiled(block)[self._output], dtype=np.float32)[:n])
        if not outs:
            return np.zeros((0, *tuple(self._compiled.output(0).get_partial_shape().get_min_shape())[1:]),
                            dtype=np.float32)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def segment(
        self, images: Mapping[str, npt.NDArray[Any]], affine: npt.NDArray[Any]
    ) -> npt.NDArray[np.uint8]:
        """uint8 label map (X, Y, Z) on the input grid.

        whole_tumor: 1 = tumour; brats_regions: Decathlon labels (1 edema, 2 non-enhancing, 3 enhancing).
        """
        return self.infer(self.prepare(images, affine))

    def prepare(self, images: Mapping[str, npt.NDArray[Any]], affine: npt.NDArray[Any]) -> Prepared:
        """The network slices of a volume, as the model card's preprocessing says."""
        return prepare_volume(images, affine, self.card["preprocessing"], self.card["modalities"])

    def infer(self, prepared: Prepared) -> npt.NDArray[np.uint8]:
        """uint8 label map (X, Y, Z) on the input grid for prepared slices (see :meth:`segment`)."""
        return prepared.restore(segment_prepared(self.predict, prepared, self.card, self.batch_size))
