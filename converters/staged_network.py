"""An OpenVINO network with large instance norms run in stages: the norms exact and in place, the layers
around them a slab at a time.

Why: deepbet's brain network (node/brain_extraction.py) normalises 8-16 channels of its 256³ grid's
128³ feature maps per channel (``MVN``, an instance norm). Run whole by OpenVINO's CPU plugin it

* holds up to four 64-128 MiB feature maps at once (272 MiB at its peak on 2 cores), and
* accumulates each channel's mean and variance over 2 million voxels in float32: its probabilities
  differ from deepbet's own (PyTorch) network by up to 0.97 at single voxels, and on a BraTS FLAIR
  ~65,000 voxels of the 256³ grid fall on the other side of 0.5 (measured 2026-12-06).

Staged, the network is a chain in which each large tensor exists once:

* every instance norm whose output is ``min_bytes`` or more (and the ReLU after it): each channel's
  mean and variance accumulated over the tensor in NumPy, in float64, and the normalisation applied
  by the next layer's compiled piece to each slab it reads (:func:`_normalising`; no normalised copy
  of the tensor);
* every layer reading or writing such a tensor (a convolution, a transposed convolution or a max
  pooling, with the bias and activation after it) runs alone, along the first spatial axis a slab of
  rows at a time, each slab read with the rows around it that the layer's kernel needs (the layer's
  own padding along the rows taken off: zeros past the tensor's ends stand for it) and written into
  one NumPy array (the plugin's own copies and reorders of a slab are a slab's size);
* the layers between (on small tensors) run as compiled pieces of the original graph; a piece that
  ends by adding its own input (a residual connection around it) is compiled without that addition,
  which is done on its output in NumPy (:func:`_without_residual`);
* a large stage output is a network buffer (converters/network_buffers.py): the next slab-wise layer
  hands its rows back to the kernel as it reads them, so a layer's input shrinks while its output
  grows;
* a max pooling reading a large normalised tensor (deepbet's first convolution, norm, ReLU and
  pooling) pools the layer's raw rows as that layer writes them, the norm's sums taken meanwhile, and
  the norm applied to the pooled tensor after (:class:`_RawPool`): that tensor is never whole.

:func:`plan_stages` returns None for a network without such norms, or one it cannot stage (a large
tensor read by any other layer, a cut that more than one tensor crosses); :func:`compile_network`
then compiles it whole. OpenVINO is imported only when a network is staged or compiled.

:func:`foreground_only` cuts a network's output to the one channel its caller reads (for a two-class
softmax over a biased convolution, :func:`two_class_logit`: one sigmoid channel computed instead of
two), before it is staged or compiled. The node's brain extractor (node/brain_extraction.py) and the
trainer's check of it against deepbet's original networks (trainer/brain_extractor_export.py) run the
networks through this module alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from converters.exceptions import ModelCardError
from converters.network_buffers import network_buffer, release_rows

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

#: A tensor of at least this many bytes is never held twice: its instance norm runs in place and the
#: layers reading or writing it run a slab at a time.
MIN_STAGED_BYTES = 32 * 1024 * 1024
#: Bytes of a slab's input and of its output, each (a slab is at least one stride of rows).
SLAB_BYTES = 4 * 1024 * 1024
#: Layers run a slab at a time: their outputs' rows along the first spatial axis depend on a band of
#: their input's rows only.
_ROW_LOCAL = frozenset({"Convolution", "ConvolutionBackpropData", "MaxPool"})
#: Layers that may follow a row-local layer in its stage: elementwise with a constant (a bias) or
#: with one input (an activation).
_ELEMENTWISE = frozenset({"Add", "Multiply", "Subtract", "Relu", "Sigmoid", "Clamp"})

#: A network run: its input array -> its output array (float32, the network's own shapes).
ArrayNetwork = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
#: Gives a compiled model's intermediate buffers back (node/memory.py ``release_compiled``).
Release = Callable[[Any], None]


@dataclass(frozen=True)
class InstanceNorm:
    """An ``MVN`` over every axis after the channels of an (N, C, ...) tensor, and whether a ReLU
    follows it."""

    eps: float
    inside_sqrt: bool
    relu: bool

    def statistics(self, x: npt.NDArray[np.float32]) -> Normalisation:
        """Each channel's mean and scale over ``x`` (N, C, ...), accumulated in float64."""
        sums = _ChannelSums(x.shape[:2])
        sums.add(x, threads=2)
        return sums.normalisation(self)


