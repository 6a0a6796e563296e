"""Quantize an exported model's FP32 IR again, as a new version of the model (``segnode requantize``).

An INT8 artifact can be remade without its training run: the FP32 IR, the card's training split and
the training data are enough. The new directory keeps every other artifact byte for byte, gets a new
``model_int8.xml/.bin`` quantized as ``segnode export`` does now (:func:`trainer.export.quantize_int8`),
FP32 and INT8 metrics measured again on the validation split on this CPU, a ``requantized_from``
block naming the version and INT8 file it replaces, and a new version number. The new INT8 network
meets the export's false-tumour check (:func:`trainer.export.int8_false_tumour_check`) or is written
and not registered. Nothing is read from the holdout.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.cpu import cpu_description
from db.card import artifact, file_entry, ir_xml, load_card, verify_files
from trainer.evaluate import CardPredictor, card_metrics, evaluate_cases
from trainer.exceptions import TrainerError
from trainer.export import (
    _load_split_cases,
    calibration_slices,
    int8_dice_drops,
    int8_false_tumour_check,
    quantize_int8,
    split_refs,
    write_model_dir,
)
from trainer.false_tumour import DEFAULT_MAX_RATIO
from trainer.predictors import openvino_predictor

logger = logging.getLogger(__name__)

INT8_FILES = ("model_int8.xml", "model_int8.bin")


@dataclass
class RequantizeOptions:
    """Options of ``segnode requantize``."""

    model_dir: Path
    out_dir: Path
    version: str
    data: Path
    calibration_size: int = 300
    seed: int = 0
    #: None: the false-tumour check is not run.
    max_false_tumour_ratio: float | None = DEFAULT_MAX_RATIO
    register: bool = True
    database_url: str | None = None


def requantize_dir(
    options: RequantizeOptions, on_step: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Write ``options.out_dir``: the model of ``options.model_dir`` with a new INT8 artifact.

    Returns
    -------
    dict
        The new model card.

    Raises
    ------
    AccuracyCheckError
        The new INT8 network failed the false-tumour check: the directory is written, not registered.
    TrainerError
        The source directory's files do not match its card, it has no FP32 IR or training split,
        the new version equals the old one, the output folder is the source or already holds a model,
        or a case is missing.
    """
    source, out = options.model_dir, options.out_dir
    card = load_card(source)
    problems = verify_files(card, source)
    if problems:
        raise TrainerError(f"{source}: {problems[0]}")
    if options.version == card["version"]:
        raise TrainerError(f"--version {options.version} is the source model's own version; give a new one")
    if out.resolve() == source.resolve():
        raise TrainerError(f"--out {out} is the source directory; write the new version beside it")
    if (out / "model.json").exists():
        raise TrainerError(f"--out {out} already holds a model (model.json); give a new or empty folder")
    fp32_xml = ir_xml(card, source, "fp32")
    old_int8 = artifact(card, "ir_int8")

    def step(msg: str) -> None:
        logger.info("%s", msg)
        if on_step is not None:
            on_step(msg)

    step("loading the training split for calibration")
    if not card.get("training", {}).get("split", {}).get("train"):
        raise TrainerError(f"model {card['name']} {card['version']}: its card has no training split")
    refs = split_refs(card["training"]["split"], options.data, "the model's")
    calibration_cases = _load_split_cases(refs["train"], card)
    val_refs = refs["val"]
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in INT8_FILES:
            shutil.copyfile(path, out / path.name)

    step(f"quantizing to INT8 ({options.calibration_size} calibration slices)")
    calibration = quantize_int8(
        out / fp32_xml.name,
        out / INT8_FILES[0],
        calibration_slices(calibration_cases, options.calibration_size, options.seed),
        [],
        card,
        None,
    )
    del calibration_cases

    artifacts = [dict(a) for a in card["artifacts"]]
    int8 = next(a for a in artifacts if a["key"] == "ir_int8")
    int8["files"] = [file_entry(out / name, out) for name in INT8_FILES]
    fp32 = next(a for a in artifacts if a["key"] == "ir_fp32")
    replaced: dict[str, Any] = {
        "version": card["version"],
        "ir_int8": [{"path": f["path"], "sha256": f["sha256"]} for f in old_int8["files"]],
        "calibration": card.get("calibration"),
    }
    # f32 as the node runs them: the INT8 network's unquantized layers too (node/segmenter.py)
    new_fp32, new_int8 = (openvino_predictor(card, out / name) for name in (fp32_xml.name, INT8_FILES[0]))
    if val_refs:
        step("evaluating FP32, the old INT8 and the new INT8 on the validation cases")
        runs = {
            "ir_fp32": (new_fp32, "fp32"),
            "ir_int8": (new_int8, "int8"),
            "old": (openvino_predictor(card, ir_xml(card, source, "int8")), "int8"),
        }
        metrics = {}
        for key, (predict, precision) in runs.items():
            result = evaluate_cases(CardPredictor(card, predict, key, precision), val_refs)
            metrics[key] = card_metrics(result, "validation")
        fp32["metrics"], int8["metrics"] = metrics["ir_fp32"], metrics["ir_int8"]
        drops = int8_dice_drops(fp32["metrics"], int8["metrics"])
        calibration["validation_dice_drop"] = drops.pop("mean")
        if drops:
            calibration["validation_dice_drop_regions"] = drops
        # the replaced INT8 on this CPU: its card's figures may come from a CPU that hides the defect
        replaced["metrics_on_this_cpu"] = metrics["old"]
    calibration["validation_cpu"] = cpu_description()
    if options.max_false_tumour_ratio is not None:
        calibration["false_tumour_check"] = int8_false_tumour_check(
            card,
            new_fp32,
            new_int8,
            refs["train"] + val_refs,
            options.max_false_tumour_ratio,
            step,
        )

    new_card = {
        **card,
        "version": options.version,
        "artifacts": artifacts,
        "calibration": calibration,
        "requantized_from": replaced,
    }
    new_card.pop("registered_ids", None)
    new_card.pop("registered_in", None)
    return write_model_dir(new_card, out, options.register, options.database_url)
