"""Slice predictors of every form of a model: PyTorch, ONNX Runtime and OpenVINO IR.

Each function returns a :data:`converters.prediction.SlicePredictor` (float32 (N, C, H, W) ->
logits (N, K, H, W)), which :func:`converters.prediction.segment_volume` runs with the node's
pre- and post-processing; so evaluation and export compare a checkpoint, its ONNX export and its
FP32/INT8 IR case by case. Nothing here imports the training loop, and torch, onnxruntime and
openvino are imported only by the predictor that needs them.

The OpenVINO predictor is a plain compiled model with the IR's own (dynamic) batch dimension: the
node's static batch with zero-padded partial batches (:class:`node.segmenter.OpenVINOSegmenter`) is
a speed measure and gives the same labels.

Every predictor takes slices larger than the network's exported input (a window widened to a brain
longer than the crop, zero-padded to a multiple of the network's stride:
:func:`converters.prediction.predict_padded`), as the node does: the ONNX and OpenVINO networks are
exported for the crop, so ONNX Runtime gets the graph with free height and width, and OpenVINO a
copy reshaped to each new size.
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
from converters.preprocess import PreprocessSpec
from db.card import check_card
from trainer.exceptions import TrainerError

if TYPE_CHECKING:
    import openvino as ov
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
    layout = device.memory_format if device is not None else torch.contiguous_format

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(batch)).to(dev, memory_format=layout))
            if device is not None:
                device.mark_step()
            return np.asarray(out.float().cpu().numpy())

    return predict


def onnx_predictor(path: Path) -> SlicePredictor:
    """A slice predictor running the ONNX file ``path`` with ONNX Runtime on the CPU, at any slice size
    the network takes (the graph's input and output height and width are made free)."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path))
    for value in (*graph.graph.input, *graph.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[2].dim_param, dims[3].dim_param = "height", "width"
    del graph.graph.value_info[:]  # the exporter's intermediate shapes are those of the crop
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0])

    return predict


#: Copies of a static-shape network reshaped to other window sizes that one predictor keeps compiled
#: (the least recently used go): an evaluation over many cases meets many window sizes.
MAX_RESHAPED = 4


def openvino_predictor(
    card: Mapping[str, Any], model_xml: Path, device: str = "CPU", precision_hint: str | None = "f32"
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
        ``INFERENCE_PRECISION_HINT``; None keeps OpenVINO's default. ``"f32"`` by default, as the node's
        segmenter (node/segmenter.py): on a CPU with native bf16 OpenVINO's default runs an FP32 network,
        and an INT8 network's unquantized layers, in bf16.

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
    spec = PreprocessSpec.from_card(card["preprocessing"])
    channels = spec.channels(len(card["modalities"]))
    shape = model.input(0).get_partial_shape()
    static_channels = shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static
    mismatch = static_channels and spec.channels_mismatch(
        len(card["modalities"]), shape[1].get_length(), model_xml
    )
    if mismatch:
        raise ModelCardError(mismatch)
    config = {"INFERENCE_PRECISION_HINT": precision_hint} if precision_hint else {}
    base, own = core.compile_model(model, device, config), _sides(model)
    compiled: dict[tuple[int, int], ov.CompiledModel] = {}
    logger.info("compiled %s on %s", model_xml.name, device)

    def compiled_for(size: tuple[int, int]) -> ov.CompiledModel:
        if own is None or size == own:
            return base
        if size in compiled:
            compiled[size] = compiled.pop(size)  # the most recently used last
        else:
            reshaped = model.clone()
            first = model.input(0).get_partial_shape()[0]
            reshaped.reshape(ov.PartialShape([first, ov.Dimension(channels), *map(ov.Dimension, size)]))
            compiled[size] = core.compile_model(reshaped, device, config)
            while len(compiled) > MAX_RESHAPED:  # each holds its own buffers: one per window size met
                del compiled[next(iter(compiled))]
        return compiled[size]

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        network = compiled_for((int(batch.shape[2]), int(batch.shape[3])))
        out = network(np.ascontiguousarray(batch, dtype=np.float32))[network.output(0)]
        return np.asarray(out, dtype=np.float32)

    return predict


def _sides(model: ov.Model) -> tuple[int, int] | None:
    """The (height, width) a 4-D network's input fixes, or None when either is free."""
    shape = model.input(0).get_partial_shape()
    if not shape.rank.is_static or shape.rank.get_length() != 4 or shape[2].is_dynamic or shape[3].is_dynamic:
        return None
    return shape[2].get_length(), shape[3].get_length()