@dataclass(frozen=True)
class Normalisation:
    """An instance norm's per-channel figures (N, C) over one tensor: ``(x - mean) * scale``."""

    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Piece:
    """The graph from ``start``'s output (None: the network's input) to ``end``'s output; ``rows``:
    its first layer's band along the first spatial axis where it runs a slab at a time, else None."""

    start: Any
    end: Any
    rows: RowBand | None = None


@dataclass(frozen=True)
class RowBand:
    """Which input rows (first spatial axis) a row-local layer's output rows read.

    ``transposed`` False (convolution, pooling): output row ``o`` reads input rows ``[stride * o -
    pad, stride * o - pad + kernel)``. True (transposed convolution): output row ``o`` receives from
    input rows ``i`` with ``0 <= o + pad - stride * i < kernel``.
    """

    kernel: int
    stride: int
    pad: int
    transposed: bool

    def inputs_for(self, first: int, count: int) -> tuple[int, int]:
        """Input rows ``[lo, hi)`` that output rows ``[first, first + count)`` read (they may reach
        past the input's ends: those rows are the zeros of the layer's padding)."""
        last = first + count - 1
        if self.transposed:
            # ceil((first + pad - kernel + 1) / stride)
            lo = -((self.kernel - 1 - first - self.pad) // self.stride)
            return lo, (last + self.pad) // self.stride + 1
        return self.stride * first - self.pad, self.stride * last - self.pad + self.kernel

    def local_first(self, first: int, lo: int) -> int:
        """Index of global output row ``first`` in the output of the layer run, without padding along
        the rows, on the input rows from ``lo``."""
        return first - self.stride * lo + self.pad if self.transposed else 0


Stage = Piece | InstanceNorm


def _nbytes(output: Any) -> int:
    shape = output.get_partial_shape()
    if shape.is_dynamic:
        return 0
    return int(np.prod(shape.to_shape(), dtype=np.int64)) * output.get_element_type().size


def _consumers(output: Any) -> list[Any]:
    return [t.get_node() for t in output.get_target_inputs()]


def _single_consumer(output: Any) -> Any | None:
    nodes = _consumers(output)
    return nodes[0] if len(nodes) == 1 else None


def _is_elementwise_tail(node: Any) -> bool:
    if node.get_type_name() not in _ELEMENTWISE:
        return False
    others = (node.input_value(i).get_node() for i in range(1, node.get_input_size()))
    return all(o.get_type_name() == "Constant" for o in others)


def _instance_norm(node: Any) -> InstanceNorm | None:
    """The :class:`InstanceNorm` of an ``MVN`` node normalising over every axis after the channels."""
    attrs = node.get_attributes()
    rank = node.get_output_partial_shape(0).rank
    if rank.is_dynamic or not attrs.get("normalize_variance", False) or node.get_input_size() != 2:
        return None
    axes_node = node.input_value(1).get_node()
    if axes_node.get_type_name() != "Constant":
        return None
    n = rank.get_length()
    if sorted(int(a) % n for a in np.asarray(axes_node.get_data()).ravel()) != list(range(2, n)):
        return None
    after = _single_consumer(node.output(0))
    return InstanceNorm(
        eps=float(attrs["eps"]),
        inside_sqrt=str(attrs["eps_mode"]).upper() == "INSIDE_SQRT",
        relu=after is not None and after.get_type_name() == "Relu",
    )


def _row_band(node: Any, nonnegative_input: bool) -> RowBand | None:
    """:class:`RowBand` of a row-local layer along the first spatial axis, None where it has none
    (dilation, automatic padding, a max pooling whose input may be negative: its padding is -inf,
    the slab's is zeros)."""
    kind = node.get_type_name()
    attrs = node.get_attributes()
    if kind not in _ROW_LOCAL or str(attrs.get("auto_pad", "explicit")).lower() not in ("explicit", "notset"):
        return None
    if any(int(d) != 1 for d in attrs.get("dilations", [1])):
        return None
    if kind == "MaxPool":
        if not nonnegative_input:
            return None
        kernel = int(attrs["kernel"][0])
    else:
        if node.get_input_size() != 2 or node.input_value(1).get_node().get_type_name() != "Constant":
            return None
        kernel = int(node.input_value(1).get_partial_shape()[2].get_length())
    pads = (int(attrs["pads_begin"][0]), int(attrs["pads_end"][0]))
    stride = int(attrs["strides"][0])
    if kind == "ConvolutionBackpropData":
        if pads[0] != pads[1]:
            return None
        return RowBand(kernel, stride, pads[0], transposed=True)
    return RowBand(kernel, stride, pads[0], transposed=False)


def plan_stages(model: ov.Model, min_bytes: int = MIN_STAGED_BYTES) -> list[Stage] | None:
    """The stages of ``model`` (one input, one output, static shapes) around its tensors of
    ``min_bytes`` or more; None where it has none, or where one cannot be staged."""
    if len(model.get_parameters()) != 1 or len(model.get_results()) != 1:
        return None
    # A copy holds only what reaches the output: a rewritten ending (two_class_logit) leaves the layers
    # it replaced hanging on the graph's tensors as readers, which would count as a second reader here.
    model = model.clone()
    names = [n.get_friendly_name() for n in model.get_ordered_ops()]
    if len(set(names)) != len(names):
        return None  # pieces are cut from copies of the graph by name
    stages: list[Stage] = []
    start: Any = None  # the current whole piece starts at this node's output
    done: set[str] = set()
    nonnegative: set[str] = set()  # nodes whose output is a ReLU's
    final = model.get_results()[0].input_value(0).get_node()
    for node in model.get_ordered_ops():
        kind, name = node.get_type_name(), node.get_friendly_name()
        if kind in ("Parameter", "Constant", "Result") or name in done:
            continue
        big_out = node.get_output_size() >= 1 and _nbytes(node.output(0)) >= min_bytes
        big_in = node.get_input_size() >= 1 and _nbytes(node.input_value(0)) >= min_bytes
        if not (big_in or big_out):
            continue
        producer = node.input_value(0).get_node()
        if kind == "MVN":
            norm = _instance_norm(node)
            if norm is None or _single_consumer(producer.output(0)) is None:
                return None
            last = _single_consumer(node.output(0)) if norm.relu else node
            assert last is not None  # a ReLU was found after it
            stages += [*_whole(start, producer), norm]
            done.update({name, last.get_friendly_name()})
            if norm.relu:
                nonnegative.add(last.get_friendly_name())
            start = last
            continue
        band = _row_band(node, producer.get_friendly_name() in nonnegative)
        if band is None or len(_consumers(producer.output(0))) != 1:
            return None  # each stage reads the one tensor the stage before it wrote
        end = node
        while (after := _single_consumer(end.output(0))) is not None and _is_elementwise_tail(after):
            end = after
            done.add(after.get_friendly_name())
        stages += [*_whole(start, producer), Piece(_start_of(producer), end, band)]
        start = end
    if not any(isinstance(s, InstanceNorm) for s in stages):
        return None  # what staging is for: no instance norm on a large tensor
    return stages + _whole(start, final)


def _start_of(node: Any) -> Any:
    """A piece's start: None for the network's input, else the node whose output it reads."""
    return None if node.get_type_name() == "Parameter" else node


def _whole(start: Any, end: Any) -> list[Stage]:
    """The whole piece from ``start`` to ``end`` ([] when it would be empty)."""
    if (start is None and end.get_type_name() == "Parameter") or (
        start is not None and start.get_friendly_name() == end.get_friendly_name()
    ):
        return []
    return [Piece(start, end)]


def piece_model(model: ov.Model, piece: Piece) -> ov.Model:
    """``piece`` of a copy of ``model`` as a model of its own, its start's output a new input.

    Raises
    ------
    ValueError
        The piece reads more than that one tensor.
    """
    import openvino as ov
    import openvino.opset13 as ops

    copy = model.clone()
    by_name = {n.get_friendly_name(): n for n in copy.get_ordered_ops()}
    end = by_name[piece.end.get_friendly_name()]
    if piece.start is None:
        parameters = list(copy.get_parameters())
    else:
        source = by_name[piece.start.get_friendly_name()].output(0)
        parameter = ops.parameter(source.get_partial_shape(), source.get_element_type(), "stage_input")
        for target in list(source.get_target_inputs()):
            target.replace_source_output(parameter.output(0))
        parameters = [parameter]
    return ov.Model([end.output(0)], parameters, f"{model.get_friendly_name()}_stage")


@dataclass
class _Compiled:
    """A compiled piece; for a slab-wise one the slab's geometry."""

    compiled: Any
    out_shape: tuple[int, ...]
    band: RowBand | None = None
    rows_per_slab: int = 0
    slab_rows: int = 0
    in_shape: tuple[int, ...] = field(default_factory=tuple)
    #: The slab-wise piece normalises its input itself (the instance norm before it: its figures and a
    #: mask of the slab's rows that lie inside the tensor are inputs 1-3).
    normalises: bool = False
    #: The whole piece's last layer, an addition of its own input, was taken off (:func:`_without_residual`)
    #: and is done on its output in NumPy.
    adds_input: bool = False


@dataclass
class _RawPool:
    """A slab-wise ``layer``, the instance ``norm`` of its output and the max pooling ``pool`` that reads
    the normalised tensor, run as one stage: the pooling takes the layer's raw output a slab at a time
    while the layer writes it, the norm's statistics are summed meanwhile, and the norm (and its ReLU)
    is applied to the pooling's output after. Exact, because ``max((x - mean) * scale)`` is
    ``(max(x) - mean) * scale`` for a positive scale, and ReLU commutes with max too (float rounding is
    monotonic as well). The layer's output, the largest tensor, is never whole in memory (the brain
    network's first 128 MiB map: ~30 MiB off the network's peak)."""

    layer: _Compiled
    norm: InstanceNorm
    pool: _Compiled


class StagedNetwork:
    """``model`` compiled as :func:`plan_stages`' chain; call it with the network's input array.

    Parameters
    ----------
    core:
        The OpenVINO core compiling the pieces.
    model:
        The network (static shapes; one input, one output).
    stages:
        :func:`plan_stages`' result for ``model``.
    device, config:
        As for ``core.compile_model``.
    release:
        Called with each compiled piece after it ran (e.g. ``release_memory``); None: nothing.
    """

    def __init__(
        self,
        core: ov.Core,
        model: ov.Model,
        stages: Sequence[Stage],
        device: str,
        config: dict[str, Any],
        release: Release | None = None,
        buffer_bytes: int = MIN_STAGED_BYTES,
    ) -> None:
        self.release = release
        self.buffer_bytes = buffer_bytes
        self.steps: list[_Compiled | InstanceNorm | _RawPool] = []
        norm: InstanceNorm | None = None
        for stage in stages:
            before, norm = norm, None
            if isinstance(stage, InstanceNorm):
                self.steps.append(stage)
                norm = stage
                continue
            sub = piece_model(model, stage)
            if len(sub.get_parameters()) != 1:
                raise ValueError(f"the stage ending at {stage.end.get_friendly_name()} reads several tensors")
            in_shape = tuple(sub.get_parameters()[0].get_partial_shape().to_shape())
            out_shape = tuple(sub.get_results()[0].get_output_partial_shape(0).to_shape())
            if stage.rows is None:
                cut = _without_residual(sub)
                compiled = core.compile_model(cut or sub, device, config)
                self.steps.append(_Compiled(compiled, out_shape, adds_input=cut is not None))
                continue
            rows, slab = _slab_geometry(stage.rows, in_shape, out_shape)
            _unpad_rows(sub)
            shapes: dict[int, list[int]] = {0: [*in_shape[:2], slab, *in_shape[3:]]}
            raw_pool = before is not None and _is_max_pool(sub) and self._large_slab_output()
            if before is not None and not raw_pool:
                sub = _normalising(sub, before.relu)
                shapes[3] = [1, 1, slab, *([1] * (len(in_shape) - 3))]
            sub.reshape(shapes)
            _check_slabs(stage, rows, out_shape, sub.get_results()[0].get_output_partial_shape(0))
            compiled = core.compile_model(sub, device, config)
            normalises = before is not None and not raw_pool
            step = _Compiled(compiled, out_shape, stage.rows, rows, slab, in_shape, normalises)
            if raw_pool:
                assert before is not None
                self.steps.pop()  # the norm
                layer = self.steps.pop()
                assert isinstance(layer, _Compiled)
                self.steps.append(_RawPool(layer, before, step))
            else:
                self.steps.append(step)

    def _large_slab_output(self) -> bool:
        """Whether the last two steps are a slab-wise layer whose output is a network buffer (the
        staging threshold or more) and the instance norm of that output."""
        if len(self.steps) < 2 or not isinstance(self.steps[-1], InstanceNorm):
            return False
        layer = self.steps[-2]
        if not isinstance(layer, _Compiled) or layer.band is None:
            return False
        return _buffered(layer.out_shape, self.buffer_bytes)

    @property
    def compiled(self) -> list[Any]:
        """The compiled pieces, in order."""
        return [c for step in self.steps if not isinstance(step, InstanceNorm) for c in _compiled_of(step)]

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The network's output for ``x`` (its input's shape, float32). An ``x`` from
        :func:`~converters.network_buffers.network_buffer` is consumed: its rows are handed back to the
        system as the first layer reads them, and read as zeros afterwards."""
        norm: Normalisation | None = None  # computed, applied to the rows the next layer reads
        for step in self.steps:
            if isinstance(step, InstanceNorm):
                norm = step.statistics(x)
                continue
            # plan_stages puts a slab-wise layer, which applies it, after every instance norm
            assert (norm is not None) == (step.layer if isinstance(step, _RawPool) else step).normalises
            if isinstance(step, _RawPool):
                out = self._run_raw_pool(step, x, norm, self.buffer_bytes)
            elif step.band is not None:
                out = self._run_slabs(step, x, norm, self.buffer_bytes)
            else:
                out = _infer_whole(step.compiled, x, self.buffer_bytes)
                if step.adds_input:
                    out += x
            norm = None
            release_rows(x, 0)  # the stage's input is read no more (a caller's buffer too)
            x = out  # and goes with the name (unless the caller holds it) before the release
            if self.release is not None:
                for compiled in _compiled_of(step):
                    self.release(compiled)
        return x

    @staticmethod
    def _run_slabs(
        step: _Compiled, x: npt.NDArray[np.float32], norm: Normalisation | None, buffer_bytes: int
    ) -> npt.NDArray[np.float32]:
        """The layer a slab at a time (:class:`_SlabRun`) into a new output array."""
        out = _output_array(step.out_shape, buffer_bytes)
        run = _SlabRun(step, x, norm)
        for first in range(0, step.out_shape[2], step.rows_per_slab):
            run.write(first, out)
        return out

    @staticmethod
    def _run_raw_pool(
        step: _RawPool, x: npt.NDArray[np.float32], norm: Normalisation | None, buffer_bytes: int
    ) -> npt.NDArray[np.float32]:
        """:class:`_RawPool`: the layer's slabs written as the pooling's slabs need their rows, into a
        network buffer whose rows the pooling releases behind it; the norm's sums taken on each slab
        written; the norm applied to the pooling's output at the end."""
        layer, pool = step.layer, step.pool
        assert pool.band is not None
        # Untouched pages take no memory; 4 KiB pages, not huge ones: only a few rows of each of its
        # (16) channels are live at a time (huge pages kept ~28 MiB more resident on the brain network).
        raw = network_buffer(layer.out_shape, huge_pages=False)
        write_layer = _SlabRun(layer, x, norm)
        pooled = _output_array(pool.out_shape, buffer_bytes)
        read_pool = _SlabRun(pool, raw, None, fill=-np.inf)  # past the ends: nothing to take the max of
        sums = _ChannelSums(layer.out_shape[:2])
        n_raw, written = layer.out_shape[2], 0

        def write_slab() -> int:
            """The layer's next slab of raw rows, added to the norm's sums; the first row after it."""
            count = write_layer.write(written, raw)
            sums.add(raw[:, :, written : written + count])
            return written + count

        for first in range(0, pool.out_shape[2], pool.rows_per_slab):
            lo, _ = pool.band.inputs_for(first, pool.rows_per_slab)
            while written < min(lo + pool.slab_rows, n_raw):
                written = write_slab()
            read_pool.write(first, pooled)
        while written < n_raw:  # rows no pooling window reads still count for the norm
            start, written = written, write_slab()
            release_rows(raw, start, written)
        release_rows(raw, 0)
        figures = sums.normalisation(step.norm)
        shape = (*figures.mean.shape, *([1] * (pooled.ndim - 2)))
        pooled -= figures.mean.astype(np.float32).reshape(shape)
        pooled *= figures.scale.astype(np.float32).reshape(shape)
        if step.norm.relu:
            np.maximum(pooled, 0.0, out=pooled)
        return pooled


