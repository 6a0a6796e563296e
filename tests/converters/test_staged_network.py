"""converters.staged_network: a network with large instance norms run in stages gives the network's
output (to float32 rounding of the norms' statistics), a slab at a time, and a network it cannot stage
runs whole.

The networks here are small U-Net-like chains built with OpenVINO's opset, shaped like deepbet's brain
network (a 7³ stride-2 convolution, an instance norm, a 3³ stride-2 max pooling; at the end a 3³
stride-2 transposed convolution, norms, a 3³ convolution, a 2³ stride-2 transposed convolution and a
sigmoid); the real network and its original are compared in tests/node/test_brain_extraction.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import converters.staged_network as staged
from converters.network_buffers import network_buffer
from converters.staged_network import InstanceNorm, Piece, RowBand, compile_network, plan_stages

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
#: Staged from here: the full-resolution tensors of the test networks, not those of their small grid.
MIN_BYTES = 4 * 16**3 * 4


def _weights(rng: np.random.Generator, *shape: int) -> Any:
    import openvino.opset13 as ops

    return ops.constant((rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32))


def _norm(x: Any, relu: bool = True) -> Any:
    import openvino.opset13 as ops

    y = ops.mvn(x, ops.constant(np.array([2, 3, 4], dtype=np.int64)), True, 1e-5, "inside_sqrt")
    return ops.relu(y) if relu else y


def unet_like(
    size: int, seed: int = 0, residual_at_full: bool = False, softmax: bool = False, input_twice: bool = False
) -> Any:
    """A deepbet-shaped 3D network on a ``size``³ grid (one channel in, one sigmoid channel out; with
    ``softmax``, two classes as deepbet's own networks end)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(seed)
    x = ops.parameter([1, 1, size, size, size], np.float32, "image")
    c = ops.convolution(x, _weights(rng, 6, 1, 7, 7, 7), [2, 2, 2], [3, 3, 3], [3, 3, 3], [1, 1, 1])
    n = _norm(c)
    p = ops.max_pool(n, [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1], [3, 3, 3]).output(0)
    d = ops.convolution(p, _weights(rng, 6, 6, 3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    d = ops.add(_norm(d, relu=False), p)  # a residual on the small grid, inside a piece run whole
    if input_twice:  # the input read by a second layer too: cannot be staged
        d = ops.add(d, ops.convolution(x, _weights(rng, 6, 1, 4, 4, 4), [4, 4, 4], [0] * 3, [0] * 3, [1] * 3))
    t = ops.convolution_backprop_data(
        d, _weights(rng, 6, 4, 3, 3, 3), [2, 2, 2], pads_begin=[1, 1, 1], pads_end=[1, 1, 1],
        dilations=[1, 1, 1], output_padding=[1, 1, 1],
    )
    t = ops.add(t, ops.constant(rng.normal(size=(1, 4, 1, 1, 1)).astype(np.float32)))
    n1 = _norm(t)
    if residual_at_full:
        n1 = ops.add(n1, t)  # a large tensor read twice: cannot be staged
    c2 = ops.convolution(n1, _weights(rng, 4, 4, 3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    c2 = ops.add(c2, ops.constant(rng.normal(size=(1, 4, 1, 1, 1)).astype(np.float32)))
    n2 = _norm(c2)
    classes = 2 if softmax else 1
    up = ops.convolution_backprop_data(
        n2, _weights(rng, 4, classes, 2, 2, 2), [2, 2, 2], pads_begin=[0, 0, 0], pads_end=[0, 0, 0],
        dilations=[1, 1, 1],
    )
    up = ops.add(up, ops.constant(np.full((1, classes, 1, 1, 1), 0.1, np.float32)))
    out = ops.softmax(up, 1) if softmax else ops.sigmoid(up)
    return ov.Model([out], [x], "unet_like")


def conv_norm_pool(size: int, bias: float, pool_pad: int) -> Any:
    """A 3³ convolution plus ``bias``, its instance norm and ReLU, and a 3³ stride-2 max pooling
    padded by ``pool_pad``: the stage a raw-pool run takes as one."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(3)
    x = ops.parameter([1, 1, size, size, size], np.float32, "image")
    c = ops.convolution(x, _weights(rng, 4, 1, 3, 3, 3), [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    c = ops.add(c, ops.constant(np.full((1, 4, 1, 1, 1), bias, np.float32)))
    pads = [pool_pad] * 3
    p = ops.max_pool(_norm(c), [2, 2, 2], [1, 1, 1], pads, pads, [3, 3, 3]).output(0)
    return ov.Model([p], [x], "conv_norm_pool")


def run_whole(model: Any, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    import openvino as ov

    return np.asarray(ov.Core().compile_model(model, "CPU", F32)(x)[0])


def test_plan_of_a_deepbet_shaped_network() -> None:
    size = 32
    big = 6 * 16**3 * 4  # the first convolution's output, the largest tensor but the input
    stages = plan_stages(unet_like(size), min_bytes=MIN_BYTES)
    assert stages is not None
    kinds = ["norm" if isinstance(s, InstanceNorm) else ("slabs" if s.rows else "whole") for s in stages]
    # first convolution | its norm | max pooling | the small grid | transposed convolution | norm |
    # convolution | norm | transposed convolution (and sigmoid)
    assert kinds == ["slabs", "norm", "slabs", "whole", "slabs", "norm", "slabs", "norm", "slabs"]
    pieces = [s for s in stages if isinstance(s, Piece)]
    assert [p.rows for p in pieces if p.rows] == [
        RowBand(7, 2, 3, transposed=False),
        RowBand(3, 2, 1, transposed=False),
        RowBand(3, 2, 1, transposed=True),
        RowBand(3, 1, 1, transposed=False),
        RowBand(2, 2, 0, transposed=True),
    ]
    assert all(s.relu for s in stages if isinstance(s, InstanceNorm))
    assert plan_stages(unet_like(size), min_bytes=big + 1) is None  # no instance norm that large


@pytest.mark.parametrize("size", [32, 40])
@pytest.mark.parametrize("slab_bytes", [1, 64 * 1024, 1 << 30])
def test_staged_network_gives_the_networks_output(
    size: int, slab_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # slab_bytes 1: one stride of rows per slab (the most slabs, every edge case at both ends); 1 GiB: one
    # slab; 40: the last slab of each layer shorter than the others
    import openvino as ov

    monkeypatch.setattr(staged, "SLAB_BYTES", slab_bytes)
    model = unet_like(size)
    x = np.random.default_rng(1).normal(size=(1, 1, size, size, size)).astype(np.float32)
    released: list[Any] = []
    network, compiled = compile_network(ov.Core(), model, "CPU", F32, released.append, min_bytes=MIN_BYTES)
    assert isinstance(network, staged.StagedNetwork)
    # the first convolution, its norm and the max pooling of it run as one stage: the pooling takes the
    # convolution's raw rows as they are written, the norm applied to the pooled tensor
    assert isinstance(network.steps[0], staged._RawPool)
    assert sum(isinstance(step, staged._RawPool) for step in network.steps) == 1
    out = network(x)
    np.testing.assert_allclose(out, run_whole(model, x), atol=2e-5)
    assert len(released) == len(compiled) == 6, "each compiled piece gives its buffers back after it ran"
    np.testing.assert_array_equal(network(x), out)  # again, after the release


@pytest.mark.parametrize(("bias", "pool_pad"), [(-8.0, 1), (0.0, 0)])
def test_a_max_pooling_of_a_norm_pools_the_raw_rows_exactly(
    bias: float, pool_pad: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bias -8: every raw value negative, so a zero past the ends would win the max and show after the
    # norm; pads 0: the pooling never reads the last row, whose values still count for the norm
    import openvino as ov

    monkeypatch.setattr(staged, "SLAB_BYTES", 1)
    size = 18  # 18 rows, of which a pooling without padding reads 17 (its slabs: two rows of 17)
    model = conv_norm_pool(size, bias, pool_pad)
    x = np.random.default_rng(4).normal(size=(1, 1, size, size, size)).astype(np.float32)
    network, _ = compile_network(ov.Core(), model, "CPU", F32, min_bytes=MIN_BYTES)
    assert isinstance(network, staged.StagedNetwork)
    assert any(isinstance(step, staged._RawPool) for step in network.steps)
    np.testing.assert_allclose(network(x), run_whole(model, x), atol=2e-5)


@pytest.mark.parametrize("slab_bytes", [1, 64 * 1024])
def test_a_network_buffer_is_consumed_and_the_output_unchanged(
    slab_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The input's rows (and each stage's own output's) are handed back as the slabs read them: a row
    # released before its last reader ran would read as zeros and change the output.
    import openvino as ov

    monkeypatch.setattr(staged, "SLAB_BYTES", slab_bytes)
    size = 48  # input rows of 9 KiB: the pages of released rows are not all shared with later rows
    model = unet_like(size)
    x = np.random.default_rng(2).normal(size=(1, 1, size, size, size)).astype(np.float32)
    network, _ = compile_network(ov.Core(), model, "CPU", F32, min_bytes=MIN_BYTES)
    expected = network(x)
    np.testing.assert_array_equal(x, np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    buffer = network_buffer(x.shape)
    buffer[...] = x
    np.testing.assert_array_equal(network(buffer), expected)
    assert np.count_nonzero(buffer) < x.size // 100, "the network consumed its input buffer"


@pytest.mark.parametrize("unstageable", ["residual_at_full", "input_twice"])
def test_a_network_it_cannot_stage_runs_whole(unstageable: str) -> None:
    import openvino as ov

    model = unet_like(32, **{unstageable: True})
    assert plan_stages(model, min_bytes=MIN_BYTES) is None
    x = np.random.default_rng(2).normal(size=(1, 1, 32, 32, 32)).astype(np.float32)
    released: list[Any] = []
    network, compiled = compile_network(ov.Core(), model, "CPU", F32, released.append, min_bytes=MIN_BYTES)
    assert not isinstance(network, staged.StagedNetwork) and len(compiled) == 1
    np.testing.assert_array_equal(network(x), run_whole(model, x))
    assert released == compiled


@pytest.mark.parametrize("inside_sqrt", [True, False])
def test_instance_norm_statistics_are_the_float64_formula(inside_sqrt: bool) -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(2, 3, 9, 8, 7)) * [[[[[5.0]]], [[[0.01]]], [[[300.0]]]]] + 40.0).astype(np.float32)
    wide = x.astype(np.float64)
    eps = 1e-5
    var = wide.var(axis=(2, 3, 4))
    figures = InstanceNorm(eps, inside_sqrt, relu=True).statistics(x)
    np.testing.assert_allclose(figures.mean, wide.mean(axis=(2, 3, 4)), rtol=1e-12)
    expected = 1.0 / (np.sqrt(var + eps) if inside_sqrt else np.sqrt(var) + eps)
    np.testing.assert_allclose(figures.scale, expected, rtol=1e-6)


@pytest.mark.parametrize("kernel,stride,pad", [(7, 2, 3), (3, 2, 1), (3, 1, 1), (2, 2, 0), (5, 3, 2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_row_band_reads_every_input_row_an_output_row_needs(
    kernel: int, stride: int, pad: int, transposed: bool
) -> None:
    band = RowBand(kernel, stride, pad, transposed)
    for first in range(0, 12, stride):
        for count in (stride, 2 * stride, 3 * stride):
            lo, hi = band.inputs_for(first, count)
            needed = set()
            for o in range(first, first + count):
                if transposed:
                    needed |= {i for i in range(-10, 40) if 0 <= o + pad - stride * i < kernel}
                else:
                    needed |= set(range(stride * o - pad, stride * o - pad + kernel))
            assert needed == set(range(lo, hi)), (first, count)  # no row more, none less
            # the layer run without padding along the rows on input rows from lo
            if transposed:
                local = {o - stride * lo + pad for o in range(first, first + count)}
                length = stride * (hi - lo - 1) + kernel
            else:
                local = {o - first for o in range(first, first + count)}
                length = (hi - lo - kernel) // stride + 1
            assert min(local) == band.local_first(first, lo) >= 0 and max(local) < length



def test_a_folded_softmax_ending_is_staged_like_the_network() -> None:
    # two_class_logit replaces the last transposed convolution; the layer it replaced stays attached to
    # the tensor it read (on no path to the output) and must not count as that tensor's second reader
    import openvino as ov

    from converters.staged_network import foreground_only

    model = unet_like(32, softmax=True)
    cut = foreground_only(model, 1)
    stages = plan_stages(cut, min_bytes=MIN_BYTES)
    assert stages is not None and isinstance(stages[-1], Piece) and stages[-1].rows is not None
    x = np.random.default_rng(4).normal(size=(1, 1, 32, 32, 32)).astype(np.float32)
    network, _ = compile_network(ov.Core(), cut, "CPU", F32, min_bytes=MIN_BYTES)
    assert isinstance(network, staged.StagedNetwork)
    np.testing.assert_allclose(network(x)[:, 0], run_whole(model, x)[:, 1], atol=2e-5)


def test_a_piece_openvino_refuses_runs_the_network_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import openvino as ov

    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("Exception from src/plugins/intel_cpu: cannot compile the piece")

    monkeypatch.setattr(staged.StagedNetwork, "__init__", refuse)
    model = unet_like(32)
    x = np.random.default_rng(5).normal(size=(1, 1, 32, 32, 32)).astype(np.float32)
    network, compiled = compile_network(ov.Core(), model, "CPU", F32, min_bytes=MIN_BYTES)
    assert len(compiled) == 1
    np.testing.assert_array_equal(network(x), run_whole(model, x))


def test_a_pieces_residual_of_its_own_input_is_added_outside_the_plugin() -> None:
    """The small-grid piece of the test network ends by adding its own input, as deepbet's 64³ piece
    does: it is compiled without that addition (the plugin then keeps no copy of its input to the end)
    and the step adds the input to its output, which gives the network's output."""
    import openvino as ov

    model = unet_like(32)
    network, _ = compile_network(ov.Core(), model, "CPU", F32, None, min_bytes=MIN_BYTES)
    assert isinstance(network, staged.StagedNetwork)
    whole = [s for s in network.steps if isinstance(s, staged._Compiled) and s.band is None]
    assert [s.adds_input for s in whole] == [True]
    x = np.random.default_rng(4).normal(size=(1, 1, 32, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(network(x), run_whole(model, x), atol=2e-5)


@pytest.mark.parametrize("ending", ["own input", "a constant", "another tensor", "a broadcast input"])
def test_only_an_addition_of_the_pieces_own_input_is_taken_off(ending: str) -> None:
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(5)
    x = ops.parameter([1, 1 if ending == "a broadcast input" else 4, 8, 8, 8], np.float32, "piece_input")
    y = ops.relu(ops.convolution(x, _weights(rng, 4, x.get_partial_shape()[1].get_length(), 3, 3, 3),
                                 [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]))
    other = {
        "own input": x,
        "a constant": ops.constant(np.ones((1, 4, 1, 1, 1), np.float32)),
        "another tensor": ops.relu(x),
        "a broadcast input": x,
    }[ending]
    piece = ov.Model([ops.add(y, other)], [x], "piece")
    cut = staged._without_residual(piece)
    if ending != "own input":
        assert cut is None
        return
    assert cut is not None
    data = np.random.default_rng(6).normal(size=(1, 4, 8, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_whole(cut, data) + data, run_whole(piece, data))
