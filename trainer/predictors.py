"""Slice predictors of every form of a model: PyTorch, ONNX Runtime and OpenVINO IR.

Each function returns a :data:`converters.prediction.SlicePredictor` (float32 (N, C, H, W) ->
logits (N, K, H, W)), which :func:`converters.prediction.segment_volume` runs with the node's
pre- and post-processing; so evaluation and export compare a checkpoint, its ONNX export and its
FP32/INT8 IR case by case. Nothing here imports the training loop, and torch, onnxruntime and
openvino are imported only by the predictor that needs them.

The OpenVINO predictor is a plain compiled model with the IR's own (dynamic) batch dimension: the
node's static batch with zero-padded partial batches (:class:`node.segmenter.OpenVINOSegmenter`) is
a speed measure and gives the same labels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ModelCardError
from converters.prediction import SlicePredictor
from db.card import check_card
from trainer.exceptions import TrainerError

if TYPE_CHECKING:
    import torch

    from trainer.devices import DeviceInfo

logger = logging.getLogger(__name__)


def torch_predictor(model: torch.nn.Module, device: DeviceInfo | None = None) -> SlicePredictor:
    """A slice predictor running ``model`` (already in eval mode, on ``device``) in fp32.

    Parameters
    ----------
    model:
        The network.
    device:
        The device the model lives on (its ``mark_step`` is called after each batch, for HPU lazy
        mode); None: the CPU.
    """
    import torch

    dev = device.device if device is not None else torch.device("cpu")

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(batch)).to(dev))
            if device is not None:
                device.mark_step()
            return np.asarray(out.float().cpu().numpy())

    return predict


def onnx_predictor(path: Path) -> SlicePredictor:
    """A slice predictor running the ONNX file ``path`` with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0])

    return predict


def openvino_predictor(
    card: Mapping[str, Any], model_xml: Path, device: str = "CPU", precision_hint: str | None = None
) -> SlicePredictor:
    """A slice predictor running an OpenVINO IR (or an ONNX file, which OpenVINO reads too).

    Parameters
    ----------
    card:
        The model card; its modalities must match the network's input channels.
    model_xml:
        The IR ``.xml`` (its ``.bin`` beside it).
    device:
        OpenVINO device name (``CPU``, ``GPU``, ``AUTO``...).
    precision_hint:
        ``INFERENCE_PRECISION_HINT`` (``"f32"`` keeps a CPU with AMX from running an FP32 model in
        bf16); None keeps OpenVINO's default.

    Raises
    ------
    TrainerError
        The file is missing or OpenVINO cannot read it.
    ModelCardError
        The card lacks a key, or the network's channels differ from the card's modalities.
    """
    import openvino as ov

    check_card(card)
    model_xml = Path(model_xml)
    if not model_xml.is_file():
        raise TrainerError(f"model file {model_xml} does not exist")
    core = ov.Core()
    try:
        model = core.read_model(str(model_xml))
    except RuntimeError as exc:
        raise TrainerError(f"model file {model_xml} cannot be read by OpenVINO: {exc}") from None
    channels = len(card["modalities"])
    shape = model.input(0).get_partial_shape()
    static_channels = shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static
    if static_channels and shape[1].get_length() != channels:
        raise ModelCardError(
            f"model {model_xml} takes {shape[1].get_length()} channels but the card lists "
            f"{channels} modalities"
        )
    config = {"INFERENCE_PRECISION_HINT": precision_hint} if precision_hint else {}
    compiled = core.compile_model(model, device, config)
    output = compiled.output(0)
    logger.info("compiled %s on %s", model_xml.name, device)

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(compiled(np.ascontiguousarray(batch, dtype=np.float32))[output], dtype=np.float32)

    return predict