class _SlabRun:
    """A slab-wise layer (``step``) over ``x``, one slab of output rows per :meth:`write`, in order.

    ``norm``: the instance norm its input still needs, which the compiled piece applies itself
    (:func:`_normalising`); ``fill``: what the slab holds past the input's ends (zeros: the layer's own
    padding, taken off the piece; -inf for a max pooling of a raw tensor). The rows of a network buffer
    ``x`` that no later slab reads are released as the slabs go.
    """

    def __init__(
        self, step: _Compiled, x: npt.NDArray[np.float32], norm: Normalisation | None, fill: float = 0.0
    ) -> None:
        assert step.band is not None
        self.step, self.band, self.x, self.fill = step, step.band, x, np.float32(fill)
        self.slab = np.zeros((*step.in_shape[:2], step.slab_rows, *step.in_shape[3:]), dtype=np.float32)
        self.request = step.compiled.create_infer_request()
        self.inputs: dict[int, npt.NDArray[np.float32]] = {0: self.slab}
        self.inside = np.zeros((1, 1, step.slab_rows) + (1,) * (len(step.in_shape) - 3), dtype=np.float32)
        if norm is not None:  # inside: the rows of the slab in the tensor, set per slab below
            extra = (1,) * (len(step.in_shape) - 2)
            self.inputs[1] = norm.mean.astype(np.float32).reshape(*norm.mean.shape, *extra)
            self.inputs[2] = norm.scale.astype(np.float32).reshape(*norm.scale.shape, *extra)
            self.inputs[3] = self.inside
        self.done = 0  # rows of x below this are released

    def write(self, first: int, out: npt.NDArray[np.float32]) -> int:
        """Output rows from ``first`` (a multiple of the slab's rows) into the same rows of ``out``;
        how many."""
        step, slab, fill = self.step, self.slab, self.fill
        n_in, n_out = step.in_shape[2], step.out_shape[2]
        count = min(step.rows_per_slab, n_out - first)
        lo, _ = self.band.inputs_for(first, step.rows_per_slab)
        release_rows(self.x, self.done, lo)  # the band's first row only grows from slab to slab
        self.done = max(self.done, lo)
        a, b = max(lo, 0), min(lo + step.slab_rows, n_in)  # rows of x in the slab; the rest ``fill``
        slab[:, :, : a - lo] = fill
        slab[:, :, a - lo : b - lo] = self.x[:, :, a:b]
        slab[:, :, b - lo :] = fill
        self.inside[:] = 0.0
        self.inside[:, :, a - lo : b - lo] = 1.0
        self.request.infer(self.inputs, share_inputs=True)
        local = self.band.local_first(first, lo)
        out[:, :, first : first + count] = self.request.get_output_tensor(0).data[:, :, local : local + count]
        return count


