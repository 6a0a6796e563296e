"""Per-case 3D evaluation of any form of a model: checkpoint, ONNX, OpenVINO IR, or a model directory.

Every form goes through the same :func:`converters.prediction.segment_volume` (the node's
preprocessing and restore) with a predictor of :mod:`trainer.predictors`, so the figures of a
checkpoint, its ONNX export and its FP32/INT8 IR are comparable case by case.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.exceptions import ConverterError
from converters.prediction import SlicePredictor, segment_volume
from db.card import ir_xml, load_card
from trainer.exceptions import TrainerError
from trainer.metrics import METRIC_NAMES, VOLUME_NAMES, case_metrics, mean_metrics
from trainer.predictors import onnx_predictor, openvino_predictor, torch_predictor

logger = logging.getLogger(__name__)


#: Per-case figures of each region kept in a model card's metrics (``regions_per_case``).
REGION_CASE_FIELDS: tuple[str, ...] = ("dice", "hd95", "volume_error_ml", "volume_error_rel")

#: Per-case figures kept in a model card's metrics (``per_case``): the metrics, and the volume errors
#: where the case has them.
CASE_FIELDS: tuple[str, ...] = (*METRIC_NAMES, "volume_error_ml", "volume_error_rel")


@dataclass
class CardPredictor:
    """A model opened for evaluation: its slice predictor, its card and a description for reports."""

    card: dict[str, Any]
    predict: SlicePredictor
    description: str
    precision: str


def load_model(path: Path, precision: str = "int8", device: str = "CPU") -> CardPredictor:
    """Open a model for evaluation.

    Parameters
    ----------
    path:
        A checkpoint ``.pt`` (card inside), an ``.onnx`` or IR ``.xml`` (``model.json`` beside it),
        or a model directory (``model.json`` + files; the IR of ``precision`` is used).
    precision:
        ``fp32`` or ``int8``, for a model directory.
    device:
        OpenVINO device for IR models.

    Raises
    ------
    TrainerError
        The path does not exist or is none of the above.
    """
    if not path.exists():
        raise TrainerError(f"model {path} does not exist")
    if precision not in ("fp32", "int8"):
        raise TrainerError(f"--precision {precision!r} is not 'fp32' or 'int8'")
    if path.is_dir():
        card = load_card(path)
        xml = ir_xml(card, path, precision)
        return _openvino(card, xml, precision, device)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        from trainer.checkpoint import load_checkpoint, model_from_checkpoint

        state = load_checkpoint(path)
        model = model_from_checkpoint(state)
        predict = torch_predictor(model)
        return CardPredictor(dict(state["card"]), predict, f"PyTorch checkpoint {path}", "fp32")
    if suffix == ".onnx":
        return CardPredictor(load_card(path.parent), onnx_predictor(path), f"ONNX {path}", "fp32")
    if suffix == ".xml":
        card = load_card(path.parent)
        prec = "int8" if "int8" in path.name.lower() else "fp32"
        return _openvino(card, path, prec, device)
    raise TrainerError(f"model {path}: expected a .pt checkpoint, an .onnx, an IR .xml or a model directory")


def load_registered(
    kind: str, precision: str, path: Path, card: Mapping[str, Any], device: str = "CPU"
) -> CardPredictor:
    """Open a registered artifact for evaluation: its file and the card kept in the model table.

    Parameters
    ----------
    kind, precision:
        The artifact's row (``checkpoint`` | ``onnx`` | ``ir``; ``fp32`` | ``fp16`` | ``int8``).
    path:
        Its ``.pt``, ``.onnx`` or IR ``.xml`` file.
    card:
        The model card of its row (a checkpoint uses the card saved inside it).
    device:
        OpenVINO device for IR models.

    Raises
    ------
    TrainerError
        The file does not exist, or ``kind`` is none of the above.
    """
    if not path.is_file():
        raise TrainerError(f"model file {path} does not exist")
    if kind == "checkpoint":
        return load_model(path)
    if kind == "onnx":
        return CardPredictor(dict(card), onnx_predictor(path), f"ONNX {path}", "fp32")
    if kind == "ir":
        return _openvino(dict(card), path, precision, device)
    raise TrainerError(f"model {path}: kind {kind!r} is not checkpoint, onnx or ir")


def _openvino(card: dict[str, Any], xml: Path, precision: str, device: str) -> CardPredictor:
    # f32 on a CPU, as the node runs a model (node/segmenter.py): OpenVINO's default is bf16 on a CPU
    # with native bf16, for an FP32 network and for an INT8 network's unquantized layers alike
    hint = "f32" if device.upper() == "CPU" else None
    predict = openvino_predictor(card, xml, device=device, precision_hint=hint)
    return CardPredictor(card, predict, f"OpenVINO IR {precision.upper()} {xml}", precision)


def evaluate_cases(
    loaded: CardPredictor,
    refs: Sequence[Any],
    batch_size: int = 16,
    on_case: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Segment and score every case of ``refs`` (``CaseRef`` objects with labels).

    Returns
    -------
    dict
        ``{"model", "precision", "task", "cases": [{"case", metrics..., "seconds"}], "mean": {...}}``;
        for ``brats_regions`` also ``"regions": {"WT"|"TC"|"ET": {"cases": [...], "mean": {...}}}``.
    """
    task = loaded.card["task"]
    per_case: list[dict[str, Any]] = []
    for ref in refs:
        case = ref.load()
        if case.label is None:
            raise TrainerError(f"case {ref.case_id} ({ref.path}) has no label map; evaluation needs labels")
        t0 = time.perf_counter()
        try:
            pred = segment_volume(loaded.predict, loaded.card, case.images, case.affine, batch_size)
        except ConverterError as exc:
            raise TrainerError(f"case {ref.case_id} ({ref.path}): {exc}") from None
        seconds = time.perf_counter() - t0
        scores = case_metrics(pred, case.label, case.spacing, task)
        per_case.append({"case": ref.case_id, **scores, "seconds": round(seconds, 3)})
        if on_case is not None:
            on_case(ref.case_id, scores)
    return report(loaded, per_case)


