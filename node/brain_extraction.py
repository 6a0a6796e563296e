"""Brain extraction on the CPU: deepbet's two networks as OpenVINO IR, compiled once.

The algorithm around the networks is :mod:`converters.brain_mask` (deepbet's, in numpy and scipy);
this module compiles the model directory's two IR files (``models/brain_extraction``, the card's
``networks``) with static shapes and hands them to a :class:`~converters.brain_mask.BrainMasker`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from converters.brain_mask import (
    NETWORKS,
    BrainExtractionSettings,
    BrainMasker,
    NoBrainFoundError,
    brain_volume_ml,
)
from converters.exceptions import ModelCardError
from db.card import check_runnable_card
from node.exceptions import ModelLoadError
from node.memory import release_compiled, trim_heap

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

__all__ = ["BrainExtractor", "NoBrainFoundError", "brain_volume_ml", "compile_networks"]


def foreground_only(model: ov.Model, channel: int) -> ov.Model:
    """``model`` with its one output cut to the foreground ``channel``.

    The node reads that channel only. OpenVINO's CPU plugin keeps a model's output buffer after
    ``release_memory`` (only the intermediate buffers are released): for the brain network's two
    channels on its 256³ grid, 128 MiB that stayed resident between studies. The cut output is
    written straight into the request's own tensor instead, which goes with the request (measured:
    the compiled brain network held 146 MiB after an inference and a release, 19 MiB with the cut).

    Where the network ends in a two-class softmax over a biased (transposed) convolution, as deepbet's
    do, the cut is :func:`two_class_logit` (the same probabilities, one channel computed instead of
    two); otherwise a Slice on axis 1 of the output.

    Raises
    ------
    ModelCardError
        The output has no such channel.
    """
    import openvino as ov
    import openvino.opset13 as ops

    (result,) = model.get_results()
    source = result.input_value(0)
    shape = source.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() < 2 or (
        shape[1].is_static and not 0 <= channel < shape[1].get_length()
    ):
        raise ModelCardError(f"brain extractor: output.channel {channel} is not a channel of {shape}")
    folded = two_class_logit(model, channel)
    if folded is not None:
        return folded

    def index(value: int) -> ov.Node:
        return ops.constant(np.array([value], dtype=np.int64))

    foreground = ops.slice(source, index(channel), index(channel + 1), index(1), index(1))
    return ov.Model([foreground], model.get_parameters(), model.get_friendly_name())


#: Layers whose output channels can be folded, and the axis of their weights that holds those channels.
_OUTPUT_CHANNEL_AXIS = {"Convolution": 0, "ConvolutionBackpropData": 1}


def two_class_logit(model: ov.Model, channel: int) -> ov.Model | None:
    """``model``'s two-class softmax ending rewritten as one sigmoid channel; None where it has another.

    For two classes, ``softmax(z)[c] = sigmoid(z[c] - z[1 - c])``, and when ``z`` is a convolution
    (plain or transposed) plus a bias, ``z[c] - z[1 - c]`` is one convolution whose weights and bias
    are the differences of the two channels'. The rewritten network computes and stores one channel
    on the full grid instead of two, then a sigmoid in place of the softmax and the slice: on the
    brain network's 256³ grid 112 MiB less at its peak and ~0.05-0.1 s less per call (2 cores),
    probabilities within 1e-6 of the softmax's and identical masks (tests/node/test_memory.py,
    benchmarks/brain_extraction.py).
    """
    import openvino as ov
    import openvino.opset13 as ops

    results = model.get_results()
    if len(results) != 1:
        return None
    softmax = results[0].input_value(0).get_node()
    shape = softmax.get_output_partial_shape(0)
    if softmax.get_type_name() != "Softmax" or shape.rank.is_dynamic or shape.rank.get_length() < 2:
        return None
    rank = shape.rank.get_length()
    if shape[1] != ov.Dimension(2) or int(softmax.get_attributes()["axis"]) not in (1, 1 - rank):
        return None
    add = softmax.input_value(0).get_node()
    if add.get_type_name() != "Add":
        return None
    layer, bias = (add.input_value(i).get_node() for i in (0, 1))
    axis = _OUTPUT_CHANNEL_AXIS.get(layer.get_type_name())
    if axis is None or layer.get_input_size() != 2 or bias.get_type_name() != "Constant":
        return None
    weights = layer.input_value(1).get_node()
    if weights.get_type_name() != "Constant":
        return None
    w = np.asarray(weights.get_data(), dtype=np.float32)
    b = np.asarray(bias.get_data(), dtype=np.float32)
    if w.shape[axis] != 2 or b.shape != (1, 2, *([1] * (rank - 2))):
        return None
    other = 1 - channel
    w_diff = np.take(w, [channel], axis=axis) - np.take(w, [other], axis=axis)
    b_diff = b[:, [channel]] - b[:, [other]]
    attrs = layer.get_attributes()
    conv_attrs = {k: attrs[k] for k in ("pads_begin", "pads_end", "dilations", "auto_pad")}
    if axis == 1:
        logit = ops.convolution_backprop_data(
            layer.input_value(0), ops.constant(w_diff), attrs["strides"],
            output_padding=attrs["output_padding"], **conv_attrs,
        )
    else:
        logit = ops.convolution(layer.input_value(0), ops.constant(w_diff), attrs["strides"], **conv_attrs)
    foreground = ops.sigmoid(ops.add(logit, ops.constant(b_diff)))
    return ov.Model([foreground], model.get_parameters(), model.get_friendly_name())


def compile_networks(
    card: Mapping[str, Any],
    directory: Path,
    device: str = "CPU",
    threads: int | None = None,
    precision: str = "fp32",
    verified: Collection[Path] | None = None,
) -> BrainMasker:
    """The card's two IR networks compiled by OpenVINO (static shapes), in a :class:`BrainMasker`.

    ``verified``: the files whose sha256 was checked (the model's registered files); each network's
    ``.xml`` and its ``.bin`` must be among them, else nothing is compiled. None: no such check (a
    directory the caller vouches for).

    Raises
    ------
    ModelLoadError
        An IR file is missing, not among ``verified``, or OpenVINO cannot compile it.
    ModelCardError
        The card is not a brain-extraction card or names no networks.
    """
    import openvino as ov

    check_runnable_card(card)
    if card["task"] != "brain_extraction":
        raise ModelCardError(f"model {card.get('name')!r} has task {card['task']!r}, not brain_extraction")
    settings = BrainExtractionSettings.from_card(card)
    networks = (card.get("networks") or {}).get(precision)
    if not isinstance(networks, Mapping) or any(k not in networks for k in NETWORKS):
        raise ModelCardError(
            f"model {card.get('name')!r}: networks.{precision} must name the {' and '.join(NETWORKS)} IR"
        )
    core = ov.Core()
    channel = int(card["output"].get("channel", 1))
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    grids = {"bbox": settings.bbox_grid, "brain": settings.brain_grid}
    xmls = {key: Path(directory) / str(networks[key]) for key in NETWORKS}
    checked = None if verified is None else {Path(p).resolve() for p in verified}
    for key, xml in xmls.items():
        if not xml.is_file():
            raise ModelLoadError(f"brain extractor {card.get('name')!r}: {xml} does not exist")
        if checked is None:
            continue
        unchecked = [p for p in (xml, xml.with_suffix(".bin")) if p.resolve() not in checked]
        if unchecked:
            raise ModelLoadError(
                f"brain extractor {card.get('name')!r}: networks.{precision}.{key} names {xml}, but "
                f"{', '.join(str(p) for p in unchecked)} is not among the model's registered files (their "
                "sha256 is checked before loading, this one's was not)"
            )
    compiled: dict[str, ov.CompiledModel] = {}
    for key, xml in xmls.items():
        try:
            model = core.read_model(str(xml))
            model.reshape([1, 1, *grids[key]])
            compiled[key] = core.compile_model(foreground_only(model, channel), device, config)
        except RuntimeError as exc:
            raise ModelLoadError(f"brain extractor: OpenVINO cannot compile {xml}: {exc}") from None

    def run(key: str) -> Any:
        net = compiled[key]

        def foreground(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            # A request of its own, dropped after the call, and the network's buffers released: the
            # brain network on its 256³ grid holds ~450 MiB otherwise, between studies too
            # (node/memory.py; allocating them again costs ~0.1 s a call).
            request = net.create_infer_request()
            # share_inputs: the network reads the array itself rather than a copy (64 MiB on 256³)
            request.infer({0: np.ascontiguousarray(x[None, None], dtype=np.float32)}, share_inputs=True)
            out = np.array(request.get_output_tensor(0).data[0, 0], dtype=np.float32)
            del request
            release_compiled(net)
            trim_heap()  # a few ms; keeps the rest of the job from stacking on the freed pages
            return out

        return foreground

    nets = {key: run(key) for key in NETWORKS}
    for key, net in nets.items():
        # One call on zeros at load: OpenVINO's CPU plugin fills each network's own input buffer when
        # it compiles (64 MiB on the brain network's 256³ grid, 8 MiB on the box network's 128³) and
        # frees it at the first inference, which reads the request's tensor instead; otherwise the node
        # idles with it until its first study. 0.8 to 1.7 s more at load on 2 cores, none in a job.
        net(np.zeros(grids[key], dtype=np.float32))
    logger.info(
        "compiled brain extractor %s %s on %s (box %s, brain %s, %s)",
        card.get("name"),
        card.get("version"),
        device,
        grids["bbox"],
        grids["brain"],
        settings.interpolation,
    )
    return BrainMasker(settings, nets["bbox"], nets["brain"])


class BrainExtractor:
    """The node's brain extractor: :func:`compile_networks` once, then :meth:`extract` per study.

    Parameters
    ----------
    card:
        The brain extractor's model card (task ``brain_extraction``; docs/model-card.md).
    directory:
        The directory holding the IR files the card's ``networks`` name.
    device:
        OpenVINO device.
    threads:
        ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, all cores).
    """

    def __init__(
        self,
        card: Mapping[str, Any],
        directory: Path,
        device: str = "CPU",
        threads: int | None = None,
        *,
        precision: str = "fp32",
        verified: Collection[Path] | None = None,
    ) -> None:
        self.card = dict(card)
        self.masker = compile_networks(
            card, directory, device=device, threads=threads, precision=precision, verified=verified
        )
        self.settings = self.masker.settings

    @classmethod
    def from_dir(cls, directory: Path, device: str = "CPU", threads: int | None = None) -> BrainExtractor:
        """The extractor of a model directory (``model.json`` + IR), its files verified first."""
        from db.card import load_card, verify_files

        card = load_card(directory)
        problems = verify_files(card, directory)
        if problems:
            raise ModelLoadError("; ".join(problems))
        checked = [directory / f["path"] for a in card.get("artifacts", []) for f in a.get("files", [])]
        return cls(card, directory, device=device, threads=threads, verified=checked)

    def extract(self, image: npt.NDArray[Any], affine: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """The brain mask of ``image`` (RAS (X, Y, Z), as :func:`node.pipeline.assemble_coregistered`
        gives) on its grid; raises :class:`NoBrainFoundError` (see
        :meth:`converters.brain_mask.BrainMasker.extract`)."""
        return self.masker.extract(image, affine)
