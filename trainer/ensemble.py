"""Several exported networks of one split as one model: the mean of their outputs (``segnode ensemble``).

Networks trained on the same cases from different seeds disagree most where the data say least
(at the tumour's faint edge, on tissue none of them saw); averaging them keeps what they agree on.
The ensemble is one ONNX graph (every member's graph beside the others on one shared input, a
``Mean`` of their logits, or of their probabilities given back as logits, as the output:
:func:`merge_onnx`), so that everything downstream is unchanged: it
converts to an OpenVINO IR FP32, quantizes to INT8 as one network (:func:`trainer.export.quantize_int8`,
calibration slices from the members' shared training split), is scored on their shared validation
cases, meets the export's false-tumour check, gets a card, a NOTICE and a row in the model table, and
the node runs it like any other model.

The members must be of one task, modalities, preprocessing, output and labels, and trained on the
same split: the ensemble's validation cases are then cases none of its members trained on. Their
cards' names, versions and ONNX sha256 go into the ensemble's ``training.ensemble_of``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.cpu import cpu_description
from converters.prediction import SlicePredictor
from db.card import artifact, file_entry, load_card, verify_files
from trainer.evaluate import CardPredictor, card_metrics, evaluate_cases
from trainer.exceptions import TrainerError
from trainer.export import (
    EXPORT_TOLERANCE,
    _load_split_cases,
    accuracy_check,
    calibration_slices,
    check_slices,
    data_provenance,
    int8_dice_drops,
    int8_false_tumour_check,
    max_difference,
    quantize_int8,
    split_refs,
    write_model_dir,
)
from trainer.false_tumour import DEFAULT_MAX_RATIO
from trainer.predictors import onnx_predictor, openvino_predictor

logger = logging.getLogger(__name__)

#: Card keys that every member must share: what the node does to an image and reads from the output.
SHARED_KEYS = ("task", "modalities", "optional_modalities", "preprocessing", "output", "labels")
#: How the members' outputs are averaged: their logits, or their probabilities (the card's activation)
#: given back as logits that the same activation turns into the mean probability.
COMBINATIONS = ("logits", "probabilities")
#: Probabilities are clipped to [EPS, 1 - EPS] before they are turned back into logits: float32 cannot
#: tell 1 - p apart closer to 1, and a probability of 0.9999 decides like 1 at any threshold.
PROBABILITY_EPS = 1e-4
#: The operations after the members (their averaging), by name: NNCF leaves them in float. Quantized,
#: the probabilities' logs of ``--combine probabilities`` lost all tumour (INT8 validation Dice 0).
#: The last one is named for the graph's output, "logits" in every ``segnode export``.
ENSEMBLE_OPS = (r"ens_.*", "logits")
#: The card's ``training.combination`` for each of :data:`COMBINATIONS`.
COMBINATION_TEXT = {
    "logits": "mean of the members' logits",
    "probabilities": f"mean of the members' probabilities, clipped to [{PROBABILITY_EPS:g}, "
    f"{1 - PROBABILITY_EPS:g}], as logits",
}


@dataclass
class EnsembleOptions:
    """Options of ``segnode ensemble``."""

    member_dirs: list[Path]
    out_dir: Path
    version: str
    data: Path
    #: The model's name; None: the members' name (they must then share it).
    name: str | None = None
    #: One of :data:`COMBINATIONS`.
    combine: str = "logits"
    calibration_size: int = 300
    seed: int = 0
    max_dice_drop: float | None = None
    #: None: the false-tumour check is not run.
    max_false_tumour_ratio: float | None = DEFAULT_MAX_RATIO
    register: bool = True
    database_url: str | None = None


def load_members(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """The members' cards, checked: files as their cards say, one task, preprocessing, output, labels
    and training split. ``TrainerError`` names the member and the first key that differs."""
    if len(dirs) < 2:
        raise TrainerError(f"an ensemble needs at least two member models, got {len(dirs)}")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise TrainerError("a member model is given twice; give each directory once")
    cards = []
    for directory in dirs:
        card = load_card(directory)
        problems = verify_files(card, directory)
        if problems:
            raise TrainerError(f"{directory}: {problems[0]}")
        artifact(card, "onnx")  # ModelCardError naming the directory's card when it has no ONNX
        cards.append(card)
    first = cards[0]
    for directory, card in zip(dirs[1:], cards[1:], strict=True):
        for key in SHARED_KEYS:
            if card.get(key) != first.get(key):
                raise TrainerError(
                    f"{directory}: its card's {key} differs from {dirs[0]}'s; an ensemble's members "
                    "must read and write images the same way"
                )
        if _split_sets(card) != _split_sets(first):
            raise TrainerError(
                f"{directory}: trained on another split than {dirs[0]}; the members must share the "
                "training and validation cases (segnode train --split-seed)"
            )
    if not _split_sets(first)[0]:
        raise TrainerError(f"{dirs[0]}: its card has no training split (training.split.train)")
    return cards


def _split_sets(card: Mapping[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    split = (card.get("training") or {}).get("split") or {}
    return frozenset(split.get("train") or ()), frozenset(split.get("val") or ())


def merge_onnx(
    paths: Sequence[Path], out: Path, combine: str = "logits", activation: str = "sigmoid"
) -> None:
    """Write one ONNX graph running every network of ``paths`` on one input. Its output is the mean of
    their logits (``combine="logits"``), or the logits whose ``activation`` (sigmoid, or softmax over
    the channels) is the mean of their probabilities (``"probabilities"``: :func:`probability_logits`).
    Each member's names get the prefix ``m<i>_``; the input and output keep the first member's names."""
    import onnx
    from onnx import compose, helper, numpy_helper

    models = [onnx.load(str(p)) for p in paths]
    opsets = {tuple((o.domain, o.version) for o in m.opset_import) for m in models}
    if len(opsets) != 1:
        raise TrainerError(
            f"the members' ONNX files use different opsets ({sorted(opsets)}); export them again"
        )
    first = models[0].graph
    if len(first.input) != 1 or len(first.output) != 1:
        raise TrainerError(f"{paths[0]}: an ensemble member must have one input and one output")
    input_name, output_name = first.input[0].name, first.output[0].name
    nodes, initializers, value_info, outputs = [], [], [], []
    for i, model in enumerate(models):
        prefixed = compose.add_prefix(model, prefix=f"m{i}_").graph
        nodes.append(helper.make_node("Identity", [input_name], [prefixed.input[0].name]))
        nodes.extend(prefixed.node)
        initializers.extend(prefixed.initializer)
        value_info.extend(prefixed.value_info)
        member_out = prefixed.output[0].name
        if combine == "probabilities":
            probabilities = f"ens_m{i}_probabilities"
            if activation == "sigmoid":
                nodes.append(helper.make_node("Sigmoid", [member_out], [probabilities]))
            else:
                nodes.append(helper.make_node("Softmax", [member_out], [probabilities], axis=1))
            member_out = probabilities
        outputs.append(member_out)
    # The mean as named Adds and a Multiply (ONNX's Mean becomes unnamed Adds in OpenVINO), so that every
    # operation after the members is named ens_* and stays in float when quantized (ENSEMBLE_OPS).
    initializers.append(numpy_helper.from_array(np.array(1 / len(models), dtype=np.float32), "ens_weight"))
    total = outputs[0]
    for i, member_out in enumerate(outputs[1:], start=1):
        nodes.append(helper.make_node("Add", [total, member_out], [f"ens_sum_{i}"]))
        total = f"ens_sum_{i}"
    if combine == "logits":
        nodes.append(helper.make_node("Mul", [total, "ens_weight"], [output_name]))
    else:
        constants = (("ens_low", PROBABILITY_EPS), ("ens_high", 1 - PROBABILITY_EPS), ("ens_one", 1.0))
        for name, value in constants:
            initializers.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        nodes += [
            helper.make_node("Mul", [total, "ens_weight"], ["ens_mean"]),
            helper.make_node("Clip", ["ens_mean", "ens_low", "ens_high"], ["ens_p"]),
            helper.make_node("Log", ["ens_p"], ["ens_log_p"]),
        ]
        if activation == "sigmoid":  # log p - log(1 - p)
            nodes += [
                helper.make_node("Sub", ["ens_one", "ens_p"], ["ens_q"]),
                helper.make_node("Log", ["ens_q"], ["ens_log_q"]),
                helper.make_node("Sub", ["ens_log_p", "ens_log_q"], [output_name]),
            ]
        else:  # softmax(log p) = p, as the mean probabilities sum to 1 over the channels
            nodes.append(helper.make_node("Identity", ["ens_log_p"], [output_name]))
    graph = helper.make_graph(
        nodes, "ensemble", [first.input[0]], [first.output[0]], initializers, value_info=value_info
    )
    merged = helper.make_model(graph, opset_imports=list(models[0].opset_import))
    merged.ir_version = models[0].ir_version
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out))


def mean_predictor(
    predictors: Sequence[SlicePredictor], combine: str = "logits", activation: str = "sigmoid"
) -> SlicePredictor:
    """A slice predictor computing what :func:`merge_onnx` writes, from ``predictors``' logits (numpy)."""

    def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        logits = np.stack([p(batch) for p in predictors]).astype(np.float32)
        if combine == "logits":
            return np.asarray(logits.mean(axis=0), dtype=np.float32)
        return probability_logits(logits, activation)

    return predict