class _ChannelSums:
    """Each channel's sum and sum of squares over an (N, C, rows, ...) tensor, whole or a slab of rows at
    a time, in float64, and its instance norm's figures from them."""

    def __init__(self, channels: Sequence[int]) -> None:
        self.sum = np.zeros(tuple(channels), dtype=np.float64)
        self.squares = np.zeros(tuple(channels), dtype=np.float64)
        self.count = 0

    def add(self, rows: npt.NDArray[np.float32], threads: int = 1) -> None:
        """Add a slab of rows (a view of the tensor); ``threads`` > 1: channels summed in parallel
        (NumPy's reductions release the GIL)."""
        n, c = rows.shape[:2]

        def one(index: tuple[int, int]) -> None:
            flat = rows[index].reshape(-1)
            self.sum[index] += float(flat.sum(dtype=np.float64))
            self.squares[index] += float(np.einsum("i,i->", flat, flat, dtype=np.float64))

        indices = [(i, j) for i in range(n) for j in range(c)]
        if threads > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(one, indices))
        else:
            for index in indices:
                one(index)
        self.count += int(np.prod(rows.shape[2:], dtype=np.int64))

    def normalisation(self, norm: InstanceNorm) -> Normalisation:
        """``norm``'s figures from the sums."""
        mean = self.sum / self.count
        var = np.maximum(self.squares / self.count - mean * mean, 0.0)
        scale = 1.0 / (np.sqrt(var + norm.eps) if norm.inside_sqrt else np.sqrt(var) + norm.eps)
        return Normalisation(mean, scale)


