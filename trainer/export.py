"""Export a training run: ONNX -> OpenVINO IR FP32 -> NNCF INT8, the model card, and registration.

``segnode export RUN_DIR`` takes the run's best checkpoint and writes, in ``RUN_DIR/export`` (or
``--out``): ``checkpoint.pt`` (optional), ``model.onnx`` (opset 17, dynamic batch, checked
against PyTorch on real slices), ``model_fp32.xml/.bin`` (``ov.convert_model`` +
``ov.save_model``, checked against PyTorch), ``model_int8.xml/.bin`` (``nncf.quantize`` on
calibration slices drawn from the TRAINING split, preset performance, like the reference's POT
DefaultQuantization with stat_subset_size 300; or ``nncf.quantize_with_accuracy_control`` on the
VALIDATION cases when a maximal Dice drop is given), ``model.json`` with per-artifact metrics on the
validation cases, and a ``NOTICE`` naming the training data's sources and licences. With
``register`` it imports the directory into the model table: checkpoint -> ONNX -> IR FP32 -> IR
INT8, each the parent of the next. An INT8 model that lost more validation Dice (mean or any region's)
than a given maximal drop fails the export: the directory is written, its card's
``calibration.accuracy_check`` says ``passed: false``, and nothing is registered. So does an INT8 model
that outlines more false tumour than its FP32 IR allows (``calibration.false_tumour_check``: summed
over the split's cases, as they are and made tumour-free by mirroring, at most ``max_false_tumour_ratio``
times FP32's plus 2 mL; :mod:`trainer.false_tumour`), which a Dice drop does not see. Before anything is
written, the checkpoint's card is checked against its own training settings and the checkpoint
against the run directory (:func:`check_checkpoint`).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.prediction import SlicePredictor, predict_slices, segment_prepared
from converters.preprocess import channels_per_modality
from db.card import file_entry, write_card
from trainer.checkpoint import RUN_OPTION_DEFAULTS, RUN_OPTIONS, load_checkpoint, model_from_checkpoint
from trainer.data import PreparedCase, load_prepared
from trainer.evaluate import CardPredictor, card_metrics, evaluate_cases
from trainer.exceptions import AccuracyCheckError, TrainerError
from trainer.false_tumour import DEFAULT_MAX_RATIO, false_tumour_check, false_tumour_ml
from trainer.metrics import case_region_dice
from trainer.predictors import onnx_predictor, openvino_predictor, torch_predictor

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
#: NNCF's overflow fix on every quantized layer: weights keep 7 bits so that a CPU without VNNI or
#: AMX, whose u8 x s8 kernels add pairs of products in 16 bits, cannot saturate. Without it
#: ("first_layer_only", NNCF's default) segnode-wt-flair 2.1.0 lost 0.012 validation Dice on an
#: AVX2-only CPU and none on an AVX-512 VNNI one; with it, none on the AVX2 CPU (2.1.1, ``segnode
#: requantize``).
OVERFLOW_FIX = "enable"
#: Largest tolerated |logit| difference between PyTorch and an FP32 export (relative to 1 + |logit|).
EXPORT_TOLERANCE = 1e-3

BRATS_CITATION = (
    "Menze et al., IEEE TMI 2015 (doi:10.1109/TMI.2014.2377694); Bakas et al., Sci Data 2017 "
    "(doi:10.1038/sdata.2017.117); Baid et al., arXiv:2107.02314 (2021)"
)


@dataclass
class ExportOptions:
    """Options of ``segnode export``."""

    run_dir: Path
    out_dir: Path | None = None
    checkpoint: str = "best.pt"
    data: Path | None = None
    calibration_size: int = 300
    max_dice_drop: float | None = None
    #: None: the false-tumour check is not run (:mod:`trainer.false_tumour`).
    max_false_tumour_ratio: float | None = DEFAULT_MAX_RATIO
    include_checkpoint: bool = True
    fp16_weights: bool = False
    register: bool = True
    database_url: str | None = None
    seed: int = 0


def _progress(msg: str, on_step: Callable[[str], None] | None) -> None:
    logger.info("%s", msg)
    if on_step is not None:
        on_step(msg)


def export_onnx(model: Any, path: Path, channels: int, crop: Sequence[int]) -> None:
    """Write ``model`` as ONNX (opset 17, input ``image`` (batch, C, H, W), batch dimension dynamic)."""
    import torch

    dummy = torch.zeros(2, channels, int(crop[0]), int(crop[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path))


def max_difference(a: SlicePredictor, b: SlicePredictor, slices: npt.NDArray[np.float32]) -> float:
    """Largest |a - b| of the logits over ``slices``, scaled by 1 + |a|."""
    out_a = predict_slices(a, slices, batch_size=5)  # odd batch size: exercises the dynamic batch
    out_b = predict_slices(b, slices, batch_size=5)
    return float(np.max(np.abs(out_a - out_b) / (1.0 + np.abs(out_a))))


def check_close(
    name: str, reference: SlicePredictor, other: SlicePredictor, slices: npt.NDArray[np.float32]
) -> float:
    """Raise TrainerError when ``other`` differs from ``reference`` by more than :data:`EXPORT_TOLERANCE`."""
    diff = max_difference(reference, other, slices)
    if diff > EXPORT_TOLERANCE:
        raise TrainerError(f"{name}: logits differ from PyTorch by {diff:.2e} (> {EXPORT_TOLERANCE:.0e})")
    logger.info("%s matches PyTorch (max scaled logit difference %.2e)", name, diff)
    return diff


def check_slices(cases: Sequence[PreparedCase], n: int = 12) -> npt.NDArray[np.float32]:
    """Real slices for the export checks: the ones with the most tumour across ``cases``."""
    picks = []
    for case in cases:
        area = case.target_planes.reshape(len(case.target_planes), -1).sum(axis=1)
        for idx in np.argsort(area)[::-1][: max(1, n // max(len(cases), 1))]:
            picks.append(case.prepared.slices[idx])
    return np.stack(picks[:n]).astype(np.float32)


def calibration_slices(cases: Sequence[PreparedCase], size: int, seed: int) -> list[npt.NDArray[np.float32]]:
    """``size`` slices drawn without replacement (seeded) from the training cases, each (1, C, H, W)."""
    pool = np.concatenate([c.prepared.slices for c in cases])
    idx = np.random.default_rng(seed).choice(len(pool), size=min(size, len(pool)), replace=False)
    return [pool[i : i + 1] for i in np.sort(idx)]


def val_region_dice(
    predict: SlicePredictor, cases: Sequence[PreparedCase], card: Mapping[str, Any]
) -> npt.NDArray[np.float64]:
    """3D Dice of prepared validation cases, one row per case, one column per region (WT; or WT, TC,
    ET for ``brats_regions``)."""
    rows = []
    for case in cases:
        labels = segment_prepared(predict, case.prepared, card)  # along the card's views
        rows.append(case_region_dice(labels, case, card["task"]))
    return np.asarray(rows, dtype=np.float64)


def worst_region_change(scores: npt.NDArray[np.float64], reference: npt.NDArray[np.float64]) -> float:
    """The accuracy-control metric: 1 plus the lowest, over regions, of the mean Dice of ``scores``
    minus that of ``reference`` (the FP32 network's on the same cases). 1 for the FP32 network itself,
    so NNCF's absolute drop (FP32's metric minus INT8's) is the worst region's Dice drop: the figure the
    export's own check (:func:`accuracy_check`) holds to ``--max-dice-drop``. A mean over regions
    would let one region lose much while the others hold. (1, not 0: NNCF also divides by the FP32
    network's metric.)"""
    return 1.0 + float(np.min(np.nanmean(scores, axis=0) - np.nanmean(reference, axis=0)))


def quantize_int8(
    fp32_xml: Path,
    out_xml: Path,
    calibration: list[npt.NDArray[np.float32]],
    val_cases: Sequence[PreparedCase],
    card: Mapping[str, Any],
    max_dice_drop: float | None,
    ignored_patterns: Sequence[str] = (),
) -> dict[str, Any]:
    """NNCF post-training INT8 quantization; returns the card's ``calibration`` block. Operations whose
    names match ``ignored_patterns`` (regular expressions) are left in float (an ensemble's averaging)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    model = ov.Core().read_model(str(fp32_xml))
    calib = nncf.Dataset(calibration)
    preset = nncf.QuantizationPreset.PERFORMANCE
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix(OVERFLOW_FIX))
    ignored = nncf.IgnoredScope(patterns=list(ignored_patterns), validate=False)
    block: dict[str, Any] = {
        "subset_size": len(calibration),
        "preset": "performance",
        "overflow_fix": OVERFLOW_FIX,
        "source": "training split",
        "tool": f"nncf {nncf.__version__}",
    }
    if max_dice_drop is None:
        quantized = nncf.quantize(
            model,
            calib,
            preset=preset,
            subset_size=len(calibration),
            advanced_parameters=advanced,
            ignored_scope=ignored,
        )
        block["method"] = "nncf.quantize"
    else:
        if not val_cases:
            raise TrainerError("--max-dice-drop needs validation cases, but the run's split has none")

        def predictor(compiled: Any) -> SlicePredictor:
            output = compiled.output(0)

            def predict(batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
                return np.asarray(compiled(batch)[output])

            return predict

        # Compiled as NNCF compiles the networks it validates (f32 inference), so that the FP32
        # network's metric is 1 and NNCF's drop is the worst region's.
        fp32 = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        reference = val_region_dice(predictor(fp32), val_cases, card)

        def validate(compiled: Any, items: Any) -> float:
            rows = [int(i) for i in items]
            scores = val_region_dice(predictor(compiled), [val_cases[i] for i in rows], card)
            return worst_region_change(scores, reference[rows])

        quantized = nncf.quantize_with_accuracy_control(
            model,
            calib,
            nncf.Dataset(list(range(len(val_cases)))),
            validation_fn=validate,
            max_drop=max_dice_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            preset=preset,
            subset_size=len(calibration),
            advanced_quantization_parameters=advanced,
            ignored_scope=ignored,
        )
        block.update(
            method="nncf.quantize_with_accuracy_control",
            max_dice_drop=max_dice_drop,
            accuracy_control_data="validation split",
            accuracy_control_metric="worst region's Dice drop against FP32",
        )
    if ignored_patterns:
        block["not_quantized"] = list(ignored_patterns)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return block


def find_manifest(data_dir: Path) -> Path | None:
    """``MANIFEST.tsv`` in the data folder or up to three parents above it (once symlinks are resolved).

    ``data_dir`` may also be a case folder or a case's image file: it then finds the manifest of the
    data set the case belongs to.
    """
    for folder in [data_dir, *list(data_dir.resolve().parents)[:3]]:
        candidate = folder / "MANIFEST.tsv"
        if candidate.is_file():
            return candidate
    return None


def _resolved_cases(data_dir: Path, case_ids: Sequence[str]) -> dict[str, Path]:
    """Where each of ``case_ids`` under ``data_dir`` really is (symlinks resolved); ``{}`` when the
    folder cannot be listed."""
    from converters.exceptions import ConverterError
    from converters.nifti import list_cases

    try:
        refs = list_cases(data_dir)
    except (ConverterError, OSError):
        return {}
    wanted = set(case_ids)
    return {r.case_id: Path(r.path).resolve() for r in refs if r.case_id in wanted}


def _manifest_rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _listed_in(
    case_id: str, where: Path | None, manifest: Path, rows: Sequence[Mapping[str, str]]
) -> set[tuple[str, str, str]]:
    """The (repository, commit, licence) of ``manifest``'s rows for the case: the rows under the case's
    real path ``where`` (relative to the manifest's folder), or else those naming its id in their path."""
    root = manifest.parent.resolve()
    prefix: tuple[str, ...] | None = None
    if where is not None and where.is_relative_to(root):
        prefix = where.relative_to(root).parts
    keys = set()
    for row in rows:
        parts = Path(row["file"]).parts
        if (parts[: len(prefix)] == prefix) if prefix else case_id in parts:
            keys.add((row["source_repository"], row["commit"], row["licence"]))
    return keys


def data_provenance(data_dir: Path, case_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Sources and licences of the training cases, from the data's MANIFEST.tsv (grouped by source).

    The manifest is looked for above ``data_dir`` and, for a case it does not list (a folder of
    symlinked cases, say), above the case's real path. A case no manifest lists gets an entry that
    says so, naming ``data_dir`` resolved (the card must not claim what it does not know).
    """
    data_dir = Path(data_dir)
    where = data_dir.resolve()
    own = find_manifest(data_dir)
    real = _resolved_cases(data_dir, case_ids)
    rows: dict[Path, list[dict[str, str]]] = {}
    groups: dict[tuple[str, str, str], set[str]] = {}
    unlisted: dict[Path | None, set[str]] = {}
    for case_id in case_ids:
        case_path = real.get(case_id)
        candidates = [own, find_manifest(case_path) if case_path is not None else None]
        manifests = list(dict.fromkeys(m for m in candidates if m is not None))
        keys: set[tuple[str, str, str]] = set()
        for manifest in manifests:
            if manifest not in rows:
                rows[manifest] = _manifest_rows(manifest)
            keys = _listed_in(case_id, case_path, manifest, rows[manifest])
            if keys:
                break
        for key in keys:
            groups.setdefault(key, set()).add(case_id)
        if not keys:
            unlisted.setdefault(manifests[0] if manifests else None, set()).add(case_id)
    out = []
    for (repo, commit, licence), cases in sorted(groups.items()):
        entry: dict[str, Any] = {
            "cases": sorted(cases),
            "source": f"https://github.com/{repo} at commit {commit}",
            "licence": licence,
        }
        if "brats" in licence.lower():
            entry["citation"] = BRATS_CITATION
        out.append(entry)
    for found, cases in sorted(unlisted.items(), key=lambda item: str(item[0] or "")):
        source, licence = (
            (f"local folder {where}", "unknown (no MANIFEST.tsv)")
            if found is None
            else (f"{where} (not in {found})", "unknown")
        )
        out.append({"cases": sorted(cases), "source": source, "licence": licence})
    return out


def notice_text(card: Mapping[str, Any]) -> str:
    """The NOTICE shipped beside a model: what it was trained on, where from, under which terms."""
    lines = [
        f"{card['name']} {card['version']} - NOTICE",
        "",
        "This model's weights were trained by segnode on the cases below. The cases are not",
        "distributed with the model; their terms are listed because the weights derive from them.",
        "",
    ]
    members = (card.get("training") or {}).get("ensemble_of") or []
    if members:
        lines += ["It is the mean of these networks (each trained by segnode on the same cases):"]
        lines += [f"  {m['name']} {m['version']} (ONNX sha256 {m['onnx_sha256']})" for m in members]
        lines.append("")
    for entry in card.get("data_provenance", []):
        lines += [f"Source:  {entry['source']}", f"Licence: {entry['licence']}"]
        if entry.get("citation"):
            lines.append(f"Cite:    {entry['citation']}")
        lines += ["Cases:   " + ", ".join(entry["cases"]), ""]
    lines += [
        "BraTS 2013 cases are CC BY-NC-SA 3.0 CH (non-commercial, share-alike): a model trained on",
        "them inherits the non-commercial restriction. BraTS 2019/2021 cases come under the BraTS",
        "challenge data terms (TCIA-derived); cite the BraTS papers above.",
        "",
    ]
    return "\n".join(lines)


def split_refs(split: Mapping[str, Any], data: Path, whose: str) -> dict[str, list[Any]]:
    """The ``CaseRef`` of each case of ``split``'s ``"train"`` and ``"val"`` lists under ``data`` (one
    listing of the folder); ``TrainerError`` naming the first case missing (``whose``: "the run's")."""
    from converters.nifti import list_cases

    found = {r.case_id: r for r in list_cases(data, require_labels=True)}
    refs: dict[str, list[Any]] = {}
    for which in ("train", "val"):
        ids = [str(c) for c in split.get(which) or []]
        missing = [c for c in ids if c not in found]
        if missing:
            raise TrainerError(f"case {missing[0]} of {whose} {which} split is not under {data}; pass --data")
        refs[which] = [found[c] for c in ids]
    return refs


def _load_split_cases(refs: Sequence[Any], card: Mapping[str, Any]) -> list[PreparedCase]:
    optional = card.get("optional_modalities", ())
    pre, mods, task = card["preprocessing"], card["modalities"], card["task"]
    return load_prepared(list(refs), pre, mods, task, optional=optional)


def int8_dice_drops(fp32: Mapping[str, Any], int8: Mapping[str, Any]) -> dict[str, float]:
    """FP32 minus INT8 mean validation Dice: ``"mean"``, and each region's when the metrics have regions."""
    drops = {"mean": float(fp32["mean"]["dice"] - int8["mean"]["dice"])}
    for region, block in fp32.get("regions", {}).items():
        drops[region] = float(block["dice"] - int8["regions"][region]["dice"])
    return drops


def accuracy_check(max_dice_drop: float, drops: Mapping[str, float]) -> dict[str, Any]:
    """The card's ``calibration.accuracy_check``: the worst INT8 Dice drop (mean or region) against a limit.

    ``drops`` are :func:`int8_dice_drops`' (``"mean"`` and each region's); ``worst`` names the one that
    is largest, ``passed`` says whether it is at most ``max_dice_drop``.
    """
    worst = max(drops, key=lambda k: drops[k])
    return {
        "max_dice_drop": float(max_dice_drop),
        "dice_drop": float(drops[worst]),
        "worst": worst,
        "passed": bool(drops[worst] <= max_dice_drop + 1e-12),
    }


def check_checkpoint(state: Mapping[str, Any], run_dir: Path, checkpoint: str) -> None:
    """Refuse a checkpoint whose card contradicts its own training settings, or that is another run's.

    The card's task, modalities (and optional ones), crop size and output must be those of the
    checkpoint's ``train_config``, and its channel counts those of its network (``model_config``); the
    checkpoint's data fingerprint, split, network, spacing and :data:`RUN_OPTIONS` must be those of the
    run directory's ``run.json``, ``split.json`` and ``last.pt`` (whichever exist): the card's training
    block is read from them.

    Raises
    ------
    TrainerError
        The first contradiction found, naming the field and both values.
    """
    where = f"checkpoint {run_dir / checkpoint}"
    card, config, network = state["card"], state["train_config"], state["model_config"]
    pre = card.get("preprocessing") or {}
    expected = {
        "task": config.get("task"),
        "modalities": list(config.get("modalities") or []),
        "optional_modalities": [
            m for m in config.get("modalities") or [] if m in (config.get("optional_modalities") or [])
        ],
        "crop_size": [int(c) for c in config.get("crop_size") or []],
        "context_slices": int(config.get("context_slices") or 0),
    }
    found = {
        "task": card.get("task"),
        "modalities": list(card.get("modalities") or []),
        "optional_modalities": list(card.get("optional_modalities") or []),
        "crop_size": [int(c) for c in pre.get("crop_size") or []],
        "context_slices": int(pre.get("context_slices") or 0),
    }
    if config.get("spacing_mm") is not None:
        expected["spacing_mm"] = [float(x) for x in config["spacing_mm"]]
        found["spacing_mm"] = [float(x) for x in pre.get("spacing_mm") or []]
    for key, value in expected.items():
        if found[key] != value:
            raise TrainerError(
                f"{where}: its card says {key} {found[key]!r} but it was trained with {value!r} "
                "(train_config); the card was changed after training: export refused"
            )
    task = found["task"]
    per_modality = channels_per_modality(found["context_slices"])
    channels = {"in_channels": len(found["modalities"]) * per_modality,
                "out_channels": 1 if task == "whole_tumor" else 4}
    for key, value in channels.items():
        if network.get(key) != value:
            raise TrainerError(
                f"{where}: its network has {key} {network.get(key)!r} but its card ({task}, "
                f"{len(found['modalities'])} modalities, {found['context_slices']} context slices) "
                f"needs {value}: export refused"
            )
    activation = "sigmoid" if task == "whole_tumor" else "softmax"
    if (card.get("output") or {}).get("activation") != activation:
        raise TrainerError(
            f"{where}: its card's output activation {(card.get('output') or {}).get('activation')!r} is not "
            f"{activation!r}, the {task} network's: export refused"
        )
    _check_same_run(state, run_dir, run_dir / checkpoint)


def _check_same_run(state: Mapping[str, Any], run_dir: Path, path: Path) -> None:
    import json

    def identity(saved: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        found = {key: config.get(key, RUN_OPTION_DEFAULTS.get(key)) for key in RUN_OPTIONS}
        found["optional_modalities"] = list(found["optional_modalities"] or [])  # absent before it existed
        return {
            **found,
            "data fingerprint": saved["fingerprint"],
            "network": saved["model_config"],
            # the median spacing of the data, when not an option: only the run's card holds it
            "spacing_mm": [float(x) for x in saved["card"]["preprocessing"]["spacing_mm"]],
        }

    where = f"checkpoint {path}"
    ours = identity(state, state["train_config"])
    others: list[tuple[str, dict[str, Any], Mapping[str, Any] | None]] = []
    try:
        run = json.loads((run_dir / "run.json").read_text())
        others.append(("run.json", identity(run, run["config"]), None))
    except (OSError, KeyError, TypeError, ValueError):
        pass  # no run.json (an older run): nothing in the card comes from it either
    with contextlib.suppress(OSError, ValueError):
        others.append(("split.json", {}, json.loads((run_dir / "split.json").read_text())))
    last = run_dir / "last.pt"
    if last.is_file() and last.resolve() != path.resolve():
        saved = load_checkpoint(last)
        others.append(("last.pt", identity(saved, saved["train_config"]), saved["split"]))
    for name, theirs, split in others:
        for key, value in theirs.items():
            if ours[key] != value:
                raise TrainerError(
                    f"{where} does not match the run in {run_dir} (another run's, or its card was changed): "
                    f"its {key} {ours[key]!r} differs from {name}'s {value!r}: export refused"
                )
        if split is not None and _split_cases(state["split"]) != _split_cases(split):
            raise TrainerError(
                f"{where} does not match the run in {run_dir} (another run's): its training/validation "
                f"split differs from {name}'s: export refused"
            )


def _split_cases(split: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(map(str, split.get("train") or [])), sorted(map(str, split.get("val") or []))


def export_run(options: ExportOptions, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export a run as the module docstring says; returns the written model card.

    Raises
    ------
    AccuracyCheckError
        ``max_dice_drop`` was given and the INT8 model's validation Dice (mean or a region's) dropped
        more than that below the FP32 IR's: the directory is written (its card says so) but not registered.
    TrainerError
        The run has no checkpoint, its data cannot be found, or an export does not match PyTorch.
    """
    import openvino as ov

    run_dir = options.run_dir
    state = load_checkpoint(run_dir / options.checkpoint)
    check_checkpoint(state, run_dir, options.checkpoint)
    card_base: dict[str, Any] = dict(state["card"])
    out = options.out_dir or run_dir / "export"
    if (out / "model.json").exists():
        # Its files may be registered (even serving): overwriting them would make the model table's
        # sha256 lie about what a node loads (as segnode requantize refuses too).
        raise TrainerError(
            f"--out {out} already holds a model (model.json); give a new or empty folder, or remove it "
            "if no registered model uses its files (segnode models list)"
        )
    out.mkdir(parents=True, exist_ok=True)
    data = options.data or Path(state["train_config"]["data"])
    model = model_from_checkpoint(state)
    torch_predict = torch_predictor(model)
    _progress("loading the validation and training cases", on_step)
    refs = split_refs(state["split"], data, "the run's")
    val_cases = _load_split_cases(refs["val"], card_base)
    train_cases = _load_split_cases(refs["train"], card_base)
    probe = check_slices(val_cases or train_cases)

    artifacts: list[dict[str, Any]] = []
    parent: str | None = None
    if options.include_checkpoint:
        shutil.copyfile(run_dir / options.checkpoint, out / "checkpoint.pt")
        artifacts.append(
            {
                "key": "checkpoint",
                "kind": "checkpoint",
                "precision": "fp32",
                "parent": None,
                "files": [file_entry(out / "checkpoint.pt", out)],
            }
        )
        parent = "checkpoint"

    _progress("exporting ONNX", on_step)
    onnx_path = out / "model.onnx"
    mc = state["model_config"]
    export_onnx(model, onnx_path, int(mc["in_channels"]), card_base["preprocessing"]["crop_size"])
    checks = {"onnx_vs_pytorch": check_close("ONNX", torch_predict, onnx_predictor(onnx_path), probe)}
    artifacts.append(
        {
            "key": "onnx",
            "kind": "onnx",
            "precision": "fp32",
            "parent": parent,
            "files": [file_entry(onnx_path, out)],
        }
    )

    _progress("converting to OpenVINO IR FP32", on_step)
    fp32_xml = out / "model_fp32.xml"
    ov.save_model(ov.convert_model(str(onnx_path)), str(fp32_xml), compress_to_fp16=options.fp16_weights)
    fp32_predict = openvino_predictor(card_base, fp32_xml)
    checks["ir_fp32_vs_pytorch"] = check_close("IR FP32", torch_predict, fp32_predict, probe)
    artifacts.append(
        {
            "key": "ir_fp32",
            "kind": "ir",
            "precision": "fp32",
            "parent": "onnx",
            "files": [file_entry(fp32_xml, out), file_entry(fp32_xml.with_suffix(".bin"), out)],
        }
    )

    _progress(f"quantizing to INT8 ({options.calibration_size} calibration slices)", on_step)
    int8_xml = out / "model_int8.xml"
    calibration = quantize_int8(
        fp32_xml,
        int8_xml,
        calibration_slices(train_cases, options.calibration_size, options.seed),
        val_cases,
        card_base,
        options.max_dice_drop,
    )
    artifacts.append(
        {
            "key": "ir_int8",
            "kind": "ir",
            "precision": "int8",
            "parent": "ir_fp32",
            "files": [file_entry(int8_xml, out), file_entry(int8_xml.with_suffix(".bin"), out)],
        }
    )
    del train_cases

    _progress("evaluating every artifact on the validation cases", on_step)
    val_refs = refs["val"]
    predictors: dict[str, CardPredictor] = {
        "checkpoint": CardPredictor(card_base, torch_predict, "checkpoint", "fp32"),
        "onnx": CardPredictor(card_base, onnx_predictor(onnx_path), "onnx", "fp32"),
        "ir_fp32": CardPredictor(card_base, fp32_predict, "ir_fp32", "fp32"),
        "ir_int8": CardPredictor(card_base, openvino_predictor(card_base, int8_xml), "ir_int8", "int8"),
    }
    for entry in artifacts:
        if val_refs:
            entry["metrics"] = card_metrics(evaluate_cases(predictors[entry["key"]], val_refs), "validation")
    if val_refs:
        drops = int8_dice_drops(artifacts[-2]["metrics"], artifacts[-1]["metrics"])
        drop = drops.pop("mean")
        calibration["validation_dice_drop"] = drop
        if drops:
            calibration["validation_dice_drop_regions"] = drops
        if options.max_dice_drop is not None:
            calibration["accuracy_check"] = accuracy_check(options.max_dice_drop, {"mean": drop, **drops})
    if options.max_false_tumour_ratio is not None:
        calibration["false_tumour_check"] = int8_false_tumour_check(
            card_base,
            predictors["ir_fp32"].predict,
            predictors["ir_int8"].predict,
            refs["train"] + val_refs,
            options.max_false_tumour_ratio,
            on_step,
        )

    run_state = state["run_state"]
    last = run_dir / "last.pt"
    trained = load_checkpoint(last)["run_state"]["epoch"] if last.is_file() else run_state["epoch"]
    all_ids = list(state["split"]["train"]) + list(state["split"]["val"])
    card = {
        **card_base,
        "artifacts": artifacts,
        "calibration": calibration,
        "training": {
            "data_fingerprint": state["fingerprint"],
            "split": {
                "train": state["split"]["train"],
                "val": state["split"]["val"],
                "seed": state["split"]["seed"],
                # a cross-validation fold's run (segnode train --folds K --fold I)
                **{k: state["split"][k] for k in ("folds", "fold") if k in state["split"]},
            },
            "epochs": trained,
            "planned_epochs": state["train_config"]["epochs"],
            "best_epoch": run_state["best_epoch"],
            "best_val_dice": run_state["best_dice"],
            "device_kind": state["device_kind"],
            "device_count": state["device_count"],
            "seed": state["train_config"]["seed"],
            "commit": _run_commit(run_dir),
            "model": state["model_config"],
            "options": {
                k: state["train_config"][k]
                for k in (
                    "batch_size",
                    "lr",
                    "weight_decay",
                    "slices_per_epoch",
                    "tumour_fraction",
                    "max_minutes",
                    # the augmentations that make the model what it is (absent from older checkpoints)
                    "scanner_augment",
                    "channel_dropout",
                    "optional_modalities",
                    "crop_size",
                    "patience",
                    "min_epochs",
                )
                if k in state["train_config"]
            },
        },
        "export_checks": checks,
        "data_provenance": data_provenance(data, all_ids),
    }
    if options.fp16_weights:
        card["ir_fp32_weights"] = "fp16 (compressed; computed in fp32)"
    return write_model_dir(card, out, options.register, options.database_url)


def write_model_dir(
    card: dict[str, Any], out: Path, register: bool, database_url: str | None
) -> dict[str, Any]:
    """Write ``card`` and its NOTICE into ``out``; then, unless its INT8 network failed a check of its
    ``calibration`` (:func:`failed_checks`), register the directory when ``register`` is set.

    Raises
    ------
    AccuracyCheckError
        A check failed: the directory is written, so that the engineer can see what failed, but not
        registered, and the command exits non-zero, so that no pipeline (the Helm export Job passes
        --register) goes on with it.
    """
    write_card(card, out)
    (out / "NOTICE").write_text(notice_text(card), encoding="utf-8")
    failed = failed_checks(card.get("calibration") or {})
    if failed:
        raise AccuracyCheckError(
            f"{'; '.join(failed.values())}: {out} written ({', '.join(failed)} passed false) but "
            "not registered; quantize again (a Dice drop), train again (false tumour: "
            "docs/int8-false-tumour-2026-12-07.md), or import it (segnode models import) and promote "
            "with --force",
            card,
        )
    if register:
        card["registered_ids"], card["registered_in"] = register_dir(out, database_url)
    return card


def int8_false_tumour_check(
    card: Mapping[str, Any],
    fp32: SlicePredictor,
    int8: SlicePredictor,
    refs: Sequence[Any],
    max_ratio: float,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The card's ``calibration.false_tumour_check``: false tumour of the FP32 and INT8 IRs on each case
    of ``refs`` (``CaseRef``, loaded one at a time) that holds every modality of the card, as it is and
    mirrored tumour-free (:func:`trainer.false_tumour.false_tumour_ml`), held to ``max_ratio``
    (:func:`trainer.false_tumour.false_tumour_check`). ``left_out`` names the cases lacking a modality
    (an optional one is fed as zero channels, which the check does not imitate); without any case
    left, ``skipped`` says why and nothing is checked."""
    needed = set(card["modalities"])
    complete = [r for r in refs if needed <= set(r.channel_names)]
    left_out = [r.case_id for r in refs if r not in complete]
    if not complete:
        return {"skipped": f"no case of the split holds every modality ({', '.join(card['modalities'])})"}
    position = {r.case_id: i + 1 for i, r in enumerate(complete)}

    def step(case_id: str) -> None:
        _progress(f"false tumour, FP32 and INT8: case {position[case_id]} of {len(complete)}", on_step)

    found = false_tumour_ml({"fp32": fp32, "int8": int8}, card, (r.load() for r in complete), step)
    check = false_tumour_check(found["fp32"], found["int8"], max_ratio)
    check["cases"] = [r.case_id for r in complete]
    if left_out:
        check["left_out"] = left_out
    return check


def failed_checks(calibration: Mapping[str, Any]) -> dict[str, str]:
    """The checks of ``calibration`` (accuracy, false tumour) that the INT8 model failed: each one's
    card key (``calibration.accuracy_check``...) -> a line saying by how much."""
    failed = {}
    check = calibration.get("accuracy_check")
    if check is not None and not check["passed"]:
        failed["calibration.accuracy_check"] = (
            f"INT8 Dice drop {check['dice_drop']:.4f} ({check['worst']}) exceeds --max-dice-drop "
            f"{check['max_dice_drop']:g}"
        )
    ft = calibration.get("false_tumour_check")
    if ft is not None and ft.get("passed") is False:
        failed["calibration.false_tumour_check"] = (
            f"INT8 false tumour {ft['int8_ml']:.1f} mL against FP32's {ft['fp32_ml']:.1f} mL on "
            f"{ft['volumes']} volumes exceeds --max-false-tumour-ratio {ft['max_ratio']:g} "
            f"(+ {ft['slack_ml']:g} mL: limit {ft['limit_ml']:.1f} mL)"
        )
    return failed


def _run_commit(run_dir: Path) -> str:
    import json

    try:
        return str(json.loads((run_dir / "run.json").read_text())["commit"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def register_dir(directory: Path, database_url: str | None = None) -> tuple[list[int], str]:
    """Import an exported model directory into the model table (migrating the database first).

    Unlike the ``segnode models`` commands, a database that does not exist is created: this is the ML
    engineer's registry. Which one it was is returned for the command to print, so that an export run
    away from the node's database does not pass for a registration in it.

    Returns
    -------
    tuple[list[int], str]
        The model ids, parents first (checkpoint, ONNX, IR FP32, IR INT8), and the database they went
        to (its URL without password, "(created)" after it when there was none).
    """
    from db.registry import Registry
    from db.session import display_url, existing_tables, make_engine, make_session_factory, upgrade

    if database_url is None:
        from db.url import resolve_database_url

        database_url = resolve_database_url()
    created = existing_tables(database_url) is None
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        infos = Registry(make_session_factory(engine)).import_dir(directory)
    finally:
        engine.dispose()
    where = display_url(database_url) + (" (created)" if created else "")
    logger.info("registered %s in %s", ", ".join(f"#{i.id}" for i in infos), where)
    return [int(i.id) for i in infos], where