def probability_logits(logits: npt.NDArray[np.float32], activation: str) -> npt.NDArray[np.float32]:
    """The logits whose ``activation`` is the mean probability of the members' ``logits`` (M, N, K, H, W),
    the mean clipped to [:data:`PROBABILITY_EPS`, 1 - :data:`PROBABILITY_EPS`]."""
    if activation == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-logits))
    else:
        shifted = np.exp(logits - logits.max(axis=2, keepdims=True))
        probs = shifted / shifted.sum(axis=2, keepdims=True)
    p = np.clip(probs.mean(axis=0), PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    out = np.log(p) - np.log(1 - p) if activation == "sigmoid" else np.log(p)
    return np.asarray(out, dtype=np.float32)


def _member_entry(directory: Path, card: Mapping[str, Any]) -> dict[str, Any]:
    training = card.get("training") or {}
    onnx_file = artifact(card, "onnx")["files"][0]
    int8: dict[str, Any] = next((a for a in card["artifacts"] if a["key"] == "ir_int8"), {})
    return {
        "name": card["name"],
        "version": card["version"],
        "onnx_sha256": onnx_file["sha256"],
        "seed": training.get("seed"),
        "commit": training.get("commit"),
        "best_val_dice": training.get("best_val_dice"),
        "int8_val_dice": (int8.get("metrics") or {}).get("mean", {}).get("dice"),
        "source": str(directory),
    }


def ensemble_dir(options: EnsembleOptions, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``options.out_dir``: the members' mean as one model (module docstring); returns its card.

    Raises
    ------
    AccuracyCheckError
        The INT8 network failed a check (Dice drop, false tumour): the directory is written, not registered.
    TrainerError
        The members differ, a member's files do not match its card, the output folder already holds a
        model, a case of the split is missing, or the merged graph does not compute the members' mean.
    """
    import openvino as ov

    def step(msg: str) -> None:
        logger.info("%s", msg)
        if on_step is not None:
            on_step(msg)

    out = options.out_dir
    if options.combine not in COMBINATIONS:
        raise TrainerError(f"--combine {options.combine!r} is not one of {', '.join(COMBINATIONS)}")
    if (out / "model.json").exists():
        raise TrainerError(f"--out {out} already holds a model (model.json); give a new or empty folder")
    cards = load_members(options.member_dirs)
    names = {c["name"] for c in cards}
    if options.name is None and len(names) > 1:
        raise TrainerError(f"the members are named {', '.join(sorted(names))}; give the ensemble's --name")
    first = cards[0]
    card_base: dict[str, Any] = {
        "format_version": first.get("format_version", 1),
        "name": options.name or first["name"],
        "version": options.version,
        **{k: first[k] for k in SHARED_KEYS if k in first},
    }
    split = first["training"]["split"]
    step("loading the training and validation cases")
    refs = split_refs(split, options.data, "the members'")
    train_cases = _load_split_cases(refs["train"], card_base)
    val_cases = _load_split_cases(refs["val"], card_base)
    probe = check_slices(val_cases or train_cases)

    out.mkdir(parents=True, exist_ok=True)
    step(f"merging {len(cards)} ONNX networks")
    onnx_path = out / "model.onnx"
    member_onnx = [
        d / artifact(c, "onnx")["files"][0]["path"] for d, c in zip(options.member_dirs, cards, strict=True)
    ]
    activation = card_base["output"]["activation"]
    merge_onnx(member_onnx, onnx_path, options.combine, activation)
    reference = mean_predictor([onnx_predictor(p) for p in member_onnx], options.combine, activation)
    checks = {"onnx_vs_members_mean": _check_mean("ONNX", reference, onnx_predictor(onnx_path), probe)}

    step("converting to OpenVINO IR FP32")
    fp32_xml = out / "model_fp32.xml"
    ov.save_model(ov.convert_model(str(onnx_path)), str(fp32_xml), compress_to_fp16=False)
    fp32_predict = openvino_predictor(card_base, fp32_xml)
    checks["ir_fp32_vs_members_mean"] = _check_mean("IR FP32", reference, fp32_predict, probe)

    step(f"quantizing to INT8 ({options.calibration_size} calibration slices)")
    int8_xml = out / "model_int8.xml"
    calibration = quantize_int8(
        fp32_xml,
        int8_xml,
        calibration_slices(train_cases, options.calibration_size, options.seed),
        val_cases,
        card_base,
        options.max_dice_drop,
        ENSEMBLE_OPS,
    )
    del train_cases, val_cases
    int8_predict = openvino_predictor(card_base, int8_xml)
    artifacts: list[dict[str, Any]] = [
        {
            "key": "onnx",
            "kind": "onnx",
            "precision": "fp32",
            "parent": None,
            "files": [file_entry(onnx_path, out)],
        },
        {
            "key": "ir_fp32",
            "kind": "ir",
            "precision": "fp32",
            "parent": "onnx",
            "files": [file_entry(fp32_xml, out), file_entry(fp32_xml.with_suffix(".bin"), out)],
        },
        {
            "key": "ir_int8",
            "kind": "ir",
            "precision": "int8",
            "parent": "ir_fp32",
            "files": [file_entry(int8_xml, out), file_entry(int8_xml.with_suffix(".bin"), out)],
        },
    ]
    if refs["val"]:
        step("evaluating FP32 and INT8 on the validation cases")
        predictors = {"ir_fp32": (fp32_predict, "fp32"), "ir_int8": (int8_predict, "int8")}
        for entry in artifacts[1:]:
            predict, precision = predictors[entry["key"]]
            result = evaluate_cases(CardPredictor(card_base, predict, entry["key"], precision), refs["val"])
            entry["metrics"] = card_metrics(result, "validation")
        drops = int8_dice_drops(artifacts[1]["metrics"], artifacts[2]["metrics"])
        calibration["validation_dice_drop"] = drops.pop("mean")
        if drops:
            calibration["validation_dice_drop_regions"] = drops
        if options.max_dice_drop is not None:
            calibration["accuracy_check"] = accuracy_check(
                options.max_dice_drop, {"mean": calibration["validation_dice_drop"], **drops}
            )
    calibration["validation_cpu"] = cpu_description()
    if options.max_false_tumour_ratio is not None:
        calibration["false_tumour_check"] = int8_false_tumour_check(
            card_base,
            fp32_predict,
            int8_predict,
            refs["train"] + refs["val"],
            options.max_false_tumour_ratio,
            on_step,  # each case's line is logged there (trainer.export), as for an export
        )

    training = first["training"]
    card = {
        **card_base,
        "artifacts": artifacts,
        "calibration": calibration,
        "training": {
            "data_fingerprint": training.get("data_fingerprint"),
            "split": split,
            "ensemble_of": [_member_entry(d, c) for d, c in zip(options.member_dirs, cards, strict=True)],
            "combination": COMBINATION_TEXT[options.combine],
        },
        "export_checks": checks,
        "data_provenance": data_provenance(options.data, list(split["train"]) + list(split.get("val") or [])),
    }
    return write_model_dir(card, out, options.register, options.database_url)


def _check_mean(
    name: str, reference: SlicePredictor, other: SlicePredictor, slices: npt.NDArray[np.float32]
) -> float:
    """Raise TrainerError when ``other`` is not the members' mean (:data:`EXPORT_TOLERANCE`)."""
    diff = max_difference(reference, other, slices)
    if diff > EXPORT_TOLERANCE:
        raise TrainerError(
            f"{name}: logits differ from the members' mean by {diff:.2e} (> {EXPORT_TOLERANCE:.0e})"
        )
    logger.info("%s matches the members' mean (max scaled logit difference %.2e)", name, diff)
    return diff