def _compiled_of(step: _Compiled | _RawPool) -> list[Any]:
    """The compiled pieces a step runs."""
    return [step.layer.compiled, step.pool.compiled] if isinstance(step, _RawPool) else [step.compiled]


def _is_max_pool(piece: ov.Model) -> bool:
    """Whether ``piece`` is one max pooling of its input and nothing else."""
    layers = [op for op in piece.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Result")]
    return len(layers) == 1 and layers[0].get_type_name() == "MaxPool"


def _normalising(piece: ov.Model, relu: bool) -> ov.Model:
    """``piece`` with the instance norm of its input applied first: ``(x - mean) * scale``, then
    ReLU if ``relu``, times ``inside`` (1 on the slab's rows that lie in the tensor, 0 on those past
    its ends, which stand for the layer's zero padding of the normalised tensor). ``mean`` and
    ``scale`` (N, C, 1, ...) and ``inside`` (1, 1, rows, 1, ...) are its inputs 1, 2 and 3."""
    import openvino as ov
    import openvino.opset13 as ops

    (source,) = piece.get_parameters()
    shape = source.get_partial_shape()
    rank = shape.rank.get_length()
    readers = list(source.output(0).get_target_inputs())
    per_channel = [shape[0], shape[1], *([1] * (rank - 2))]
    mean = ops.parameter(per_channel, np.float32, "stage_mean")
    scale = ops.parameter(per_channel, np.float32, "stage_scale")
    inside = ops.parameter([1, 1, shape[2], *([1] * (rank - 3))], np.float32, "stage_inside")
    y: Any = ops.multiply(ops.subtract(source, mean), scale)
    if relu:
        y = ops.relu(y)
    y = ops.multiply(y, inside)
    for reader in readers:
        reader.replace_source_output(y.output(0))
    return ov.Model(piece.get_results(), [source, mean, scale, inside], piece.get_friendly_name())


def _without_residual(piece: ov.Model) -> ov.Model | None:
    """``piece`` without its last layer when that layer adds the piece's own input to the rest (a
    residual connection around the whole piece, as deepbet's last decoder block has), else None.

    Why: the plugin otherwise keeps its own copy of the input, in its own layout, through the whole
    piece for that one addition (16 MiB more at the brain network's peak on its 64³ piece); the caller
    holds the input anyway and adds it to the output (the same float32 additions, so the same values).
    """
    (parameter,) = piece.get_parameters()
    (result,) = piece.get_results()
    add = result.input_value(0).get_node()
    if add.get_type_name() != "Add" or add.get_input_size() != 2:
        return None
    inputs = [add.input_value(i) for i in range(2)]
    rest = [v for v in inputs if v.get_node().get_friendly_name() != parameter.get_friendly_name()]
    if len(rest) != 1 or rest[0].get_partial_shape() != parameter.get_partial_shape():
        return None  # not the input plus one tensor of its shape (no broadcast)
    import openvino as ov

    return ov.Model([rest[0]], [parameter], f"{piece.get_friendly_name()}_without_residual")


def _infer_whole(
    compiled: Any, x: npt.NDArray[np.float32], buffer_bytes: int = MIN_STAGED_BYTES
) -> npt.NDArray[np.float32]:
    """``compiled`` run once on ``x`` on a request of its own, its output copied out of the request
    (into a network buffer from ``buffer_bytes`` on: :func:`_output_array`)."""
    request = compiled.create_infer_request()
    request.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True)
    data = request.get_output_tensor(0).data
    out = _output_array(data.shape, buffer_bytes)
    out[...] = data
    return out


