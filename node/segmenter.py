"""The node's inference engine: an OpenVINO IR model compiled once, segmenting whole volumes.

Pre- and post-processing are the shared ones (:func:`converters.preprocess.prepare_volume`,
:func:`converters.prediction.predict_views`, :func:`converters.prediction.restore_outputs`), so the
node segments exactly as the trainer evaluated. What is the node's own is how the network runs: a
static batch, zero-padded partial batches and a warm-up inference at load (docs/benchmarks.md), a
network compiled for each larger window a brain longer than the crop needs, and optional test-time
mirroring (``[inference] mirror``, :func:`mirrored_predictor`) and views (``[inference]
three_views``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ModelCardError
from converters.prediction import (
    DEFAULT_RESTORE,
    SlicePredictor,
    outputs_to_probabilities,
    predict_tiled,
    predict_views,
    probabilities_to_outputs,
    restore_outputs,
    view_axes,
)
from converters.preprocess import Prepared, PreprocessError, PreprocessSpec, prepare_volume
from db.card import check_runnable_card
from node.exceptions import ModelLoadError
from node.memory import release_compiled

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

#: Slices per OpenVINO request (see :class:`OpenVINOSegmenter`).
DEFAULT_BATCH = 8

#: Test-time mirroring (``[inference] mirror``): the world axes of the model's RAS grid whose mirror
#: images are predicted too (0: left-right, 1: anterior-posterior). Every combination of the named
#: axes is predicted (nnU-Net's rule): "lr" costs 2 network passes, "lr+ap" 4.
MIRROR_MODES: dict[str, tuple[int, ...]] = {"none": (), "lr": (0,), "lr+ap": (0, 1)}

#: Networks compiled for slice sizes other than the card's crop (windows widened to a brain longer than
#: the crop, :func:`converters.prediction.predict_padded`) that a segmenter keeps, the least recently
#: used dropped first: a padded size is a multiple of 16 pixels, so a few cover most heads.
MAX_EXTRA_SHAPES = 4


def mirror_axes(mode: str, slice_axis: int) -> tuple[int, ...]:
    """The axes of a (N, C, H, W) slice batch that ``mode`` mirrors, for slices cut along ``slice_axis``.

    The slices' H and W are the model grid's axes other than ``slice_axis``, in order
    (:func:`converters.preprocess.prepare_volume`). A world axis that is the slice axis itself is
    left out: a 2D network sees each slice alone, so reversing the slice order changes nothing.

    Raises
    ------
    ValueError
        ``mode`` is not one of :data:`MIRROR_MODES`.
    """
    if mode not in MIRROR_MODES:
        raise ValueError(f"mirror mode {mode!r} is not one of {', '.join(MIRROR_MODES)}")
    in_plane = [a for a in (0, 1, 2) if a != slice_axis]
    return tuple(2 + in_plane.index(a) for a in MIRROR_MODES[mode] if a != slice_axis)


def mirrored_predictor(
    predict: SlicePredictor, axes: Sequence[int], output_spec: Mapping[str, Any]
) -> SlicePredictor:
    """A slice predictor averaging ``predict``'s probabilities over mirror images of its input.

    Test-time augmentation by mirroring, as nnU-Net does: the batch is predicted as it is and mirrored
    along every non-empty combination of ``axes`` (in one call, so the static batches fill), each
    prediction is mirrored back, and the sigmoid or softmax probabilities are averaged. What it
    returns are raw outputs again (the logit, or log-probability, of the average), so thresholding
    and restoring onto the source grid are unchanged; with no axes, ``predict`` itself is returned.

    Parameters
    ----------
    predict:
        float32 (N, C, H, W) -> logits (N, K, H, W).
    axes:
        Axes of the (N, C, H, W) batch to mirror (2 and/or 3; see :func:`mirror_axes`).
    output_spec:
        The card's ``output`` block (``activation``: sigmoid or softmax).
    """
    if not axes:
        return predict
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    activation = str(output_spec.get("activation"))

    def mirrored(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        n = len(batch)
        stacked = np.concatenate([np.flip(batch, axis=f) if f else batch for f in flips])
        outputs = np.asarray(predict(np.ascontiguousarray(stacked, dtype=np.float32)))
        probs, _ = outputs_to_probabilities(outputs, output_spec)
        total = np.zeros(probs[:n].shape, dtype=np.float64)
        for k, f in enumerate(flips):
            block = probs[k * n : (k + 1) * n]
            total += np.flip(block, axis=f) if f else block
        return probabilities_to_outputs(total / len(flips), activation)

    return mirrored


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


def _fixed_batch(model: ov.Model) -> int | None:
    """The batch a 4-D input fixes (a static first dimension), or None when it is dynamic."""
    shape = model.input(0).get_partial_shape()
    if not shape.rank.is_static or shape.rank.get_length() != 4 or not shape[0].is_static:
        return None
    return int(shape[0].get_length())


class OpenVINOSegmenter:
    """An OpenVINO IR model compiled once, segmenting whole volumes slice batch by slice batch.

    Slices larger than the card's crop (a brain longer than it, zero-padded to a multiple of the
    network's stride: :func:`converters.prediction.predict_padded`) run on a copy of the network
    reshaped to their size, compiled on first use (~0.2 s) and kept for the next jobs
    (:data:`MAX_EXTRA_SHAPES`); a network that cannot be reshaped sees them in crop-sized tiles.

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
        last, partial batch is padded with zeros so that no new batch size is ever compiled in a job.
        8 was chosen on a training case (BraTS2021_00005, 136 slices, INT8 on 2 cores): 0.55 s against
        1.15 s for the former dynamic batch of 16 (see docs/benchmarks.md).
        A network whose batch is fixed (exported so) runs at its own batch instead, padded the same.
    precision_hint:
        ``INFERENCE_PRECISION_HINT``; None keeps OpenVINO's default. ``"f32"`` by default: on a CPU
        with native bf16 (AVX-512 BF16, AMX) OpenVINO's default is bf16, which runs an FP32 model and
        an INT8 model's unquantized layers in bf16, so that the node's labels would depend on the CPU
        (the shipped FP32 IR, BraTS2021_00005 and 00006: 213 and 129 voxels differ; the INT8 model's
        labels were equal either way and as fast, 0.17 s a case, 2026-12-06).
    static_batch:
        False keeps the model's dynamic batch dimension (any batch size per call, no padding).
    mirror:
        Test-time mirroring, one of :data:`MIRROR_MODES` (``[inference] mirror``): ``"none"``,
        ``"lr"`` (the left-right mirror image too, 2 passes) or ``"lr+ap"`` (left-right,
        anterior-posterior and both, 4 passes); see :func:`mirrored_predictor`.
    views:
        1: slices along the card's ``slice_axis`` only; 3: along the model grid's three axes, the
        probabilities averaged (``[inference] three_views``, :func:`converters.prediction.predict_views`;
        about three times the network's work). A card whose grid is not isotropic keeps one view; a
        card whose ``preprocessing.views`` is 3 gets three whatever this says.

    Raises
    ------
    ModelLoadError
        The model file is missing or unreadable, or ``batch_size`` is below 1.
    ModelCardError
        The card lacks a key the node relies on, its ``preprocessing`` block is invalid, or the
        network's channels differ from its modalities.
    ValueError
        ``mirror`` is not one of :data:`MIRROR_MODES`, or ``views`` is not 1 or 3.
    """

    card: dict[str, Any]
    batch_size: int
    model_path: Path
    static_batch: bool
    mirror: str
    views: int

    def __init__(
        self,
        card: Mapping[str, Any],
        model_xml: Path,
        device: str = "CPU",
        batch_size: int = DEFAULT_BATCH,
        precision_hint: str | None = "f32",
        static_batch: bool = True,
        mirror: str = "none",
        views: int = 1,
    ) -> None:
        import openvino as ov

        check_runnable_card(card, f"model card of {model_xml}")
        try:
            spec = PreprocessSpec.from_card(card["preprocessing"])
        except PreprocessError as exc:
            raise ModelCardError(f"model card of {model_xml}: {exc}") from None
        mirror_axes(mirror, spec.slice_axis)  # an unknown mode is refused here, at load
        self.mirror = mirror
        if views not in (1, 3):
            raise ValueError(f"views {views!r} must be 1 or 3")
        # The card's own views (a model trained on three axes) or more when the node asks for them.
        self._view_axes = view_axes(spec, max(views, spec.views))
        if len(self._view_axes) < views:
            logger.warning(
                "%s: its grid (spacing_mm %s) is not isotropic or its input has context slices (%d): "
                "slices along its slice axis only", model_xml, list(spec.spacing_mm), spec.context_slices,
            )
        self.views = len(self._view_axes)
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
            raise ModelLoadError(f"OpenVINO cannot read model file {model_xml}: {exc}") from None
        channels = spec.channels(len(self.card["modalities"]))
        shape = model.input(0).get_partial_shape()
        static_channels = shape.rank.is_static and shape.rank.get_length() == 4 and shape[1].is_static
        mismatch = static_channels and spec.channels_mismatch(
            len(self.card["modalities"]), shape[1].get_length(), model_xml
        )
        if mismatch:
            raise ModelCardError(mismatch)
        fixed = _fixed_batch(model)
        if fixed is not None:
            # A network exported with a fixed batch (1 is common in third-party ONNX files) takes
            # exactly that many slices per request: requests are of that size, the last one padded.
            self.batch_size, self.static_batch = fixed, True
        else:
            self.static_batch = static_batch and _make_static(model, batch_size, channels, self.card)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        self._compiled: ov.CompiledModel = core.compile_model(model, device, config)
        self._core, self._device, self._config = core, device, config
        self._model, self._channels, self._crop = model, channels, spec.crop_size
        sides = model.input(0).get_partial_shape()
        # A network whose height and width are dynamic takes any slice size as it is.
        self._any_size = (
            sides.rank.is_static and sides.rank.get_length() == 4
            and not (sides[2].is_static or sides[3].is_static)
        )
        self._larger: OrderedDict[tuple[int, int], ov.CompiledModel | None] = OrderedDict()
        self._larger_lock = threading.Lock()
        # One inference at the card's input shape, static batch or not: the first allocates and tunes
        # (better before a job waits on it), and a network that cannot take what preprocessing makes
        # of a study (a fixed input other than the card's crop...) is refused here, at load, while the
        # previous model keeps serving, rather than failing every study.
        self._warm_up(channels, spec.crop_size)
        logger.info(
            "compiled %s on %s (batch %d, %s, mirror %s, views %d)",
            model_xml.name, device, batch_size, "static" if self.static_batch else "dynamic", mirror,
            self.views,
        )

    def _warm_up(self, channels: int, crop: tuple[int, int]) -> None:
        """Predict zero slices of the card's shape (N, channels, crop H, crop W) and check that the
        output is (N, K, crop H, crop W), what :func:`converters.prediction.segment_to_grid` reads.
        N is 1 with a static batch (padded to it), else the batch size, as a job's requests come.

        Raises
        ------
        ModelLoadError
            The inference fails, or its output has another shape.
        """
        n = 1 if self.static_batch else self.batch_size
        shape = (n, channels, *crop)
        try:
            out = self.predict(np.zeros(shape, dtype=np.float32))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"a warm-up inference of {self.model_path} at the card's input shape {shape} "
                f"(modalities, preprocessing.crop_size) fails: {first}"
            ) from exc
        if out.ndim != 4 or out.shape[0] != n or tuple(out.shape[2:]) != crop:
            raise ModelLoadError(
                f"a warm-up inference of {self.model_path} at the card's input shape {shape} gives an "
                f"output of shape {tuple(out.shape)}, not ({n}, classes, {crop[0]}, {crop[1]})"
            )

    def release_memory(self) -> None:
        """Hand OpenVINO's intermediate buffers back (they are allocated again by the next inference).

        Called between jobs (:func:`node.runtime.release_idle_memory`), never during an inference.
        """
        release_compiled(self._compiled)
        with self._larger_lock:
            larger = [c for c in self._larger.values() if c is not None]
        for compiled in larger:
            release_compiled(compiled)

    @property
    def larger_sizes(self) -> list[tuple[int, int]]:
        """The slice sizes other than the crop that a network is compiled for, oldest use first."""
        with self._larger_lock:
            return [size for size, compiled in self._larger.items() if compiled is not None]

    def _compiled_for(self, size: tuple[int, int]) -> ov.CompiledModel | None:
        """The network compiled for slices of ``size`` (h, w); None when it cannot take that size."""
        if size == self._crop or self._any_size:
            return self._compiled
        with self._larger_lock:
            if size in self._larger:
                self._larger.move_to_end(size)
                return self._larger[size]
            compiled = self._compile_reshaped(size)
            self._larger[size] = compiled
            while len(self._larger) > MAX_EXTRA_SHAPES:
                self._larger.popitem(last=False)
            return compiled

    def _compile_reshaped(self, size: tuple[int, int]) -> ov.CompiledModel | None:
        """A copy of the network reshaped to (batch, channels, *size) and compiled, or None (logged)
        when OpenVINO refuses the shape or the output is not of that size."""
        import openvino as ov

        start = time.perf_counter()
        batch = self._model.input(0).get_partial_shape()[0]
        model = self._model.clone()
        why = ""
        try:
            model.reshape(ov.PartialShape([batch, ov.Dimension(self._channels), *map(ov.Dimension, size)]))
            compiled = self._core.compile_model(model, self._device, self._config)
            out = compiled.output(0).get_partial_shape()
            if out.rank.get_length() != 4 or (out[2], out[3]) != tuple(map(ov.Dimension, size)):
                why = f"its output would be {out}"
        except RuntimeError as exc:
            why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if why:
            logger.warning(
                "%s cannot take %dx%d slices (%s): they are predicted in %dx%d tiles",
                self.model_path.name, *size, why, *self._crop,
            )
            return None
        logger.info(
            "compiled %s for %dx%d slices in %.2f s", self.model_path.name, *size, time.perf_counter() - start
        )
        return compiled

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Raw network outputs (logits) for a batch of slices (N, C, H, W), any N.

        H and W are the card's crop, or a size larger than it that the network takes (a multiple of
        its stride, :func:`converters.prediction.padded_size`).
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        size = (int(batch.shape[2]), int(batch.shape[3]))
        compiled = self._compiled_for(size)
        if compiled is None:
            return predict_tiled(lambda tile: self._run(self._compiled, tile), batch, self._crop)
        return self._run(compiled, batch)

    def _run(self, compiled: ov.CompiledModel, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``compiled``'s outputs for ``batch`` (C-contiguous float32), in requests of the static batch
        when there is one."""
        output = compiled.output(0)
        # A request of this call's own: calling the CompiledModel would run on a request it keeps, and
        # that request keeps the last input it shared, a view holding the whole study's slices (16 MiB
        # for one FLAIR) until the next job.
        request = compiled.create_infer_request()

        def run(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return np.asarray(request.infer(x, share_inputs=True)[output], dtype=np.float32)

        if not self.static_batch:
            return run(batch)
        size = self.batch_size
        outs = []
        for start in range(0, len(batch), size):
            block = batch[start : start + size]
            n = len(block)
            if n < size:
                block = np.concatenate([block, np.zeros((size - n, *block.shape[1:]), dtype=np.float32)])
            outs.append(run(block)[:n])
        if not outs:
            out_shape = tuple(output.get_partial_shape().get_min_shape())
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
            images, affine, self.card["preprocessing"], self.card["modalities"], brain_mask,
            fit_region=True,
        )

    def infer(self, prepared: Prepared, method: str = DEFAULT_RESTORE) -> npt.NDArray[np.uint8]:
        """uint8 label map (X, Y, Z) on the input grid for prepared slices (see :meth:`segment`).

        ``method``: how the prediction goes back onto a resampled grid
        (:data:`converters.prediction.RESTORE_METHODS`). With :attr:`mirror` other than ``"none"`` the
        probabilities are averaged over the slices' mirror images first (:func:`mirrored_predictor`);
        with :attr:`views` 3, over the slices along the model grid's three axes too
        (:func:`converters.prediction.predict_views`).
        """
        output = self.card["output"]

        def along(axis: int) -> SlicePredictor:
            return mirrored_predictor(self.predict, mirror_axes(self.mirror, axis), output)

        outputs = predict_views(along, prepared, output, self._crop, self._view_axes, self.batch_size)
        return restore_outputs(prepared, outputs, self.card, method)
