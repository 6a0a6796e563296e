"""node.memory: models give their intermediate buffers back between jobs, and keep working after.

The brain-extraction network on its 256³ grid held ~450 MiB of OpenVINO buffers after each study (the
node idled at ~1 GiB); each network call now releases them. OpenVINO keeps a model's output buffer all
the same (128 MiB for the brain network's two channels): the networks' outputs are cut to the one
channel the node reads, which OpenVINO writes into the request's own tensor; and the input buffers it
fills when it compiles are freed by a call at load. The figures themselves are in
benchmarks/node_memory.py and benchmarks/registration.py; here, that the models give the same answers
after a release and with the cut, and that neither a loaded brain extractor nor a brain extraction
holds network buffers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from converters.exceptions import ModelCardError
from converters.staged_network import InstanceNorm, foreground_only, plan_stages, two_class_logit
from node.bootstrap import SHIPPED_BRAIN_EXTRACTOR_DIR
from node.brain_extraction import BrainExtractor
from node.memory import memory_status_mib, rss_mib, trim_heap
from node.segmenter import OpenVINOSegmenter
from tests.helpers.node import make_threshold_model
from tests.helpers.peers import REPO
from tests.helpers.regions import brats_case

#: What two brain extractions may leave the process larger than the loaded extractor was (the masks
#: are 3.5 MiB each). Measured 2026-12-02: +545 MiB before the release of the intermediate buffers,
#: +77 to +93 MiB (the output buffer of the 256³ network) before the output was cut to one channel.
HELD_BUFFERS_MIB = 32
#: Anonymous memory a loaded brain extractor may hold (compiled kernels and weights, OpenVINO's CPU
#: plugin). Measured 2026-12-02: +101 to +114 MiB while the networks kept the input buffers OpenVINO
#: fills when it compiles (64 MiB on the 256³ grid), +29 to +42 MiB since a call at load frees them.
LOADED_EXTRACTOR_MIB = 64


def test_rss_of_self_and_of_no_process() -> None:
    assert rss_mib() > 10
    assert rss_mib(os.getpid()) > 10
    assert rss_mib(2**22 + 12345) == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trim_heap_runs_on_glibc() -> None:
    assert trim_heap() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_arena_cap_is_set_unless_the_environment_sets_it() -> None:
    code = "from node.memory import limit_arenas; print(limit_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(REPO)
    run = [sys.executable, "-c", code]
    assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.strip() == "True"
    env["MALLOC_ARENA_MAX"] = "4"  # an operator's setting wins
    assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.strip() == "False"


#: In a fresh interpreter: a freed 30 MiB array (its own map under glibc's default threshold, which the
#: free raises to 30 MiB), then an 8 MiB one; prints whether the threshold was fixed and whether the
#: 8 MiB array lies in the heap.
_ON_HEAP = """
import sys
import numpy as np
from node.memory import fix_mmap_threshold
fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else None
a = np.ones(30 << 20, dtype=np.uint8)
del a
b = np.ones(8 << 20, dtype=np.uint8)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(v, 16) for v in line.split()[0].split("-"))
        print(fixed, start <= b.ctypes.data < end)
        break
else:
    print(fixed, False)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_fixed_mmap_threshold_keeps_large_arrays_off_the_heap() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = str(REPO)

    def run(mode: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", _ON_HEAP, mode], env=env, capture_output=True,
                              text=True, check=True).stdout.split()

    # glibc's moving threshold: the 8 MiB array comes from the heap, where a live object above it
    # would keep its pages mapped once it is freed.
    assert run("default") == ["None", "True"]
    assert run("fix") == ["True", "False"]  # its own map, handed back when freed
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # an operator's setting wins
    assert run("fix")[0] == "False"


def test_segmenter_answers_the_same_after_a_release(tmp_path: Path) -> None:
    model_dir = make_threshold_model(tmp_path / "m", crop=(32, 32))
    card = json.loads((model_dir / "model.json").read_text())
    seg = OpenVINOSegmenter(card, model_dir / "model_fp32.xml", batch_size=4, precision_hint="f32")
    batch = np.random.default_rng(0).normal(size=(6, 1, 32, 32)).astype(np.float32)
    before = seg.predict(batch)
    seg.release_memory()
    seg.release_memory()  # twice: nothing left to release is not an error
    np.testing.assert_array_equal(seg.predict(batch), before)


@pytest.mark.parametrize("static_batch", [True, False])
def test_segmenter_keeps_no_reference_to_its_input(tmp_path: Path, static_batch: bool) -> None:
    # OpenVINO's CompiledModel called directly keeps its request, and the request the last input it
    # shared: a view of the whole study's slices, held until the next job.
    model_dir = make_threshold_model(tmp_path / "m", crop=(32, 32))
    card = json.loads((model_dir / "model.json").read_text())
    seg = OpenVINOSegmenter(
        card, model_dir / "model_fp32.xml", batch_size=4, precision_hint="f32", static_batch=static_batch
    )
    batch = np.random.default_rng(0).normal(size=(8, 1, 32, 32)).astype(np.float32)  # last block a view
    alive = weakref.ref(batch)
    assert seg.predict(batch).shape[0] == 8
    seg.release_memory()
    del batch
    assert alive() is None, "the segmenter still holds the batch it was given"


