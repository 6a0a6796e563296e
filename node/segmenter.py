"""The node's inference engine: an OpenVINO IR model compiled once, segmenting whole volumes.

Pre- and post-processing are the shared ones (:func:`converters.preprocess.prepare_volume`,
:func:`converters.prediction.segment_to_grid`), so the node segments exactly as the trainer
evaluated. What is the node's own is how the network runs: a static batch, zero-padded partial
batches and a warm-up inference at load (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ModelCardError
from converters.prediction import DEFAULT_RESTORE, segment_to_grid
from converters.preprocess import Prepared, prepare_volume
from db.card import check_card
from node.exceptions import ModelLoadError
from node.memory import release_compiled

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

#: Slices per OpenVINO request (see :class:`OpenVINOSegmenter`).
DEFAULT_BATCH = 8


def _make_static(model: ov.Model, batch: int, channels: int, card: Mapping[str, Any]) -> bool:
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

    Raises
    ------
    ModelLoadError
        The model file is missing or unreadable, or ``batch_size`` is below 1.
    ModelCardError
        The card lacks a key the node relies on, or the network's channels differ from its modalities.
    """

    card: dict[str, Any]
    batch_size: int
    model_path: Path
    static_batch: bool

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
            raise ModelLoadError(f"model file {model_xml} does not exist")
        if batch_size < 1:
            raise ModelLoadError(f"batch size {batch_size} must be at least 1")
        self.card = dict(card)
        self.batch_size = batch_size
        self.model_path = model_xml
        core = ov.Core()
        try:
            model = core.read_model(str(model_xml))
        except RuntimeError as exc:
            raise ModelLoadError(f"model file {model_xml} cannot be read by OpenVINO: {exc}") from None
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
        self._compiled: ov.CompiledModel = core.compile_model(model, device, config)
        self._output: ov.ConstOutput = self._compiled.output(0)
        self._input_shape: tuple[int, ...] = tuple(
            int(d) for d in self._compiled.input(0).get_partial_shape().get_min_shape()
        )
        if self.static_batch:  # the first inference allocates and tunes; do it before a job waits on it
            self.predict(np.zeros((1, *self._input_shape[1:]), dtype=np.float32))
        logger.info(
            "compiled %s on %s (batch %d, %s)",
            model_xml.name, device, batch_size, "static" if self.static_batch else "dynamic",
        )

    def release_memory(self) -> None:
        """Hand OpenVINO's intermediate buffers back (they are allocated again by the next inference).

        Called between jobs (:func:`node.runtime.release_idle_memory`), never during an inference.
        """
        release_compiled(self._compiled)

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
            out_shape = tuple(self._output.get_partial_shape().get_min_shape())
            return np.zeros((0, *out_shape[1:]), dtype=np.float32)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def segment(
        self,
        images: Mapping[str, npt.NDArray[Any]],
        affine: npt.NDArray[Any],
        brain_mask: npt.NDArray[Any] | None = None,
    ) -> npt.NDArray[np.uint8]:
        """uint8 label map (X, Y, Z) on the input grid.

        whole_tumor: 1 = tumour; brats_regions: Decathlon labels (1 edema, 2 non-enhancing, 3 enhancing).
        """
        return self.infer(self.prepare(images, affine, brain_mask))

    def prepare(
        self,
        images: Mapping[str, npt.NDArray[Any]],
        affine: npt.NDArray[Any],
        brain_mask: npt.NDArray[Any] | None = None,
    ) -> Prepared:
        """The network slices of a volume on any grid, resampled onto the model's grid as its card says.

        ``brain_mask``: optional boolean mask on the images' grid (see
        :func:`converters.preprocess.prepare_volume`).
        """
        return prepare_volume(
            images, affine, self.card["preprocessing"], self.card["modalities"], brain_mask
        )

    def infer(self, prepared: Prepared, method: str = DEFAULT_RESTORE) -> npt.NDArray[np.uint8]:
        """uint8 label map (X, Y, Z) on the input grid for prepared slices (see :meth:`segment`).

        ``method``: how the prediction goes back onto a resampled grid
        (:data:`converters.prediction.RESTORE_METHODS`).
        """
        return segment_to_grid(self.predict, prepared, self.card, self.batch_size, method)
