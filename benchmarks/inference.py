"""Inference engines side by side: the shipped model on the same real slices of its validation cases.

Rows: PyTorch eager FP32, ONNX Runtime FP32, OpenVINO FP32 (``INFERENCE_PRECISION_HINT`` f32),
OpenVINO with the bf16 hint (it runs bf16 only on a CPU with AVX-512 BF16 or AMX; the compiled
model's precision is reported), OpenVINO INT8. For each: slices/s at batch 1 and at the best batch
(sync calls with the LATENCY hint, and an async queue with the THROUGHPUT hint), milliseconds per
155-slice volume, peak resident memory of a process that runs only that engine, and whole-tumour Dice
of the full path (preprocess, infer, restore) against the ground truth of each of the model's
validation cases (the "val" list of its split.json) found under ``--data`` (by default the shared
training data, ``../shared/data/train``). The holdout is for final evaluation only
(benchmarks/holdout_node.py, holdout_regions.py): its cases are not validation cases, so this script
refuses a folder that holds none of them.

The model's operations per slice come from its ONNX graph (2 x multiply-accumulates of every Conv
and ConvTranspose). The CPU's FP32 peak is measured in the same run by a large matrix product (numpy
BLAS, an OpenVINO MatMul and three large 3x3 OpenVINO convolutions, the fastest counts); the INT8
peak by the same MatMul and convolutions with a FakeQuantize on the input and int8 weights (the
pattern NNCF writes), which OpenVINO's low-precision transforms turn into its u8 x s8 kernels; the
kernel names are read back from the runtime graph, so an f32 fallback would show.

PyTorch eager runs the shipped ONNX graph's own weights op by op with ``torch.nn.functional`` (the
shipped model has no checkpoint; batch norm is already folded into the convolutions there), so every
row computes the very same function.

Usage: python benchmarks/inference.py [--model DIR] [--data DIR] [--quick] [--engines A,B] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_MODEL,
    SHARED_DATA,
    current_rss_mib,
    markdown_table,
    peak_rss_mib,
    peak_rss_since_reset_mib,
    reset_peak_rss,
    run_child,
    save_result,
)

Predict = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]

ENGINES: dict[str, str] = {
    "torch": "PyTorch eager FP32",
    "onnxruntime": "ONNX Runtime FP32",
    "ov-fp32": "OpenVINO FP32 (f32 hint)",
    "ov-bf16": "OpenVINO FP32 model, bf16 hint",
    "ov-int8": "OpenVINO INT8 (f32 hint for its unquantized layers, as the node)",
    "node": "OpenVINO INT8 as the node runs it (static batch 8)",
}
BATCHES = (1, 4, 8, 16, 32)
#: The OpenVINO engines' IR files and precision hints (INT8: f32 for its unquantized layers, as the node
#: runs it, node/segmenter.py).
OV_ENGINES: dict[str, tuple[str, str]] = {
    "ov-fp32": ("model_fp32.xml", "f32"),
    "ov-bf16": ("model_fp32.xml", "bf16"),
    "ov-int8": ("model_int8.xml", "f32"),
}
VOLUME_SLICES = 155
THREADS = 0  # 0: every core


# -- model facts -----------------------------------------------------------------------------------------


def ops_per_slice(onnx_path: Path, crop: Sequence[int], channels: int) -> int:
    """Operations (2 x multiply-accumulates) of one slice through every Conv and ConvTranspose."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    graph = model.graph
    dim = graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dim, (1, channels, *crop), strict=True):
        d.ClearField("dim_param")
        d.dim_value = v
    del graph.value_info[:]  # shapes recorded at export time would override the inferred ones
    for out in graph.output:
        out.type.tensor_type.ClearField("shape")
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*inferred.value_info, *inferred.output, *inferred.input]
    }
    weights = {init.name: list(init.dims) for init in graph.initializer}
    macs = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = weights[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv":  # w: (Cout, Cin/g, kh, kw); each output element
            out = shapes[node.output[0]]
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        else:  # w: (Cin, Cout/g, kh, kw); each input element scatters into Cout/g x kh x kw
            inp = shapes[node.input[0]]
            macs += int(np.prod(inp)) * int(np.prod(w[1:])) // max(group, 1) * max(group, 1)
    return 2 * macs


# -- engines -----------------------------------------------------------------------------------------


def torch_predictor(onnx_path: Path, threads: int = THREADS) -> Predict:
    """The ONNX graph's weights run op by op in PyTorch eager mode (FP32)."""
    import onnx
    import torch
    import torch.nn.functional as F  # noqa: N812
    from onnx import numpy_helper

    if threads:
        torch.set_num_threads(threads)
    model = onnx.load(str(onnx_path))
    params = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    in_name, out_name = model.graph.input[0].name, model.graph.output[0].name

    def attr(node: Any, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return list(a.ints) if a.ints else a.i
        return default

    def run(x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {in_name: x, **params}
        for n in nodes:
            args = [env[i] for i in n.input if i]
            if n.op_type == "Conv":
                pads = attr(n, "pads", [0, 0, 0, 0])
                y = F.conv2d(args[0], args[1], args[2] if len(args) > 2 else None,
                             stride=attr(n, "strides", [1, 1]), padding=pads[:2],
                             dilation=attr(n, "dilations", [1, 1]), groups=attr(n, "group", 1))
            elif n.op_type == "ConvTranspose":
                pads = attr(n, "pads", [0, 0, 0, 0])
                y = F.conv_transpose2d(args[0], args[1], args[2] if len(args) > 2 else None,
                                       stride=attr(n, "strides", [1, 1]), padding=pads[:2],
                                       output_padding=attr(n, "output_padding", [0, 0]),
                                       groups=attr(n, "group", 1))
            elif n.op_type == "Relu":
                y = F.relu(args[0])
            elif n.op_type == "MaxPool":
                pads = attr(n, "pads", [0, 0, 0, 0])
                y = F.max_pool2d(args[0], attr(n, "kernel_shape", [2, 2]),
                                 stride=attr(n, "strides", [2, 2]), padding=pads[:2])
            elif n.op_type == "Concat":
                y = torch.cat(args, dim=attr(n, "axis", 1))
            else:
                raise RuntimeError(f"PyTorch eager runner: ONNX op {n.op_type} is not supported")
            env[n.output[0]] = y
        return env[out_name]

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with torch.inference_mode():
            return run(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()

    return predict


def ort_predictor(onnx_path: Path, threads: int = THREADS) -> Predict:
    """ONNX Runtime on the CPU, every core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0])

    return predict


def ov_compile(xml: Path, hint: str | None, mode: str = "LATENCY") -> Any:
    """An OpenVINO compiled model on the CPU with ``PERFORMANCE_HINT`` ``mode``."""
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": mode}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    return ov.Core().compile_model(str(xml), "CPU", config)


def ov_predictor(compiled: Any) -> Predict:
    """Synchronous calls of a compiled model."""
    request = compiled.create_infer_request()

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.array(request.get_output_tensor(0).data)  # a copy: the request reuses its buffer

    return predict


def ov_async_rate(xml: Path, hint: str | None, slices: npt.NDArray[np.float32], batch: int,
                  min_seconds: float) -> float:
    """Slices/s through an ``AsyncInferQueue`` of a THROUGHPUT-hint compile (one request per stream)."""
    import openvino as ov

    compiled = ov_compile(xml, hint, "THROUGHPUT")
    queue = ov.AsyncInferQueue(compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    batches = [np.ascontiguousarray(slices[i : i + batch]) for i in range(0, len(slices) - batch + 1, batch)]
    for b in batches[: queue.__len__()]:
        queue.start_async({0: b})
    queue.wait_all()
    best = 0.0
    for _ in range(3):  # the best of three windows (see :func:`rate` on other work on the machine)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds / 3:
            for b in batches:
                queue.start_async({0: b})
                done += len(b)
        queue.wait_all()
        best = max(best, done / (time.perf_counter() - start))
    return best


def make_predictor(engine: str, model_dir: Path) -> tuple[Predict, str]:
    """The engine's predictor and the precision it really computes in."""
    if engine == "torch":
        return torch_predictor(model_dir / "model.onnx"), "f32"
    if engine == "onnxruntime":
        return ort_predictor(model_dir / "model.onnx"), "f32"
    if engine == "node":
        from db.card import load_card
        from node.segmenter import OpenVINOSegmenter

        segmenter = OpenVINOSegmenter(load_card(model_dir), model_dir / "model_int8.xml")
        return segmenter.predict, f"int8 (static batch {segmenter.batch_size}, partial batches padded)"
    name, hint = OV_ENGINES[engine]
    compiled = ov_compile(model_dir / name, hint)
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT")).split("'")[1] \
        if "'" in str(compiled.get_property("INFERENCE_PRECISION_HINT")) \
        else str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if engine == "ov-int8":
        precision = f"int8 ({precision} between quantized ops)"
    return ov_predictor(compiled), precision


# -- measurements ----------------------------------------------------------------------------------


def rate(predict: Predict, slices: npt.NDArray[np.float32], batch: int, min_seconds: float) -> float:
    """Slices/s of ``predict`` over ``slices`` in batches of ``batch``: ``batch`` / the first quartile
    of the call times (one warm-up call first). The quartile, not the mean, keeps the bursts of other
    work on this shared machine out of the figure; on an idle machine the two are close."""
    batches = [np.ascontiguousarray(slices[i : i + batch]) for i in range(0, len(slices) - batch + 1, batch)]
    predict(batches[0])
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        for b in batches:
            t = time.perf_counter()
            predict(b)
            times.append(time.perf_counter() - t)
            if time.perf_counter() - start >= min_seconds and len(times) >= 3:
                break
    return batch / float(np.percentile(times, 25))


class NoValidationCasesError(RuntimeError):
    """None of the model's validation cases is under the data folder."""


def validation_case_ids(model_dir: Path) -> list[str]:
    """The model's validation cases: the "val" list of its ``split.json`` (written by the trainer)."""
    split = model_dir / "split.json"
    try:
        ids = json.loads(split.read_text())["val"]
    except (OSError, ValueError, KeyError) as exc:
        raise NoValidationCasesError(f"{split}: no validation cases to measure on ({exc})") from exc
    return [str(i) for i in ids]


def find_validation_cases(data_dir: Path, model_dir: Path) -> tuple[list[Any], list[str]]:
    """The model's validation cases found under ``data_dir`` (in split order), and the ids not found.

    Raises :class:`NoValidationCasesError` when none of them is there (the holdout, for one, holds none)."""
    from converters.nifti import list_cases

    wanted = validation_case_ids(model_dir)
    refs = {ref.case_id: ref for ref in list_cases(data_dir, require_labels=True)}
    found = [refs[i] for i in wanted if i in refs]
    if not found:
        raise NoValidationCasesError(
            f"{data_dir}: none of the model's validation cases ({', '.join(wanted)}, from "
            f"{model_dir / 'split.json'}) is there; pass --data a folder that holds them (the training "
            "data, e.g. ../shared/data/train). The holdout is for final evaluation only."
        )
    return found, [i for i in wanted if i not in refs]


def load_cases(data_dir: Path, card: dict[str, Any], limit: int | None = None,
               model_dir: Path = DEFAULT_MODEL) -> list[dict[str, Any]]:
    """The validation cases of the model in ``model_dir`` under ``data_dir`` (the first ``limit``),
    with their prepared network slices and whole-tumour ground truth."""
    from converters.preprocess import prepare_volume

    cases = []
    for ref in find_validation_cases(data_dir, model_dir)[0][:limit]:
        case = ref.load()
        prepared = prepare_volume(case.images, case.affine, card["preprocessing"], card["modalities"])
        # Only what the measurement needs stays in memory, so peak RSS is mostly the engine's.
        cases.append({"id": ref.case_id, "truth": case.whole_tumor() > 0, "prepared": prepared})
        del case
    return cases


def measure_engine(engine: str, model_dir: Path, data_dir: Path, *, batches: Sequence[int] = BATCHES,
                   min_seconds: float = 2.0, case_limit: int | None = None) -> dict[str, Any]:
    """Every figure of one engine (see the module docstring); run in a process of its own."""
    from converters.prediction import segment_prepared
    from db.card import load_card
    from trainer.metrics import dice

    card = load_card(model_dir)
    cases = load_cases(data_dir, card, case_limit, model_dir)
    slices = np.concatenate([c["prepared"].slices for c in cases])
    gc.collect()
    # The engine's share: its own peak over what the process held before it was created. The peak is
    # reset here, after loading, so the data-loading peak (ru_maxrss keeps it) is not counted.
    rss_before = current_rss_mib()
    loading_peak = peak_rss_mib()  # the reset can lower ru_maxrss too: the process's peak is kept here
    peak_reset = reset_peak_rss()
    predict, precision = make_predictor(engine, model_dir)
    rates = {b: rate(predict, slices, b, min_seconds) for b in batches if b <= len(slices)}
    best_batch = max(rates, key=lambda b: rates[b])
    mode = f"sync, batch {best_batch}"
    best = rates[best_batch]
    if engine.startswith("ov-"):  # the node's own row runs as the node does: sync, its static batch
        name, hint = OV_ENGINES[engine]
        for b in sorted({1, best_batch}):
            r = ov_async_rate(model_dir / name, hint, slices, b, min_seconds)
            if r > best:
                best, mode = r, f"async THROUGHPUT, batch {b}"
    volume = np.resize(slices, (VOLUME_SLICES, *slices.shape[1:]))  # 155 real slices (repeated if fewer)
    volume_times = []
    for _ in range(3):
        start = time.perf_counter()
        segment_prepared(predict, _as_prepared(cases[0]["prepared"], volume), card, best_batch)
        volume_times.append(time.perf_counter() - start)
    volume_ms = min(volume_times) * 1000.0  # the fastest of three (see rate)
    dices = {}
    for c in cases:
        labels = c["prepared"].restore(segment_prepared(predict, c["prepared"], card, best_batch))
        dices[c["id"]] = dice(labels > 0, c["truth"])
    return {
        "engine": engine,
        "label": ENGINES[engine],
        "precision": precision,
        "slices": len(slices),
        "rates": {str(b): r for b, r in rates.items()},
        "batch1": rates[1] if 1 in rates else float("nan"),
        "best": best,
        "best_mode": mode,
        "volume_ms": volume_ms,
        "dice": float(np.mean(list(dices.values()))),
        "dice_per_case": dices,
        "peak_rss_mib": max(loading_peak, peak_rss_mib()),
        **engine_share(rss_before, peak_rss_since_reset_mib(peak_reset)),
    }


def engine_share(rss_before: float, peak_since_reset: float | None) -> dict[str, Any]:
    """The engine's share of peak memory: the peak since the reset before the engine was created, less
    the RSS then; None (shown "n/a") where the peak could not be reset."""
    if peak_since_reset is None:
        return {"engine_rss_mib": None,
                "engine_rss_note": "n/a: the peak RSS could not be reset here (/proc/self/clear_refs)"}
    return {"engine_rss_mib": max(peak_since_reset - rss_before, 0.0),
            "engine_rss_note": "VmHWM since /proc/self/clear_refs after loading, less the RSS then"}


def _share_text(r: dict[str, Any]) -> str:
    """The "peak RSS MiB (engine's share)" cell."""
    share = r.get("engine_rss_mib")
    return f"{r['peak_rss_mib']:.0f} ({'n/a' if share is None else f'{share:.0f}'})"


def _as_prepared(prepared: Any, slices: npt.NDArray[np.float32]) -> Any:
    import dataclasses

    return dataclasses.replace(prepared, slices=slices, slice_indices=np.arange(len(slices)))


def _best_rate(fn: Callable[[], Any], ops: float, min_seconds: float) -> float:
    """Operations/s of ``fn`` from its fastest call (a peak: the least disturbed by other load)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return ops / min(times)


def _runtime_kernels(compiled: Any, layer_types: Sequence[str]) -> list[str]:
    """Kernel names (``primitiveType``) OpenVINO chose for the given layer types."""
    kinds = set()
    for n in compiled.get_runtime_model().get_ops():
        info = n.get_rt_info()
        if info["layerType"].astype(str) in layer_types:
            kinds.add(info["primitiveType"].astype(str))
    return sorted(kinds)


def _conv_model(int8: bool, channels: int, size: int) -> Any:
    """A 3x3 convolution channels -> channels on a size x size plane; int8 in the pattern NNCF writes
    (FakeQuantize on the input, int8 weights with a per-channel scale)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([1, channels, size, size], np.float32)
    if int8:
        lo, hi = ops.constant(np.float32(0.0)), ops.constant(np.float32(4.0))
        inp: Any = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        w8 = ops.constant(rng.integers(-127, 128, (channels, channels, 3, 3), dtype=np.int8))
        weights: Any = ops.multiply(ops.convert(w8, np.float32),
                                    ops.constant(np.full((channels, 1, 1, 1), 0.01, np.float32)))
    else:
        inp = x
        weights = ops.constant(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32))
    return ov.Model([ops.convolution(inp, weights, [1, 1], [1, 1], [1, 1], [1, 1])], [x])


CONV_SHAPES = ((64, 176), (128, 88), (256, 44))


def peaks(min_seconds: float = 1.0, size: int = 2048) -> dict[str, Any]:
    """FP32, INT8 and BF16 peak operations/s of this CPU as measured in this run (module docstring).

    FP32: the best of a size^3 matrix product in numpy BLAS, the same as an OpenVINO MatMul, and large
    3x3 convolutions in OpenVINO f32. INT8: the best of the u8 x s8 matrix product and the same
    convolutions with a FakeQuantize input and int8 weights, which OpenVINO runs with the integer
    kernels (checked: the kernel names are reported) its INT8 model uses. BF16: the f32 MatMul and
    convolutions compiled with the bf16 hint (kernel names reported too).
    """
    import openvino as ov

    core = ov.Core()
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 4, (size, size)).astype(np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    mm_ops = 2.0 * size**3
    out: dict[str, Any] = {"fp32": {}, "int8": {}, "bf16": {}, "kernels": {}, "bf16_kernels": {}}
    out["fp32"]["numpy matrix product"] = _best_rate(lambda: a @ b, mm_ops, min_seconds)
    # (group, int8 pattern, hint, where the kernel names go): the bf16 group is the f32 models
    # compiled with the bf16 hint, the bf16 row's peak; without AVX-512 BF16 or AMX they run in f32,
    # and the kernel names say so.
    groups = (
        ("fp32", False, "f32", None),
        ("int8", True, "f32", "kernels"),
        ("bf16", False, "bf16", "bf16_kernels"),
    )
    for group, int8, hint, kernels_key in groups:
        name = "OpenVINO u8 x s8 MatMul" if int8 else "OpenVINO MatMul"
        rate, kernels = _ov_rate(core, _matmul_model(b, int8, rng), a, mm_ops, hint, min_seconds,
                                 ("FullyConnected", "MatMul"))
        out[group][name] = rate
        if kernels_key:
            out[kernels_key][name] = kernels
        for channels, plane in CONV_SHAPES:
            data = rng.uniform(0, 4, (1, channels, plane, plane)).astype(np.float32)
            name = f"OpenVINO 3x3 conv {channels}ch {plane}x{plane}"
            conv_ops = 2.0 * plane * plane * channels * channels * 9
            rate, kernels = _ov_rate(core, _conv_model(int8, channels, plane), data, conv_ops, hint,
                                     min_seconds, ("Convolution",))
            out[group][name] = rate
            if kernels_key:
                out[kernels_key][name] = kernels
    for group in ("fp32", "int8", "bf16"):
        out[f"{group}_peak"] = max(out[group].values())
    return out


def _matmul_model(b: npt.NDArray[np.float32], int8: bool, rng: np.random.Generator) -> Any:
    """x @ b in f32, or, in the pattern NNCF writes, FakeQuantize(x) @ int8 weights (per-row scale)."""
    import openvino as ov
    import openvino.opset13 as ops

    size = b.shape[0]
    x = ops.parameter([size, size], np.float32)
    if not int8:
        return ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x])
    lo, hi = ops.constant(np.float32(0.0)), ops.constant(np.float32(4.0))
    w8 = ops.constant(rng.integers(-127, 128, (size, size), dtype=np.int8))
    weights = ops.multiply(ops.convert(w8, np.float32), ops.constant(np.full((size, 1), 0.01, np.float32)))
    return ov.Model([ops.matmul(ops.fake_quantize(x, lo, hi, lo, hi, 256), weights, False, True)], [x])


def _ov_rate(core: Any, model: Any, data: npt.NDArray[np.float32], n_ops: float, hint: str,
             min_seconds: float, layer_types: Sequence[str]) -> tuple[float, list[str]]:
    """Best operations/s of ``model`` compiled on the CPU with ``hint``, and the kernels it ran."""
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    rate = _best_rate(lambda: request.infer({0: data}), n_ops, min_seconds)
    return rate, _runtime_kernels(compiled, layer_types)


# -- report ----------------------------------------------------------------------------------------


def _peak_for(peaks: dict[str, Any], engine: str) -> float:
    """The measured peak an engine's row is compared with: INT8, BF16 (bf16 hint) or FP32."""
    if engine in ("ov-int8", "node"):
        return float(peaks["int8_peak"])
    if engine == "ov-bf16":
        return float(peaks.get("bf16_peak", peaks["fp32_peak"]))
    return float(peaks["fp32_peak"])


def tables(result: dict[str, Any]) -> str:
    """The markdown tables of a result (engines, peaks, targets)."""
    ops = result["ops_per_slice"]
    rows = []
    for r in result["engines"]:
        peak = _peak_for(result["peaks"], r["engine"])
        rows.append([
            r["label"], r["precision"], f"{r['batch1']:.1f}", f"{r['best']:.1f}", r["best_mode"],
            f"{r['volume_ms']:.0f}", _share_text(r),
            f"{r['dice']:.4f}",
            f"{ops * r['best'] / 1e9:.1f}", f"{100 * ops * r['best'] / peak:.0f}%",
        ])
    engines = markdown_table(
        ["engine", "computes in", "slices/s batch 1", "slices/s best", "best configuration",
         "ms / 155-slice volume", "peak RSS MiB (engine's share)", "WT Dice", "achieved GOP/s", "of peak"],
        rows,
    )
    p = result["peaks"]
    peak_rows = [[f"FP32 {name}", f"{v / 1e9:.1f}", ""] for name, v in p["fp32"].items()]
    peak_rows += [[f"INT8 {name}", f"{v / 1e9:.1f}", ", ".join(p["kernels"].get(name, []))]
                  for name, v in p["int8"].items()]
    peak_rows += [[f"BF16 hint: {name}", f"{v / 1e9:.1f}", ", ".join(p.get("bf16_kernels", {}).get(name, []))]
                  for name, v in p.get("bf16", {}).items()]
    peak_rows += [["**FP32 peak** (best above)", f"**{p['fp32_peak'] / 1e9:.1f}**", ""],
                  ["**INT8 peak** (best above)", f"**{p['int8_peak'] / 1e9:.1f}**", ""]]
    if "bf16_peak" in p:
        peak_rows.append(["**BF16 peak** (best above)", f"**{p['bf16_peak'] / 1e9:.1f}**", ""])
    peaks = markdown_table(["peak measurement (fastest call)", "GOP/s", "OpenVINO kernel"], peak_rows)
    notes = sorted({str(r["engine_rss_note"]) for r in result["engines"] if r.get("engine_rss_mib", 0) is None
                    and r.get("engine_rss_note")})
    if notes:
        engines += "\n\nEngine's share of peak RSS " + "; ".join(notes) + "."
    return (f"{engines}\n\nModel: {ops / 1e9:.3f} GOP per slice ({ops / 2e9:.3f} G multiply-accumulates), "
            f"{result['slices']} real slices of {result['cases']} of the model's validation cases "
            f"({', '.join(result.get('case_ids', []))}).\n\n{peaks}\n\n"
            + markdown_table(["target", "measured", "met"], result["targets"]))


def targets(result: dict[str, Any]) -> list[list[str]]:
    """Each target of issue 7 for inference with its measured value and whether it is met."""
    by = {r["engine"]: r for r in result["engines"]}
    rows: list[list[str]] = []
    if {"ov-int8", "ov-fp32", "torch"} <= by.keys():
        i8, f32, pt = by["ov-int8"], by["ov-fp32"], by["torch"]
        for name, ref, need in (("OpenVINO FP32", f32, 2.0), ("PyTorch eager FP32", pt, 8.0)):
            ratio = i8["best"] / ref["best"]
            rows.append([f"INT8 >= {need:.0f}x {name} (best slices/s)", f"{ratio:.2f}x",
                         "yes" if ratio >= need else f"NO (gap {need - ratio:.2f}x)"])
        rows.append(dice_target_row(i8, f32))
        frac = result["ops_per_slice"] * i8["best"] / result["peaks"]["int8_peak"]
        rows.append(["INT8 at >= 50% of the INT8 peak", f"{100 * frac:.1f}%",
                     "yes" if frac >= 0.5 else f"NO (gap {100 * (0.5 - frac):.1f} points)"])
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "train",
                        help="a folder holding the model's validation cases (split.json 'val')")
    parser.add_argument("--quick", action="store_true", help="one case, 0.5 s per rate (a smoke run)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    return parser


def dice_target_row(i8: dict[str, Any], f32: dict[str, Any], tolerance: float = 0.01) -> list[str]:
    """The target "INT8 Dice within 0.01 of FP32": met when every case's INT8 Dice is within
    ``tolerance`` of its FP32 Dice, in either direction (a gain beyond it is a difference too: INT8 no
    longer computes what FP32 does). The largest per-case difference is shown with the means."""
    per_case = {c: i8["dice_per_case"][c] - f32["dice_per_case"][c]
                for c in i8["dice_per_case"] if c in f32["dice_per_case"]}
    name = f"INT8 Dice within {tolerance} of FP32 (every case)"
    if not per_case:
        return [name, "no case in common", "NO (not measured)"]
    case = max(per_case, key=lambda c: abs(per_case[c]))
    worst = per_case[case]
    measured = (f"mean {i8['dice']:.4f} vs {f32['dice']:.4f} ({i8['dice'] - f32['dice']:+.4f}); largest "
                f"per-case difference {worst:+.4f} ({case})")
    side = "above" if worst > 0 else "below"
    met = "yes" if abs(worst) <= tolerance else f"NO ({case}: INT8 {side} FP32 by {abs(worst):.4f})"
    return [name, measured, met]


def main(argv: Sequence[str] | None = None) -> int:
    """Run every engine in a child process, print and save the tables."""
    args = build_parser().parse_args(argv)
    seconds, limit = (0.5, 1) if args.quick else (2.0, None)
    if args.child:
        measured = measure_engine(args.child, args.model, args.data, min_seconds=seconds, case_limit=limit)
        print(json.dumps(measured))
        return 0
    from converters.exceptions import HoldoutDataError
    from db.card import load_card

    card = load_card(args.model)
    try:
        found, missing = find_validation_cases(args.data, args.model)
    except (NoValidationCasesError, HoldoutDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    used = [ref.case_id for ref in found][:limit]
    print(f"measuring on the model's validation cases under {args.data}: {', '.join(used)}"
          + (f" (not found there: {', '.join(missing)})" if missing else ""), flush=True)
    rows = []
    for engine in args.engines.split(","):
        child = [__file__, "--child", engine, "--model", str(args.model), "--data", str(args.data)]
        rows.append(run_child([*child, *(["--quick"] if args.quick else [])]))
        last = rows[-1]
        print(f"{last['label']}: {last['best']:.1f} slices/s, Dice {last['dice']:.4f}", flush=True)
    result: dict[str, Any] = {
        "model": f"{card['name']} {card['version']}",
        "ops_per_slice": ops_per_slice(args.model / "model.onnx", card["preprocessing"]["crop_size"],
                                       len(card["modalities"])),
        "engines": rows,
        "slices": rows[0]["slices"],
        "cases": len(rows[0]["dice_per_case"]),
        "case_ids": list(rows[0]["dice_per_case"]),
        "data": str(args.data),
        "peaks": peaks(min_seconds=seconds / 2),
    }
    result["targets"] = targets(result)
    text = tables(result)
    result["markdown"] = text
    print(text)
    path = save_result("inference", result, args.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