def test_brain_extraction_leaves_no_network_buffers_behind() -> None:
    case = brats_case("BraTS2021_00005")
    image, affine = case.images["FLAIR"], case.affine
    trim_heap()
    unloaded = memory_status_mib()["RssAnon"]
    extractor = BrainExtractor.from_dir(SHIPPED_BRAIN_EXTRACTOR_DIR, threads=2)
    trim_heap()
    loaded = memory_status_mib()["RssAnon"] - unloaded
    assert loaded < LOADED_EXTRACTOR_MIB, f"a loaded brain extractor holds {loaded:.0f} MiB"
    before = rss_mib()
    first = extractor.extract(image, affine)
    second = extractor.extract(image, affine)  # buffers allocated again, and released again
    trim_heap()
    grown = rss_mib() - before
    np.testing.assert_array_equal(first, second)
    assert 0.01 < first.mean() < 0.5
    assert grown < HELD_BUFFERS_MIB, f"the process grew by {grown:.0f} MiB over two brain extractions"


@pytest.mark.parametrize("network", ["bbox_fp32.xml", "brain_fp32.xml"])
def test_foreground_only_is_the_cards_channel_of_the_network(network: str) -> None:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(SHIPPED_BRAIN_EXTRACTOR_DIR / network))
    model.reshape([1, 1, 32, 32, 32])
    x = np.random.default_rng(0).random((1, 1, 32, 32, 32), dtype=np.float32)
    both = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    assert both.shape == (1, 2, 32, 32, 32)
    assert 0.05 < (both[:, 1] > 0.5).mean() < 0.95, "the test input should give both classes"
    for channel in (0, 1):
        cut_model = foreground_only(model, channel)
        # deepbet's networks end in a softmax over a biased transposed convolution: folded, not sliced
        kinds = {op.get_type_name() for op in cut_model.get_ordered_ops()}
        assert "Sigmoid" in kinds and "Softmax" not in kinds
        out = core.compile_model(cut_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
        assert out.shape == (1, 1, 32, 32, 32)
        np.testing.assert_allclose(out[:, 0], both[:, channel], atol=1e-5)
        np.testing.assert_array_equal(out[:, 0] > 0.5, both[:, channel] > 0.5)
    with pytest.raises(ModelCardError, match=r"output\.channel 2 is not a channel"):
        foreground_only(model, 2)


def test_the_shipped_brain_network_runs_in_stages_the_box_network_whole() -> None:
    # On its 256³ grid the brain network's three instance norms over 64-128 MiB feature maps run in
    # place and the layers around them a slab at a time (converters/staged_network.py): 272 -> ~156 MiB
    # at the network's peak, and statistics in float64 (benchmarks/notes.md, 2026-12-06)
    import openvino as ov

    core = ov.Core()
    plans = {}
    for network, grid in (("brain_fp32.xml", 256), ("bbox_fp32.xml", 128)):
        model = core.read_model(str(SHIPPED_BRAIN_EXTRACTOR_DIR / network))
        model.reshape([1, 1, grid, grid, grid])
        plans[network] = plan_stages(foreground_only(model, 1))
    assert plans["bbox_fp32.xml"] is None  # its largest feature map is 16 MiB
    stages = plans["brain_fp32.xml"]
    assert stages is not None
    assert sum(isinstance(s, InstanceNorm) for s in stages) == 3
    assert sum(not isinstance(s, InstanceNorm) and s.rows is not None for s in stages) == 5


def test_foreground_only_slices_an_output_it_cannot_fold() -> None:
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 3, 4, 4], np.float32)
    model = ov.Model([ops.softmax(ops.multiply(x, ops.constant(np.float32(2.0))), 1)], [x])  # 3 classes
    data = np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)
    core = ov.Core()
    both = core.compile_model(model, "CPU")(data)[0]
    cut_model = foreground_only(model, 2)
    assert "Slice" in {op.get_type_name() for op in cut_model.get_ordered_ops()}
    np.testing.assert_array_equal(core.compile_model(cut_model, "CPU")(data)[0][:, 0], both[:, 2])


def test_two_class_logit_folds_only_a_two_class_softmax_over_a_biased_convolution() -> None:
    import openvino as ov
    import openvino.opset13 as ops

    def ending(channels: int, axis: int, with_conv: bool) -> ov.Model:
        x = ops.parameter([1, 3, 8, 8], np.float32)
        z: ov.Node = x
        if with_conv:
            w = np.random.default_rng(2).normal(size=(channels, 3, 3, 3)).astype(np.float32)
            conv = ops.convolution(x, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1])
            z = ops.add(conv, ops.constant(np.ones((1, channels, 1, 1), np.float32)))
        return ov.Model([ops.softmax(z, axis)], [x])

    assert two_class_logit(ending(2, 1, with_conv=True), 1) is not None
    assert two_class_logit(ending(2, -3, with_conv=True), 1) is not None  # axis 1 counted from the end
    assert two_class_logit(ending(3, 1, with_conv=True), 1) is None  # three classes
    assert two_class_logit(ending(2, 2, with_conv=True), 1) is None  # softmax over rows, not classes
    assert two_class_logit(ending(2, 1, with_conv=False), 1) is None  # no convolution to fold into
    folded = two_class_logit(ending(2, 1, with_conv=True), 0)
    assert folded is not None
    data = np.random.default_rng(3).normal(size=(1, 3, 8, 8)).astype(np.float32)
    core, f32 = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
    both = core.compile_model(ending(2, 1, with_conv=True), "CPU", f32)(data)[0]
    out = core.compile_model(folded, "CPU", f32)(data)[0]
    np.testing.assert_allclose(out[:, 0], both[:, 0], atol=1e-6)