def _output_array(shape: Sequence[int], buffer_bytes: int) -> npt.NDArray[np.float32]:
    """A stage's output: a network buffer, which the next slab-wise stage consumes as it reads it,
    from ``buffer_bytes`` on; a plain array below (a smaller tensor saves little that way, and its own
    memory map and page faults cost more time than the heap's reused pages: ~0.08 s a brain network)."""
    return network_buffer(shape) if _buffered(shape, buffer_bytes) else np.empty(tuple(shape), np.float32)


def _buffered(shape: Sequence[int], buffer_bytes: int) -> bool:
    """Whether a stage output of ``shape`` goes in a network buffer (:func:`_output_array`)."""
    return int(np.prod(shape, dtype=np.int64)) * 4 >= buffer_bytes


def _unpad_rows(piece: ov.Model) -> None:
    """Take the padding along the rows (first spatial axis) off the layer reading ``piece``'s input:
    the slabs carry their own rows, zeros past the input's ends."""
    (parameter,) = piece.get_parameters()
    (target,) = parameter.output(0).get_target_inputs()
    layer = target.get_node()
    for key in ("pads_begin", "pads_end"):
        pads = [int(p) for p in layer.get_attributes()[key]]
        layer.set_attribute(key, [0, *pads[1:]])
    piece.validate_nodes_and_infer_types()