def report(loaded: CardPredictor, per_case: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The evaluation JSON (DESIGN.md, ``segnode evaluate --json``) from per-case scores."""
    names = (*METRIC_NAMES, *VOLUME_NAMES)
    cases = [
        {"case": c["case"], **{m: c[m] for m in names if m in c}, "seconds": c.get("seconds")}
        for c in per_case
    ]
    out: dict[str, Any] = {
        "model": loaded.description,
        "precision": loaded.precision,
        "task": loaded.card["task"],
        "cases": cases,
        "mean": {k: v for k, v in mean_metrics(cases).items() if k in names},
    }
    if per_case and "regions" in per_case[0]:
        out["regions"] = {}
        for region in per_case[0]["regions"]:
            region_cases = [{"case": c["case"], **c["regions"][region]} for c in per_case]
            out["regions"][region] = {"cases": region_cases, "mean": mean_metrics(region_cases)}
    return out


def card_metrics(result: Mapping[str, Any], split: str) -> dict[str, Any]:
    """An artifact's ``metrics`` block of the model card from an evaluation result.

    ``mean`` holds the result's means (volume errors included), ``per_case`` each case's
    :data:`CASE_FIELDS`; for regions, ``regions`` holds each region's
    means (volume errors included) and ``regions_per_case`` each case's :data:`REGION_CASE_FIELDS`.
    """
    metrics: dict[str, Any] = {
        "cases": [c["case"] for c in result["cases"]],
        "split": split,
        "mean": result["mean"],
        "per_case": [{k: c[k] for k in ("case", *CASE_FIELDS) if k in c} for c in result["cases"]],
    }
    if "regions" in result:
        metrics["regions"] = {name: block["mean"] for name, block in result["regions"].items()}
        metrics["regions_per_case"] = {
            name: [{k: c[k] for k in ("case", *REGION_CASE_FIELDS)} for c in block["cases"]]
            for name, block in result["regions"].items()
        }
    return metrics


def evaluation_entry(result: Mapping[str, Any], split: str, data: Path) -> dict[str, Any]:
    """What ``segnode evaluate`` records of a result under ``split``, in the model table (a model id)
    and in a model directory's ``model.json`` (``--record``) alike: :func:`card_metrics` (per-region
    results included), the data folder (resolved) and the precision evaluated."""
    return {**card_metrics(result, split), "data": str(data.resolve()), "precision": result["precision"]}


def fold_validation_cases(model_dir: Path) -> list[str]:
    """The case ids a model directory's training run validated on (its card's ``training.split``,
    written by ``segnode export``): the cases a cross-validation fold's model may be scored on.

    Raises
    ------
    ModelCardError
        The directory's card is missing or unreadable.
    TrainerError
        The card names no validation case.
    """
    card = load_card(Path(model_dir))
    split = (card.get("training") or {}).get("split") or {}
    val = split.get("val")
    if not val:
        raise TrainerError(
            f"{model_dir}/model.json names no validation case (training.split.val): cross-validation "
            "scores model directories written by segnode export, each on the cases its run validated on"
        )
    return [str(c) for c in val]


def _overlap(case: str, first: str, second: str) -> TrainerError:
    return TrainerError(
        f"case {case} was validated by two folds ({first} and {second}): the folds' validation cases "
        "must be disjoint (segnode train --folds K --fold I, one seed)"
    )


def fold_validation_sets(
    models: Sequence[Path], names: Sequence[str], available: Collection[str], data: Path
) -> list[list[str]]:
    """Each fold's validation cases (:func:`fold_validation_cases`), checked before anything is
    evaluated: every case among ``available`` (the case ids found under ``data``), no case in two folds.

    Raises
    ------
    TrainerError
        A fold validated on a case missing from ``data``, or two folds on one case.
    """
    owner: dict[str, str] = {}
    sets = []
    for path, name in zip(models, names, strict=True):
        wanted = fold_validation_cases(path)
        missing = [c for c in wanted if c not in available]
        if missing:
            raise TrainerError(f"{path} validated on {', '.join(missing)}, not found under {data}")
        for case in wanted:
            if case in owner:
                raise _overlap(case, owner[case], name)
            owner[case] = name
        sets.append(wanted)
    return sets


def pool_folds(results: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Cross-validation folds' evaluations (:func:`evaluate_cases`, each on its fold's validation cases)
    as one: every case with the fold that scored it (``"fold"``), and the means over all cases.

    Raises
    ------
    TrainerError
        The folds are of different tasks or precisions, or a case was scored by two folds (their
        validation cases must be disjoint, as ``segnode train --folds K --fold I`` makes them).
    """
    if len(results) != len(names) or not results:
        raise TrainerError("cross-validation needs one fold at least, and one name for each fold")
    for key in ("task", "precision"):
        values = sorted({str(r[key]) for r in results})
        if len(values) > 1:
            raise TrainerError(f"the folds differ in {key}: {', '.join(values)}")
    owner: dict[str, str] = {}
    for result, name in zip(results, names, strict=True):
        for case in result["cases"]:
            if case["case"] in owner:
                raise _overlap(case["case"], owner[case["case"]], name)
            owner[case["case"]] = name
    pairs = list(zip(results, names, strict=True))
    cases = [{"fold": name, **c} for result, name in pairs for c in result["cases"]]
    out: dict[str, Any] = {
        "model": [str(r["model"]) for r in results],
        "folds": list(names),
        "precision": results[0]["precision"],
        "task": results[0]["task"],
        "cases": cases,
        "mean": mean_metrics(cases),
    }
    if "regions" in results[0]:
        out["regions"] = {}
        for region in results[0]["regions"]:
            region_cases = [
                {"fold": name, **c} for result, name in pairs for c in result["regions"][region]["cases"]
            ]
            out["regions"][region] = {"cases": region_cases, "mean": mean_metrics(region_cases)}
    return out