def _slab_geometry(band: RowBand, in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[int, int]:
    """Output rows per slab and input rows per slab of a slab-wise layer: as many output rows as keep
    both the slab's input and its output within :data:`SLAB_BYTES` (the plugin copies each into its
    own layout), a whole number of strides (so that every slab's input rows start alike) and at least
    one stride; each slab's input as long as the longest band any slab reads."""
    in_row = int(np.prod(in_shape, dtype=np.int64)) // in_shape[2] * 4
    out_row = int(np.prod(out_shape, dtype=np.int64)) // out_shape[2] * 4

    def length(rows: int) -> int:
        return max(hi - lo for lo, hi in (band.inputs_for(f, rows) for f in range(0, out_shape[2], rows)))

    rows = band.stride
    while rows + band.stride <= out_shape[2] and max(
        (rows + band.stride) * out_row, length(rows + band.stride) * in_row
    ) <= SLAB_BYTES:
        rows += band.stride
    return rows, length(rows)


def _check_slabs(stage: Piece, rows: int, out_shape: Sequence[int], local: Any) -> None:
    """Raise ValueError unless every slab's output rows lie inside what the layer computes on the slab
    (a layer whose padding or kernel the band arithmetic does not cover is run whole instead)."""
    assert stage.rows is not None
    length = local[2].get_length()
    for first in range(0, out_shape[2], rows):
        lo, _ = stage.rows.inputs_for(first, rows)
        at = stage.rows.local_first(first, lo)
        if at < 0 or at + min(rows, out_shape[2] - first) > length:
            raise ValueError(
                f"the layer ending at {stage.end.get_friendly_name()} cannot run a slab at a time "
                f"(output rows {first}+{rows} of {out_shape[2]} fall outside its slab's {length})"
            )


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


def on_grid(
    network: ArrayNetwork, before: Callable[[], object] | None = None
) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
    """``network`` (a batch of one image of one channel in, one channel out) called with the image's
    grid itself, and giving the probabilities on it; ``before``: called first on each call. The network
    reads the array itself, not a copy (64 MiB on the brain network's 256³ grid)."""

    def run(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if before is not None:
            before()
        return network(np.ascontiguousarray(x[None, None], dtype=np.float32))[0, 0]

    return run


def compile_network(
    core: ov.Core,
    model: ov.Model,
    device: str,
    config: dict[str, Any],
    release: Release | None = None,
    min_bytes: int = MIN_STAGED_BYTES,
) -> tuple[ArrayNetwork, list[Any]]:
    """``model`` as a :class:`StagedNetwork` where :func:`plan_stages` stages it, else compiled whole;
    the callable (input array -> output array) and its compiled models."""
    stages = plan_stages(model, min_bytes)
    if stages is not None:
        try:
            staged = StagedNetwork(core, model, stages, device, config, release, buffer_bytes=min_bytes)
        except (ValueError, RuntimeError) as exc:  # a piece OpenVINO will not build or compile
            logger.warning("%s runs whole: %s", model.get_friendly_name(), str(exc).strip().splitlines()[-1])
        else:
            logger.debug("%s runs in %d stages", model.get_friendly_name(), len(staged.steps))
            return staged, staged.compiled
    compiled = core.compile_model(model, device, config)

    def whole(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = _infer_whole(compiled, x)
        if release is not None:
            release(compiled)
        return out

    return whole, [compiled]
